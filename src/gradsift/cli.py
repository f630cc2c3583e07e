"""The ``gradsift`` command line: demo, score, select, train, eval, run, report."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from gradsift.runtime import process_state

app = typer.Typer(
    name="gradsift",
    help="Keep an aligned LLM safe while fine-tuning it on a sequence of tasks "
    "(exact per-sample gradient norms, Moderate-G_i selection).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

# Errors that come from the user's input: one line, non-zero exit, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, NotImplementedError)


def _fail(exc: BaseException) -> None:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, KeyError):
        msg = f"missing key {msg}"
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _setup_torch(threads: Optional[int]) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


@app.command()
def score(
    model: str = typer.Option("embedded", "--model", "-m", help="local path, hub id, or 'embedded' (SmolLM2-135M-Instruct)"),
    data: str = typer.Option(..., "--data", "-d", help="records: .jsonl/.json/.csv/.parquet or hf:NAME[:CONFIG][@SPLIT]"),
    out: Path = typer.Option(Path("scores.parquet"), "--out", "-o", help="output Parquet table"),
    params: str = typer.Option("all", help="parameters of the norm: all | trainable"),
    adapter: Optional[str] = typer.Option(None, help="PEFT adapter to load on the model"),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    max_length: int = typer.Option(512, "--max-length"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    prompt_field: Optional[str] = typer.Option(None, help="column holding the prompt"),
    response_field: Optional[str] = typer.Option(None, help="column holding the response"),
    messages_field: Optional[str] = typer.Option(None, help="column holding chat messages"),
    system_field: Optional[str] = typer.Option(None, help="column holding a system prompt"),
    limit: Optional[int] = typer.Option(None, help="score only the first N rows"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: the accelerator if any)"),
    threads: Optional[int] = typer.Option(None, help="CPU threads"),
    trust_remote_code: bool = typer.Option(False, help="allow custom model code from the hub"),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="check the first batch's norms against the per-sample loop (default on)"),
):
    """Exact per-sample gradient norms G_i and losses L_i of every row, to a Parquet table."""
    _setup_torch(threads)
    try:
        from gradsift.models import load_model, load_tokenizer
        from gradsift.scoring import ScoreOptions, score_dataset
        from gradsift.data.records import RecordError, read_records

        if not read_records(data, prompt_field=prompt_field, response_field=response_field,
                            messages_field=messages_field, system_field=system_field, limit=1):  # fail fast
            raise RecordError(data, "no records to score (the data is empty)")
        dev = _device(device)
        tok = load_tokenizer(model, trust_remote_code=trust_remote_code)
        m = load_model(model, dtype=dtype, device=dev, trust_remote_code=trust_remote_code, adapter=adapter)
        opts = ScoreOptions(params=params, batch_size=batch_size, max_length=max_length, prompt_field=prompt_field,
                            response_field=response_field, messages_field=messages_field,
                            system_field=system_field, limit=limit, verify=verify)
        table = score_dataset(m, tok, data, out, opts)
    except USER_ERRORS as exc:
        _fail(exc)
    if process_state().is_main_process:
        _print_distribution(table, out)


def _device(device: Optional[str]):
    """``--device``, or this process's accelerator in the launch (the CPU when there is none)."""
    return device or process_state().device


def _print_distribution(table, out: Optional[Path]) -> None:
    from rich.table import Table

    out_console = Console()
    t = Table(title=f"G_i distribution over {len(table)} samples" + (f" -> {out}" if out else ""))
    for col in ("", "G", "L", "response tokens"):
        t.add_column(col, justify="right")
    qs = [("min", 0.0), ("p10", 0.1), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p90", 0.9), ("max", 1.0)]
    for name, q in qs:
        t.add_row(name, f"{table['G'].quantile(q):.4g}", f"{table['L'].quantile(q):.4g}",
                  f"{table['n_response_tokens'].quantile(q):.0f}")
    t.add_row("mean", f"{table['G'].mean():.4g}", f"{table['L'].mean():.4g}", f"{table['n_response_tokens'].mean():.1f}")
    out_console.print(t)
    if len(table) > 1:
        corr = table[["G", "L", "n_response_tokens"]].corr(method="spearman")
        out_console.print(f"Spearman: G~L {corr.loc['G', 'L']:+.2f}, G~response length {corr.loc['G', 'n_response_tokens']:+.2f}")


@app.command()
def select(
    data: str = typer.Option(..., "--data", "-d", help="the records that were scored"),
    scores: Path = typer.Option(..., "--scores", "-s", help="table written by `gradsift score`"),
    out: Path = typer.Option(..., "--out", "-o", help="kept subset: .jsonl/.json/.csv/.parquet"),
    method: str = typer.Option("moderate", help="moderate | high | low | random"),
    rho: float = typer.Option(0.2, help="fraction kept"),
    prefilter: str = typer.Option("none", help="loss pre-filter over the whole table: none | mean_std | percentile"),
    seed: int = typer.Option(0, help="seed of the random baseline"),
):
    """Offline selection: keep a fraction of a scored dataset and write it as a file."""
    import pandas as pd

    from gradsift.select.offline import select_rows, write_subset

    try:
        if not scores.exists():
            raise FileNotFoundError(f"{scores}: no such score table (run `gradsift score` first)")
        table = pd.read_parquet(scores)
        rows = select_rows(table, method=method, rho=rho, prefilter=prefilter, seed=seed)
        write_subset(data, rows, out)
    except USER_ERRORS as exc:
        _fail(exc)
    kept = table[table["row"].isin(rows)]
    Console().print(f"kept {len(rows)} of {len(table)} rows ({method}, rho={rho}) -> {out}; "
                    f"G median kept {kept['G'].median():.4g} vs all {table['G'].median():.4g}")


def _seed_overrides(seeds: Optional[str], overrides: Optional[list[str]]) -> list[str]:
    """``--set`` overrides plus ``seeds=[...]`` from ``--seeds 0,1,2`` (which wins over the config's seeds)."""
    out = list(overrides or [])
    if seeds is None:
        return out
    from gradsift.train.config import parse_seeds

    values = parse_seeds(seeds)
    out.append(f"seeds=[{', '.join(map(str, values))}]")
    return out


@app.command()
def train(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="run directory (default: the config's output_dir)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config key: --set optim.lr=2e-4"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="seeds to run, comma-separated (overrides the config): 0,1,2"),
    threads: Optional[int] = typer.Option(None, help="CPU threads"),
):
    """Continual training over the config's task sequence, with the config's method(s) and seeds."""
    _setup_torch(threads)
    from gradsift.train.config import ConfigError
    from gradsift.train.stages import train_command

    try:
        train_command(config, output, _seed_overrides(seeds, set_))
    except (ConfigError, *USER_ERRORS) as exc:
        _fail(exc)


@app.command()
def run(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="run directory (default: the config's output_dir)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config key: --set optim.lr=2e-4"),
    quick: bool = typer.Option(False, "--quick", help="a trimmed run: fewer samples, prompts and methods"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="seeds to run, comma-separated (overrides the config): 0,1,2"),
    threads: Optional[int] = typer.Option(None, help="CPU threads"),
):
    """Train, evaluate after stage 0 and every stage, and write report.html: one command."""
    _setup_torch(threads)
    from gradsift.pipeline import run_pipeline
    from gradsift.train.config import ConfigError

    try:
        run_pipeline(config, output, _seed_overrides(seeds, set_), quick=quick)
    except (ConfigError, *USER_ERRORS) as exc:
        _fail(exc)


@app.command()
def demo(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="run directory (default runs/demo)"),
    quick: bool = typer.Option(False, "--quick", help="a trimmed demo (minutes)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a key of configs/demo.yaml"),
    threads: Optional[int] = typer.Option(None, help="CPU threads"),
):
    """The whole method on the embedded SmolLM2-135M-Instruct: align, fine-tune on three tasks, compare, report."""
    _setup_torch(threads)
    from gradsift.pipeline import demo_config_path, run_pipeline
    from gradsift.train.config import ConfigError

    try:
        if output is None:
            output = Path("runs/demo-quick" if quick else "runs/demo")
        run_pipeline(demo_config_path(), output, list(set_ or []), quick=quick)
    except (ConfigError, *USER_ERRORS) as exc:
        _fail(exc)


def _register_commands() -> None:
    """Commands defined beside their subsystems (an import error there is a real error, not a missing command)."""
    from gradsift.analysis.commands import register as register_study
    from gradsift.eval.commands import register as register_eval
    from gradsift.report.commands import register as register_report

    register_eval(app, _fail, USER_ERRORS)
    register_report(app, _fail, USER_ERRORS)
    register_study(app, _fail, USER_ERRORS)


_register_commands()


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from gradsift.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    app()


if __name__ == "__main__":
    sys.exit(main())
