"""The report of a run: the run store, tables, figures and one self-contained HTML page."""

from gradsift.store import RunDirError, RunStore, load_run
from gradsift.report.tables import asr_per_stage, paper_table, run_metrics, summary_markdown

__all__ = [
    "RunDirError",
    "RunStore",
    "asr_per_stage",
    "build_report",
    "load_run",
    "paper_table",
    "run_metrics",
    "summary_markdown",
]


def __getattr__(name: str):
    # the HTML builder pulls in matplotlib: import it on first use only
    if name == "build_report":
        from gradsift.report.html import build_report

        return build_report
    raise AttributeError(f"module 'gradsift.report' has no attribute {name!r}")
