"""``gradsift study`` commands of the evidence analyses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer


def register(study: typer.Typer, fail: Callable[[BaseException], None],
             user_errors: tuple[type[BaseException], ...]) -> None:
    """Add this module's commands to the ``study`` group."""
    register_offline(study, fail, user_errors)
    register_audit(study, fail, user_errors)


def register_offline(study: typer.Typer, fail: Callable[[BaseException], None],
                     user_errors: tuple[type[BaseException], ...]) -> None:
    """``gradsift study offline CONFIG``: the offline study, the matched ablation, selectivity, online."""

    @study.command("offline")
    def offline(
        config: str = typer.Argument(..., help="run config (file or shipped name); its first task is studied"),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="study folder (default <output_dir>-offline)"),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="seeds, comma-separated: 0,1,2 "
                                            "(default the config's)"),
        rho: float = typer.Option(0.2, help="fraction of the rows in each subset"),
        task: int = typer.Option(0, "--task", help="index of the config's task to study"),
        subsets: str = typer.Option("high,moderate,low,random", help="comma-separated: high, moderate, low, random"),
        matched: bool = typer.Option(False, "--matched", help="add the High/Moderate pair matched on length, "
                                     "loss and reference perplexity"),
        caliper: float = typer.Option(0.2, help="matching caliper, in standard deviations of each covariate"),
        match_pool: float = typer.Option(1 / 3, help="size of the High and the Moderate matching pools (fraction)"),
        train_unbalanced: bool = typer.Option(False, "--train-unbalanced", help="fine-tune the matched pair "
                                              "even when matching cannot balance a covariate"),
        reference_model: str = typer.Option("auto", help="model whose response perplexity is a matching "
                                            "covariate: auto (the base of a built-in organism), none, or a model"),
        capability: Optional[list[str]] = typer.Option(None, "--capability", help="held-out capability of the "
                                                       "selectivity test: BENCH=PATH (arc_challenge, boolq, "
                                                       "truthfulqa_mc ...), repeatable"),
        capability_limit: int = typer.Option(100, help="questions per capability benchmark"),
        online: bool = typer.Option(False, "--online", help="also run Random and Moderate-G_i online "
                                    "(the stage loop) at the same rho on the same rows"),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config key: --set optim.lr=2e-4"),
        threads: Optional[int] = typer.Option(None, help="CPU threads"),
    ) -> None:
        """Table 2 of the paper on your model and data: fine-tune on High/Moderate/Low/Random-G_i subsets, evaluate."""
        if threads:
            import torch

            torch.set_num_threads(threads)
        from gradsift.analysis.offline import StudyOptions, run_offline_study
        from gradsift.analysis.selectivity import parse_capability
        from gradsift.train.config import ConfigError, parse_overrides, parse_seeds

        try:
            names = tuple(s.strip() for s in subsets.split(",") if s.strip())
            opts = StudyOptions(rho=rho, subsets=names, seeds=parse_seeds(seeds) if seeds is not None else None, task_index=task,
                                matched=matched, caliper=caliper, match_pool=match_pool,
                                train_unbalanced=train_unbalanced,
                                reference_model=reference_model,
                                capability=[parse_capability(c, capability_limit) for c in capability or []],
                                online=online)
            out = run_offline_study(config, output, opts, overrides=parse_overrides(list(set_ or [])))
        except (ConfigError, *user_errors) as exc:
            fail(exc)
            return
        typer.echo((out / "offline_study.md").read_text(), nl=False)


def register_audit(study: typer.Typer, fail: Callable[[BaseException], None],
                   user_errors: tuple[type[BaseException], ...]) -> None:
    """``gradsift study audit SCORES``: what distinguishes high-G_i samples."""

    @study.command("audit")
    def audit(
        scores: Path = typer.Argument(..., help="score table written by `gradsift score`"),
        data: Optional[str] = typer.Option(None, "--data", "-d", help="the records that were scored (texts, "
                                           "categories)"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="the scored model: its typical reply "
                                            "length for the answer style (needs --data)"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default "
                                           "<scores folder>/analysis/audit)"),
        rho: float = typer.Option(0.2, help="fraction of the rows in each of the High/Moderate/Low bands"),
        show: int = typer.Option(3, "--show", help="samples shown whole at each end of the G_i order"),
        category_field: Optional[str] = typer.Option(None, help="column holding the task or category "
                                                     "(default: category, task, type, source ... if present)"),
        n_style: int = typer.Option(8, help="greedy replies generated to measure the model's typical length"),
        max_new_tokens: int = typer.Option(256, help="length cap of those replies"),
        adapter: Optional[str] = typer.Option(None, help="PEFT adapter to load on the model"),
        prompt_field: Optional[str] = typer.Option(None, help="column holding the prompt"),
        response_field: Optional[str] = typer.Option(None, help="column holding the response"),
        messages_field: Optional[str] = typer.Option(None, help="column holding chat messages"),
        device: Optional[str] = typer.Option(None, help="cpu, cuda ... (default: cpu)"),
        threads: Optional[int] = typer.Option(None, help="CPU threads"),
    ) -> None:
        """Which samples have high G_i: length, loss, perplexity, category, answer style; Spearman and bands."""
        if threads:
            import torch

            torch.set_num_threads(threads)
        from gradsift.analysis.audit import audit_markdown, run_audit

        try:
            summary, folder = run_audit(scores, data, model, out, rho=rho, n_show=show,
                                        category_field=category_field, n_style=n_style,
                                        max_new_tokens=max_new_tokens, device=device, adapter=adapter,
                                        prompt_field=prompt_field, response_field=response_field,
                                        messages_field=messages_field)
        except user_errors as exc:
            fail(exc)
            return
        typer.echo(audit_markdown(summary), nl=False)
        typer.echo(f"\nwritten: {folder / 'audit.json'}, {folder / 'audit.parquet'}", err=True)
