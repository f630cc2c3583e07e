"""``gradsift report RUN_DIR [--out FILE] [--judge NAME]``: the HTML report and the markdown summary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register"]


def register(app: typer.Typer, fail: Callable[[BaseException], None],
             user_errors: tuple[type[BaseException], ...]) -> None:
    """Add the ``report`` command to ``app``; ``fail`` turns a user error into one line and an exit code."""

    @app.command("report")
    def report(
        run_dir: Path = typer.Argument(..., help="a run directory written by `gradsift train`"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default RUN_DIR/report.html)"),
        judge: Optional[str] = typer.Option(None, "--judge", help="primary safety judge (default: the best measured)"),
    ) -> None:
        """Write a self-contained HTML report of a run and print its markdown summary."""
        from rich.console import Console

        from gradsift.report.html import build_report
        from gradsift.store import load_run
        from gradsift.report.tables import summary_markdown

        try:
            path = build_report(run_dir, out, judge=judge)
            summary = summary_markdown(load_run(run_dir), judge)
        except user_errors as exc:
            fail(exc)
            return
        typer.echo(summary, nl=False)
        Console(stderr=True).print(f"[green]report[/green]: {path}", highlight=False)
