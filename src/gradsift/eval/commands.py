"""The ``gradsift eval`` command: evaluate one model (optionally with a PEFT adapter).

    gradsift eval --model embedded --config eval.yaml --tasks arith --safety advbench=data/harmful_behaviors.csv \\
        --judge keyword --judge heuristic --out runs/eval --limit 50

``--config`` takes a standalone eval file (the ``eval`` section's keys at top level)
or a run config (its ``eval:`` section is used, and its ``tasks:`` are scored unless
``--tasks`` is given). Options given on the command line replace the file's values.
Rows go to ``<out>/results.jsonl`` (``run, method, seed, stage, task, metric, value``),
generations to ``<out>/generations/``, the refusal-list hash to ``<out>/eval_meta.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import typer

from gradsift.eval.runner import BUILTIN_BENIGN, BUILTIN_HARMFUL, EvalConfigError


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise EvalConfigError(f"{path}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EvalConfigError(f"{path}: the config must be a mapping, got {type(data).__name__}")
    return data


def _split_spec(spec: str) -> tuple[str | None, str]:
    """``NAME=VALUE`` -> (NAME, VALUE); ``VALUE`` -> (None, VALUE)."""
    if "=" in spec:
        name, value = spec.split("=", 1)
        if not name.strip() or not value.strip():
            raise EvalConfigError(f"{spec!r}: expected NAME=PATH or a set name")
        return name.strip(), value.strip()
    return None, spec.strip()


def build_eval_section(
    config: Path | None,
    *,
    safety: Sequence[str] | None = None,
    over_refusal: Sequence[str] | None = None,
    judges: Sequence[str] | None = None,
    attacks: Sequence[str] | None = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], Path | None]:
    """(eval section, the run config's task settings, base folder) from a file and CLI options."""
    section: dict[str, Any] = {}
    run_tasks: list[dict[str, Any]] = []
    base = None
    if config is not None:
        data = _read_yaml(config)
        base = config.resolve().parent
        if "eval" in data or isinstance(data.get("tasks"), list):  # a run config
            section = dict(data.get("eval") or {})
            for i, t in enumerate(data.get("tasks") or []):
                t = {"name": t} if isinstance(t, str) else dict(t)
                if "name" not in t:
                    raise EvalConfigError(f"{config}: tasks.{i}: missing key 'name'")
                run_tasks.append(t)
        else:
            section = data
    if safety:
        entries = []
        for spec in safety:
            name, value = _split_spec(spec)
            if value.lower() == "none" and name is None:
                continue
            entries.append({"set": value, **({"name": name} if name else {})})
        section["safety"] = entries
    if over_refusal:
        entries = []
        for spec in over_refusal:
            name, value = _split_spec(spec)
            if value.lower() == "none" and name is None:
                continue
            entries.append({"set": value, **({"name": name} if name else {})})
        section["over_refusal"] = entries
    safety_list = section.get("safety")
    if safety_list is None:
        safety_list = section["safety"] = [{"set": BUILTIN_HARMFUL}]
    if isinstance(safety_list, list):
        for entry in safety_list:
            if isinstance(entry, dict):
                if judges:
                    entry["judges"] = list(judges)
                if attacks:
                    entry["attacks"] = list(attacks)
    if limit is not None:
        if limit < 1:
            raise EvalConfigError(f"--limit must be >= 1, got {limit}")
        section["task_n_eval"] = min(limit, section.get("task_n_eval") or limit)
        if section.get("over_refusal") is None:
            section["over_refusal"] = [{"set": BUILTIN_BENIGN}]
        for key, field in (("safety", "n"), ("over_refusal", "n"), ("capability", "limit")):
            for entry in section.get(key) or []:
                if isinstance(entry, dict):
                    entry[field] = min(limit, entry.get(field) or limit)
        if isinstance(section.get("lm_eval"), dict):
            current = section["lm_eval"].get("limit")
            section["lm_eval"]["limit"] = limit if current is None or current < 1 else min(limit, current)
    if max_new_tokens is not None or batch_size is not None:
        gen = dict(section.get("generation") or {})
        if max_new_tokens is not None:
            gen["max_new_tokens"] = max_new_tokens
        if batch_size is not None:
            gen["batch_size"] = batch_size
        section["generation"] = gen
    return section, run_tasks, base


def _task_settings(specs: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for spec in specs:
        for part in spec.split(","):
            if not part.strip():
                continue
            name, value = _split_spec(part)
            out.append({"name": name, "path": value} if name else {"name": value})
    return out


def _load_tasks(settings: Sequence[dict[str, Any]], base: Path | None) -> list[Any]:
    from gradsift.tasks import load_task

    tasks = []
    for s in settings:
        path = s.get("path")
        if path is not None and base is not None and not Path(path).is_absolute() and (base / path).exists():
            path = str((base / path).resolve())
        task = load_task(s["name"], n_train=s.get("n_train"), n_eval=s.get("n_eval"), seed=s.get("seed", 0),
                         path=path)
        task.train = []
        task.name = s["name"]
        tasks.append(task)
    return tasks


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def print_rows(rows: Sequence[dict[str, Any]], title: str) -> None:
    """A rich table of the rows (task, metric, value)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    last = None
    for r in rows:
        table.add_row(r["task"] if r["task"] != last else "", r["metric"], _format(r["value"]))
        last = r["task"]
    Console().print(table)


def eval_command(
    model: str,
    adapter: Path | None = None,
    config: Path | None = None,
    tasks: Sequence[str] | None = None,
    safety: Sequence[str] | None = None,
    over_refusal: Sequence[str] | None = None,
    judges: Sequence[str] | None = None,
    attacks: Sequence[str] | None = None,
    out: Path = Path("eval_results"),
    limit: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    run: str = "eval",
    method: str = "eval",
    seed: int = 0,
    stage: int = 0,
    dtype: str = "float32",
    device: str | None = None,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
) -> list[dict[str, Any]]:
    """Load the model, evaluate it, print a table and append the rows to ``<out>/results.jsonl``."""
    import torch

    from gradsift.eval.runner import EvalConfig, evaluate, write_eval_meta
    from gradsift.models import load_model, load_tokenizer, resolve_model_path
    from gradsift.store import RunDir

    section, run_tasks, base = build_eval_section(
        config, safety=safety, over_refusal=over_refusal, judges=judges, attacks=attacks, limit=limit,
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )
    cfg = EvalConfig.from_dict(section, source=f"{config}: eval" if config else "eval", base=base)
    task_specs = _task_settings(tasks) if tasks else run_tasks
    if cfg.tasks == "none":
        task_specs = []
    loaded_tasks = _load_tasks(task_specs, base if not tasks else None)
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"{adapter}: no such adapter folder")
    try:
        tok = load_tokenizer(tokenizer or model, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise FileNotFoundError(f"{tokenizer or model}: cannot load the tokenizer ({_first_line(exc)})") from None
    if cfg.generation.backend == "vllm":
        if adapter is not None:
            raise EvalConfigError("--adapter: the vllm backend takes a merged model; merge the adapter first")
        lm: Any = resolve_model_path(model)
    else:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, adapter=adapter)
        except OSError as exc:
            raise FileNotFoundError(f"{model}: cannot load the model ({_first_line(exc)})") from None
        lm.eval()
    run_dir = RunDir(Path(out))
    run_dir.path.mkdir(parents=True, exist_ok=True)
    write_eval_meta(run_dir.path, cfg)
    rows = evaluate(lm, tok, cfg, tasks=loaded_tasks, out_dir=run_dir.path, stage=stage)
    run_dir.append_results([{k: r[k] for k in ("task", "metric", "value")} for r in rows],
                           run=run, method=method, seed=seed, stage=stage)
    print_rows(rows, title=f"{model}" + (f" + {adapter}" if adapter else "") + f" -> {run_dir.results_file}")
    return rows


def register(app: typer.Typer, fail: Callable[[BaseException], None],
             user_errors: tuple[type[BaseException], ...]) -> None:
    """Add ``gradsift eval`` to the Typer ``app``; ``fail`` reports user errors (exit code 2)."""

    @app.command("eval")
    def eval_cli(
        model: str = typer.Option(..., "--model", "-m", help="model folder, hub id or 'embedded'"),
        adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT adapter folder"),
        config: Optional[Path] = typer.Option(None, "--config", "-c",
                                              help="eval YAML, or a run config with an eval: section"),
        tasks: Optional[list[str]] = typer.Option(None, "--tasks", help="tasks to score: NAME or NAME=PATH, "
                                                  "comma-separated or repeated"),
        safety: Optional[list[str]] = typer.Option(None, "--safety", help="harmful set: advbench, builtin_harmful, "
                                                   "a file, or NAME=PATH (repeat; 'none' for no safety)"),
        over_refusal: Optional[list[str]] = typer.Option(None, "--over-refusal",
                                                         help="safe-prompt set: builtin_benign, xstest, a file or "
                                                         "NAME=PATH (repeat; 'none' to skip)"),
        judge: Optional[list[str]] = typer.Option(None, "--judge", help="safety judge (repeat): keyword, heuristic, "
                                                  "llamaguard, harmbench, openai"),
        attack: Optional[list[str]] = typer.Option(None, "--attack", help="jailbreak template (repeat)"),
        out: Path = typer.Option(Path("eval_results"), "--out", "-o", help="output folder"),
        limit: Optional[int] = typer.Option(None, "--limit", help="at most N prompts / items per set and task"),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size"),
        run: str = typer.Option("eval", "--run", help="'run' value of the result rows"),
        method: str = typer.Option("eval", "--method", help="'method' value of the result rows"),
        seed: int = typer.Option(0, "--seed", help="'seed' value of the result rows"),
        stage: int = typer.Option(0, "--stage", help="'stage' value of the result rows"),
        dtype: str = typer.Option("float32", "--dtype"),
        device: Optional[str] = typer.Option(None, "--device"),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer (default: the model's)"),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    ) -> None:
        """Evaluate a model: task scores, attack success rate, over-refusal, capability benchmarks."""
        try:
            eval_command(model, adapter, config, tasks, safety, over_refusal, judge, attack, out, limit,
                         max_new_tokens, batch_size, run, method, seed, stage, dtype, device, tokenizer,
                         trust_remote_code)
        except user_errors as exc:
            fail(exc)
