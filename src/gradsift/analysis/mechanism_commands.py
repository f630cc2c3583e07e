"""``gradsift study drift RUN_DIR``: the mechanism analyses of a run (KL drift, update direction, safety basin)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

PARTS = ("kl", "direction", "basin")


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--radii: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError("--radii: give at least one radius")
    return values


def _stages(text: str) -> str | list[int]:
    if text in ("last", "all"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--basin-stages: 'last', 'all' or comma-separated stage numbers, got {text!r}") from None


def register(study: typer.Typer, fail: Callable[[BaseException], None],
             user_errors: tuple[type[BaseException], ...]) -> None:
    """Add this module's commands to the ``study`` group."""

    @study.command("drift")
    def drift(
        run_dir: Path = typer.Argument(..., help="a run directory written by `gradsift run` / `gradsift train`"),
        parts: str = typer.Option("kl,direction,basin", "--parts",
                                  help="which analyses: any of kl, direction, basin (comma-separated)"),
        pretrained: Optional[str] = typer.Option(
            None, "--pretrained", help="the model the run's aligned model was aligned from (default: the "
                                       "organism recipe's base, e.g. embedded)"),
        n_harmful: int = typer.Option(16, "--n-harmful", help="KL: held-out harmful prompts"),
        n_benign: int = typer.Option(16, "--n-benign", help="KL: held-out benign prompts"),
        max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="KL: length of the aligned model's replies"),
        top_k_layers: int = typer.Option(10, "--top-k-layers", help="direction: tensors of largest update"),
        top_frac: float = typer.Option(0.01, "--top-frac", help="direction: fraction of coordinates of largest update"),
        directions: int = typer.Option(4, "--directions", help="basin: random directions (the paper: 100)"),
        radii: str = typer.Option("0.025,0.05,0.1,0.2", "--radii", help="basin: radii, relative to each layer's norm"),
        tolerance: float = typer.Option(10.0, "--tolerance", help="basin: refusal points within the unperturbed"),
        basin_prompts: int = typer.Option(16, "--basin-prompts", help="basin: held-out harmful prompts"),
        basin_tokens: int = typer.Option(16, "--basin-tokens", help="basin: reply length judged"),
        basin_stages: str = typer.Option("last", "--basin-stages", help="basin: last | all | 0,3 ..."),
        runs: Optional[list[str]] = typer.Option(None, "--run", help="only these runs (method-seedN); repeatable"),
        report: bool = typer.Option(True, "--report/--no-report", help="rewrite RUN_DIR/report.html afterwards"),
        threads: Optional[int] = typer.Option(None, help="CPU threads"),
    ) -> None:
        """Elastic reversion, measured: KL to the aligned and the pretrained model, update-vs-alignment
        cosines, and the safety basin of every checkpoint; written to RUN_DIR/analysis/mechanism/."""
        import time

        import torch
        from rich.console import Console

        console = Console(stderr=True)
        if threads:
            torch.set_num_threads(threads)
        try:
            chosen = [p.strip() for p in parts.split(",") if p.strip()]
            bad = [p for p in chosen if p not in PARTS]
            if bad or not chosen:
                raise ValueError(f"--parts: unknown {', '.join(bad) or 'nothing'}; choose from {', '.join(PARTS)}")
            radius_list = _floats(radii)
            stage_sel = _stages(basin_stages)
            from gradsift.analysis.drift import RunModels, mechanism_dir

            models = RunModels(run_dir, pretrained)
            if "kl" in chosen or "direction" in chosen:
                models.pretrained_name()  # fail before any work when the pretrained model is unknown
            times = {}
            if "kl" in chosen:
                from gradsift.analysis.drift import drift_study

                t = time.time()
                drift_study(run_dir, n_harmful=n_harmful, n_benign=n_benign, max_new_tokens=max_new_tokens,
                            runs=runs, models=models)
                times["kl"] = time.time() - t
            if "direction" in chosen:
                from gradsift.analysis.direction import direction_study

                t = time.time()
                direction_study(run_dir, top_k_layers=top_k_layers, top_frac=top_frac, runs=runs, models=models)
                times["direction"] = time.time() - t
            if "basin" in chosen:
                from gradsift.analysis.basin import basin_study

                t = time.time()
                basin_study(run_dir, radii=radius_list, n_directions=directions, tolerance=tolerance,
                            n_prompts=basin_prompts, max_new_tokens=basin_tokens, stages=stage_sel, runs=runs,
                            models=models)
                times["basin"] = time.time() - t
            if report:
                from gradsift.report.html import build_report

                build_report(run_dir)
        except user_errors as exc:
            fail(exc)
            return
        took = ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
        console.print(f"[green]mechanism[/green]: {mechanism_dir(run_dir)} ({took})", highlight=False)
