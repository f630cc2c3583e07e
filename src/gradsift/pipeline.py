"""`gradsift run` and `gradsift demo`: train, evaluate after every stage, report."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

# --quick: fewer samples, fewer prompts (the first safety and over-refusal set only), the two
# methods that show the contrast
QUICK_OVERRIDES = {
    "tasks.*.n_train": 32,
    "tasks.*.n_eval": 8,
    "eval.generation.max_new_tokens": 24,
    "eval.safety.*.n": 16,
    "eval.over_refusal.*.n": 12,
}


def demo_config_path(name: str = "demo") -> Path:
    """The shipped config ``<name>.yaml`` (``demo``, or ``demo-a4``), inside the installed package."""
    from gradsift.configs import resolve_config

    return resolve_config(name)


def _apply_quick(data: dict) -> dict:
    for task in data.get("tasks", []):
        task["n_train"] = min(task.get("n_train") or 32, QUICK_OVERRIDES["tasks.*.n_train"])
        task["n_eval"] = min(task.get("n_eval") or 8, QUICK_OVERRIDES["tasks.*.n_eval"])
    methods = data.get("method")
    if isinstance(methods, list):
        data["method"] = [m for m in methods if m.get("name") in ("standard", "moderate")] or methods
    ev = data.setdefault("eval", {})
    gen = ev.setdefault("generation", {})
    gen["max_new_tokens"] = min(gen.get("max_new_tokens") or 128, QUICK_OVERRIDES["eval.generation.max_new_tokens"])
    for key in ("safety", "over_refusal"):
        cap = QUICK_OVERRIDES[f"eval.{key}.*.n"]
        sets = (ev.get(key) or [])[:1]  # a smoke run: the first set of each kind
        for s in sets:
            s["n"] = min(s.get("n") or cap, cap)
        if key in ev:
            ev[key] = sets
    return data


def run_pipeline(config: Path, output: Path | None = None, overrides: list[str] | None = None,
                 quick: bool = False) -> Path:
    """Train every method and seed of ``config``, evaluate after stage 0 and each stage, write report.html."""
    import yaml

    from gradsift.train.config import ConfigError, parse_overrides, set_dotted, validate_config
    from gradsift.train.stages import make_eval_hook, run_training

    console = Console(stderr=True)
    t0 = time.time()
    from gradsift.configs import resolve_config

    config = resolve_config(config)  # a file, or the name of a shipped config
    try:
        data = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config}: not valid YAML: {exc}") from None
    if quick:
        data = _apply_quick(data)
    for key, value in parse_overrides(overrides).items():
        set_dotted(data, key, value)
    cfg = validate_config(data, source=str(config), base=config.resolve().parent)
    hook = make_eval_hook(cfg.eval, base=config.resolve().parent)
    out = run_training(cfg, output_dir=output, eval_hook=hook)
    from gradsift.runtime import process_state

    if not process_state().is_main_process:  # under a multi-process launch the main process writes the report
        return out
    from gradsift.report import build_report, load_run, summary_markdown

    from gradsift.report.section_health import health_markdown

    report = build_report(out)
    store = load_run(out)
    Console().print(summary_markdown(store))
    Console().print(health_markdown(store))
    console.print(f"[green]report[/]: {report}  ({(time.time() - t0) / 60:.1f} min)")
    return out
