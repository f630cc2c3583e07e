"""``gradsift study ...``: the analyses of a run or of a scored dataset.

The commands live beside their studies (``evidence_commands``, ``mechanism_commands``);
this module builds the ``study`` group and adds it to the main app.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

__all__ = ["register"]


def register(app: typer.Typer, fail: Callable[[BaseException], None],
             user_errors: tuple[type[BaseException], ...]) -> None:
    """Add the ``study`` command group to ``app``."""
    from gradsift.analysis.evidence_commands import register as register_evidence
    from gradsift.analysis.mechanism_commands import register as register_mechanism

    study = typer.Typer(name="study", help="Analyses: which samples drive the drift, controls, statistics, mechanism.",
                        no_args_is_help=True)
    register_evidence(study, fail, user_errors)
    register_mechanism(study, fail, user_errors)
    app.add_typer(study, name="study")
