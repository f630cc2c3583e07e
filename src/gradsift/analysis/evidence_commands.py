"""``gradsift study`` commands of the evidence analyses."""

from __future__ import annotations

from collections.abc import Callable

import typer


def register(study: typer.Typer, fail: Callable[[BaseException], None],
             user_errors: tuple[type[BaseException], ...]) -> None:
    """Add this module's commands to the ``study`` group."""
