"""The offline study (section 3 and Table 2 of the paper), its controls, and online against offline.

``gradsift study offline CONFIG`` takes one task of a run config (the first by
default) and:

1. scores its training rows once at the aligned weights (G_i, L_i, response
   length; :mod:`gradsift.scoring`), and, when a reference model is known,
   the reference model's log-perplexity of each response (``ref_L``);
2. builds the subsets with the offline selection of :mod:`gradsift.select.offline`:
   High-G_i (top rho), Moderate-G_i (the rho closest to the median), Low-G_i
   (bottom rho) and Random (a random rho, drawn per seed), over the whole table,
   without a loss pre-filter;
3. with ``--matched``, adds the confounder-matched pair ``matched_high`` /
   ``matched_moderate`` (:mod:`gradsift.analysis.matching`);
4. fine-tunes a copy of the aligned model on each subset alone, one stage of the
   stage loop (:func:`gradsift.train.stages.run_training`, plain fine-tuning on the
   subset, the config's model, LoRA and optimizer settings), once per seed;
5. evaluates the aligned model once and every fine-tuned copy with the config's
   ``eval`` section (safety, over-refusal, the task's held-out score) and, with
   ``--capability BENCH=PATH``, an unrelated held-out capability question by
   question (the selectivity test, :mod:`gradsift.analysis.selectivity`);
6. with ``--online``, runs the same comparison with the online rule: the stage loop
   with Random and Moderate-G_i at the same rho on the same rows;
7. writes ``offline_study.json`` (every table, interval and test),
   ``offline_study.md`` (the markdown summary) and a top-level ``results.jsonl``
   that ``gradsift report`` reads.

Layout of the output folder::

    study.json                  the study's settings and the measured phase times
    config.resolved.yaml        the one-task config the copies are trained with
    scores.parquet              row, G, L, n_response_tokens, n_tokens, ref_L
    subsets.json                the row ids of every subset and seed (and the matching)
    aligned/                    the aligned model's evaluation: a run directory (results.jsonl,
                                aligned-seed0/stage_0/ with its generations and DONE)
    runs/<subset>-seed<s>/      one stage-loop output folder per subset and seed
    online/                     (--online) the stage loop's run folder
    results.jsonl               every measurement, run = <subset>-seed<s>
    offline_study.json, offline_study.md

A rerun with the same folder skips what is done: the scores, the aligned
evaluation and every subset whose stage is complete (the stage loop's DONE
markers); a folder written with other settings is refused.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradsift.data.records import iter_jsonl, read_json, write_jsonl
from gradsift.store import RunDir, RunPath, StageDir, parse_run_name, run_name

__all__ = [
    "BASE_SUBSETS",
    "StudyOptions",
    "build_subsets",
    "outcomes",
    "run_offline_study",
    "study_tables",
]

BASE_SUBSETS = ("high", "moderate", "low", "random")
MATCHED_SUBSETS = ("matched_high", "matched_moderate")
ALIGNED = "aligned"
STUDY_FILE = "study.json"
SCORES_FILE = "scores.parquet"
SUBSETS_FILE = "subsets.json"
TABLES_FILE = "offline_study.json"
SUMMARY_FILE = "offline_study.md"
LABELS = {"aligned": "aligned", "high": "High-G_i", "moderate": "Moderate-G_i", "low": "Low-G_i",
          "random": "Random", "matched_high": "High-G_i (matched)", "matched_moderate": "Moderate-G_i (matched)",
          "online_random": "Random (online)", "online_moderate": "Moderate-G_i (online)"}
# the paired comparisons the study reports: (A, B), difference A - B
COMPARISONS = (("moderate", "high"), ("moderate", "random"), ("high", "random"), ("low", "random"),
               ("matched_moderate", "matched_high"), ("online_moderate", "online_random"))


@dataclass
class StudyOptions:
    """What the study does beyond the run config (every field has the documented default)."""

    rho: float = 0.2
    subsets: tuple[str, ...] = BASE_SUBSETS
    seeds: list[int] | None = None  # None: the config's seeds
    task_index: int = 0
    params: str = "all"  # the parameters of G_i
    score_batch_size: int = 8
    matched: bool = False
    match_pool: float = 1 / 3
    caliper: float = 0.2
    match_covariates: tuple[str, ...] = ("n_response_tokens", "L", "ref_L")
    train_unbalanced: bool = False  # fine-tune the matched pair even when matching could not balance it
    reference_model: str | None = "auto"  # auto: the unaligned base of a built-in organism, else none
    capability: list[Any] = field(default_factory=list)  # selectivity.CapabilitySpec
    online: bool = False

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the subsets (a folder made with others is refused)."""
        return {"rho": self.rho, "task_index": self.task_index, "params": self.params}


# ----------------------------------------------------------------------------- subsets


def build_subsets(scores: pd.DataFrame, rho: float, seeds: Sequence[int],
                  names: Sequence[str] = BASE_SUBSETS) -> dict[str, dict[int, list[int]]]:
    """Row ids of each offline subset and seed, by :func:`gradsift.select.offline.select_rows`.

    High, Moderate and Low do not depend on the seed; Random is drawn with the seed.
    No loss pre-filter: the offline study of the paper ranks the whole table.
    """
    from gradsift.select.offline import select_rows

    out: dict[str, dict[int, list[int]]] = {}
    for name in names:
        if name not in BASE_SUBSETS:
            raise ValueError(f"unknown subset {name!r}; choose from {', '.join(BASE_SUBSETS)}")
        out[name] = {}
        for seed in seeds:
            if name != "random" and out[name]:
                out[name][int(seed)] = list(next(iter(out[name].values())))
                continue
            out[name][int(seed)] = select_rows(scores, method=name, rho=rho, prefilter="none", seed=int(seed))
    return out


# ----------------------------------------------------------------------------- scoring


def _reference_name(cfg, option: str | None) -> str | None:
    if option in (None, "none", ""):
        return None
    if option != "auto":
        return option
    from gradsift.organisms import ORGANISMS

    return "embedded" if cfg.model.config is None and cfg.model.name_or_path in ORGANISMS else None


def _reference_losses(name: str, tokenizer, features: list[dict], batch_size: int) -> dict[int, float]:
    """Per-token response loss of every feature under the reference model (its log-perplexity)."""
    import torch
    from tqdm.auto import tqdm

    from gradsift.data.formatting import collate, length_batches
    from gradsift.losses import causal_lm_losses
    from gradsift.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(name, device=device)
    model.eval()
    out: dict[int, float] = {}
    batches = length_batches([len(f["input_ids"]) for f in features], batch_size)
    with torch.inference_mode():
        for idx in tqdm(batches, desc=f"reference loss ({name})", unit="batch", dynamic_ncols=True):
            batch = collate([features[i] for i in idx], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            L, _ = causal_lm_losses(model, batch)
            for r, i in enumerate(idx):
                out[int(features[i]["row"])] = float(L[r])
    del model
    return out


def _score_pool(model, tokenizer, task, features: list[dict], options: StudyOptions, out: Path,
                reference: str | None) -> pd.DataFrame:
    from gradsift.scoring import ScoreOptions, score_features

    path = out / SCORES_FILE
    if path.exists():
        return pd.read_parquet(path)
    opts = ScoreOptions(params=options.params, batch_size=options.score_batch_size, max_length=task.max_length)
    table = score_features(model, features, tokenizer.pad_token_id, opts, out=path)
    if reference is not None:
        ref = _reference_losses(reference, tokenizer, features, options.score_batch_size)
        table["ref_L"] = table["row"].map(ref).astype(float)
    tmp = path.with_name(path.name + ".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(path)
    shutil.rmtree(path.with_name(path.name + ".chunks"), ignore_errors=True)
    return table


# ----------------------------------------------------------------------------- evaluation


def _study_hook(base_hook, task_settings, capability: Sequence[Any]):
    """The stage loop's hook, scoring the study's original task (not the subset file) and the capabilities."""
    from gradsift.analysis.selectivity import score_items, summary_rows, write_items

    def hook(model, tokenizer, stage, tasks_so_far, run_info):
        info = {**run_info, "tasks": [task_settings.model_dump()]}
        rows = list(base_hook(model, tokenizer, stage, [task_settings], info) or []) if base_hook else []
        stage_dir = RunPath(Path(run_info["run_dir"])).stage(stage)
        for spec in capability:
            records = score_items(model, tokenizer, spec)
            write_items(stage_dir.capability(spec.key), records)
            rows.extend(summary_rows(spec, records))
        return rows

    return hook


ALIGNED_RUN = f"{ALIGNED}-seed0"


def _aligned(out: Path) -> tuple[RunDir, StageDir]:
    """The aligned model's evaluation: a run directory ``aligned/`` with one run and stage 0."""
    layout = RunDir(out / ALIGNED)
    return layout, layout.stage(ALIGNED_RUN, 0)


def _evaluate_aligned(cfg, model, tokenizer, hook, out: Path) -> list[dict]:
    """The aligned model's rows (evaluated once, then read back)."""
    import torch

    layout, stage = _aligned(out)
    if stage.done and layout.results_file.exists():
        return layout.result_rows()
    stage.fresh()
    rows: list[dict] = []
    if hook is not None:
        home = next(model.parameters()).device
        if torch.cuda.is_available():
            model.to("cuda")
        model.eval()
        info = {"run": ALIGNED_RUN, "method": ALIGNED, "seed": 0, "run_dir": str(layout.run(ALIGNED_RUN).path),
                "tasks": [t.model_dump() for t in cfg.tasks], "eval": cfg.eval, "stage": 0}
        rows = list(hook(model, tokenizer, 0, cfg.tasks, info) or [])
        model.to(home)
    layout.write_results([])
    layout.append_results(rows, run=ALIGNED_RUN, method=ALIGNED, seed=0, stage=0)
    stage.mark_done()
    return layout.result_rows()


def _seed_stage0(sub_out: Path, run: str, seed: int, aligned_rows: list[dict]) -> None:
    """Give a subset's run folder the aligned model's stage 0, so the stage loop does not evaluate it again."""
    layout = RunDir(sub_out)
    stage = layout.stage(run, 0)
    if stage.done:
        return
    method = parse_run_name(run)[0]
    layout.drop_results(run, 0)
    layout.append_results(aligned_rows, run=run, method=method, seed=seed)
    stage.mark_done(f"aligned model: evaluated once in the study's {ALIGNED}/")


def _subset_config(cfg, task, data_file: Path, name: str, seed: int):
    from gradsift.train.config import MethodSettings, TaskSettings

    sub = cfg.model_copy(deep=True)
    sub.tasks = [TaskSettings(name=f"{task.name}:{name}", path=str(data_file), n_train=None, n_eval=0,
                              max_length=task.max_length, seed=0)]
    sub.method = MethodSettings(name="standard")
    sub.seeds = [int(seed)]
    return sub


def _write_subset_file(records_by_row: Mapping[int, dict], rows: Sequence[int], path: Path) -> None:
    if path.exists():
        return
    write_jsonl(path, [{"messages": records_by_row[r]["messages"], "source_row": int(r)} for r in sorted(rows)])


# ----------------------------------------------------------------------------- the study


def _check_folder(out: Path, settings: dict[str, Any]) -> None:
    path = out / STUDY_FILE
    if not path.exists():
        return
    old = read_json(path, error=ValueError).get("fingerprint")
    if old is not None and old != settings:
        raise ValueError(f"{out} holds a study made with other settings ({old}, now {settings}); "
                         "pass another --output")


def run_offline_study(config: str | Path, output: str | Path | None = None, options: StudyOptions | None = None,
                      overrides: Mapping[str, Any] | None = None, progress: bool = True) -> Path:
    """Run the offline study of ``config`` (see the module docstring); return the output folder."""
    from rich.console import Console

    from gradsift.data.formatting import encode_records
    from gradsift.tasks import load_task
    from gradsift.train.config import ConfigError, MethodSettings, dump_config, load_config
    from gradsift.train.stages import build_base_model, build_tokenizer, make_eval_hook, run_training

    console = Console(stderr=True)
    options = options or StudyOptions()
    t_start = time.time()
    cfg = load_config(config, dict(overrides or {}))
    if not 0 <= options.task_index < len(cfg.tasks):
        raise ConfigError(f"--task {options.task_index}: the config has {len(cfg.tasks)} task(s)")
    for name in options.subsets:
        if name not in BASE_SUBSETS:
            raise ValueError(f"unknown subset {name!r}; choose from {', '.join(BASE_SUBSETS)}")
    task = cfg.tasks[options.task_index]
    seeds = [int(s) for s in (options.seeds or cfg.seeds)]
    study_cfg = cfg.model_copy(deep=True)
    study_cfg.tasks = [task]
    study_cfg.seeds = seeds
    study_cfg.method = [MethodSettings(name=n, rho=options.rho) for n in options.subsets if n in
                        ("high", "moderate", "low", "random")]
    out = Path(output if output is not None else Path(cfg.output_dir).with_name(Path(cfg.output_dir).name
                                                                                  + "-offline")).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {**options.fingerprint(), "task": task.model_dump(), "model": cfg.model.model_dump()}
    _check_folder(out, fingerprint)
    study = read_json(out / STUDY_FILE, error=ValueError) if (out / STUDY_FILE).exists() else {}
    times: dict[str, float] = study.get("times", {})
    cpu_times: dict[str, float] = study.get("cpu_times", {})  # process CPU seconds: the machine's load aside
    reference = _reference_name(cfg, options.reference_model)

    def save_study() -> None:
        opts = asdict(options)
        opts["capability"] = [asdict(c) for c in options.capability]
        (out / STUDY_FILE).write_text(json.dumps(
            {"fingerprint": fingerprint, "options": opts, "seeds": seeds, "task": task.name,
             "reference_model": reference, "times": times, "cpu_times": cpu_times}, indent=2, default=str))

    class phase:  # noqa: N801  (records the wall-clock and CPU seconds of one phase)
        def __init__(self, key: str) -> None:
            self.key = key

        def __enter__(self):
            self.t0, self.c0 = time.time(), time.process_time()

        def __exit__(self, *exc):
            if exc[0] is None:
                times[self.key] = time.time() - self.t0
                cpu_times[self.key] = time.process_time() - self.c0
                save_study()

    save_study()
    RunDir(out).config_file.write_text(dump_config(study_cfg))

    tokenizer = build_tokenizer(cfg.model)
    cache = out / "base_model" if cfg.model.config is not None else None
    model = build_base_model(cfg.model, tokenizer, cache)
    loaded = load_task(task.name, n_train=task.n_train, n_eval=task.n_eval, seed=task.seed, path=task.path)
    features = encode_records(tokenizer, loaded.train, task.max_length, source=loaded.source or task.name)
    records_by_row = {int(r["row"]): r for r in loaded.train}

    # 1. scores at the aligned weights
    if not (out / SCORES_FILE).exists():
        console.print(f"[bold]scoring[/] {len(features)} rows of {task.name} at the aligned weights")
        with phase("score_s"):
            _score_pool(model, tokenizer, task, features, options, out, reference)
    scores = pd.read_parquet(out / SCORES_FILE)

    # 2-3. subsets
    subsets = build_subsets(scores, options.rho, seeds, options.subsets)
    match_info = None
    if options.matched:
        from gradsift.analysis.matching import match_high_moderate
        from gradsift.select.rules import n_keep

        covs = [c for c in options.match_covariates if c in scores.columns]
        plain = build_subsets(scores, options.rho, seeds[:1], ("high", "moderate"))
        before = (plain["high"][seeds[0]], plain["moderate"][seeds[0]])
        result = match_high_moderate(scores, n_keep(len(scores), options.rho), covs, pool=options.match_pool,
                                     caliper=options.caliper, before=before)
        match_info = result.to_dict()
        if "ref_L" in options.match_covariates and "ref_L" not in scores.columns:
            match_info["notes"].append("no reference model: perplexity is matched through the aligned model's "
                                       "loss L (log-perplexity of the response)")
        if result.balanced or options.train_unbalanced:
            subsets["matched_high"] = {s: result.high_rows for s in seeds}
            subsets["matched_moderate"] = {s: result.moderate_rows for s in seeds}
        if not result.balanced:
            trained = "trained anyway" if options.train_unbalanced else "not trained"
            match_info["notes"].append(f"matching could not balance the covariates: the matched subsets were {trained}")
            console.print(f"[yellow]matching could not balance {', '.join(result.unbalanced) or 'the pairs'}: "
                          f"no matched effect is reported; the matched subsets are {trained}[/]")
    (out / SUBSETS_FILE).write_text(json.dumps(
        {"rho": options.rho, "n_rows": len(scores),
         "subsets": {n: {str(s): r for s, r in by_seed.items()} for n, by_seed in subsets.items()},
         "matching": match_info}, indent=2))

    # 4-5. the aligned model once, then each subset and seed
    from gradsift.configs import resolve_config

    base_hook = make_eval_hook(cfg.eval, base=resolve_config(config).resolve().parent)
    hook = _study_hook(base_hook, task, options.capability) if (base_hook or options.capability) else None
    if not _aligned(out)[1].done:
        console.print("[bold]evaluating[/] the aligned model")
        with phase("aligned_eval_s"):
            _evaluate_aligned(cfg, model, tokenizer, hook, out)
    aligned_rows = _aligned(out)[0].result_rows()
    del model

    for name, by_seed in subsets.items():
        for seed, rows in by_seed.items():
            key = f"{name}-seed{seed}"
            sub_out = out / "runs" / key
            run = run_name("standard", seed)
            if RunDir(sub_out).stage(run, 1).done:
                continue
            console.print(f"[bold]{key}[/]: fine-tuning on {len(rows)} rows")
            data_file = sub_out / "train.jsonl"
            _write_subset_file(records_by_row, rows, data_file)
            _seed_stage0(sub_out, run, seed, aligned_rows)
            with phase(f"{key}_s"):
                run_training(_subset_config(cfg, task, data_file, name, seed), output_dir=sub_out, eval_hook=hook)

    # 6. the online rule on the same rows
    if options.online:
        online_out = out / "online"
        online_cfg = cfg.model_copy(deep=True)
        online_cfg.tasks = [task]
        online_cfg.seeds = seeds
        online_cfg.method = [MethodSettings(name="random", rho=options.rho),
                             MethodSettings(name="moderate", rho=options.rho)]
        for m in ("random", "moderate"):
            for seed in seeds:
                _seed_stage0(online_out, run_name(m, seed), seed, aligned_rows)
        done_before = all(RunDir(online_out).stage(run_name(m, s), 1).done
                          for m in ("random", "moderate") for s in seeds)
        if not done_before:
            with phase("online_s"):
                run_training(online_cfg, output_dir=online_out, eval_hook=hook)

    save_study()
    tables = study_tables(out)
    console.print(f"[green]offline study[/]: {out / SUMMARY_FILE}  ({(time.time() - t_start) / 60:.1f} min)")
    del tables
    return out


# ----------------------------------------------------------------------------- reading the outcomes


def _arm_runs(out: Path) -> dict[str, dict[int, tuple[RunDir, str, int]]]:
    """Where each study arm and seed was evaluated: ``{arm: {seed: (run directory, run, stage)}}``."""
    found: dict[str, dict[int, tuple[RunDir, str, int]]] = {}
    aligned, stage = _aligned(out)
    if stage.done:
        found[ALIGNED] = {0: (aligned, ALIGNED_RUN, 0)}
    runs = out / "runs"
    if runs.exists():
        for d in sorted(runs.iterdir()):
            name, _, seed = d.name.rpartition("-seed")
            if not (d.is_dir() and seed.isdigit()):
                continue
            run = run_name("standard", int(seed))
            if RunDir(d).stage(run, 1).done:
                found.setdefault(name, {})[int(seed)] = (RunDir(d), run, 1)
    online = RunDir(out / "online")
    for run in online.run_names():
        method, seed = parse_run_name(run)
        if method in ("random", "moderate") and online.stage(run, 1).done:
            found.setdefault(f"online_{method}", {})[seed] = (online, run, 1)
    return found


def outcomes(stage: StageDir | str | Path) -> dict[tuple[str, str], dict[str, float]]:
    """Per-prompt outcomes of one evaluated model (a stage folder), read from its saved files.

    ``{(task, metric): {prompt id: value}}`` with the names of ``results.jsonl``: every
    outcome of :func:`gradsift.eval.outcomes.stage_outcomes` (``asr/<judge>`` 1 = attack
    success, NaN = unparsable; ``refusal_rate`` 1 = keyword refusal; ``over_refusal``
    1 = a safe prompt refused; a task's ``score``, here in percent) and
    ``capability/<bench>`` per metric (0/1 or a fraction). Values are fractions except the
    task score; :func:`study_tables` reports them in percent.
    """
    from gradsift.eval.outcomes import stage_outcomes

    if not isinstance(stage, StageDir):
        path = Path(stage)
        stage = StageDir(path, int(path.name.rpartition("_")[2]) if path.name.startswith("stage_") else 0)
    out: dict[tuple[str, str], dict[str, float]] = {}
    for (task, metric), series in stage_outcomes(stage).items():
        scale = 100.0 if metric == "score" else 1.0
        out[(task, metric)] = {str(i): float(v) * scale for i, v in series.items()}
    for bench, path in stage.capability_files().items():
        records = [r for _, r in iter_jsonl(path, error=ValueError)]
        metrics = sorted({k for r in records for k in r if k not in ("doc_id", "subset")})
        for m in metrics:
            out[(f"capability/{bench}", m)] = {f"{r['doc_id']}{r.get('subset') or ''}": float(r[m])
                                               for r in records if m in r}
    return out


def _scale(task: str, metric: str) -> float:
    return 1.0 if metric == "score" else 100.0


def _binary(values: np.ndarray) -> bool:
    v = values[~np.isnan(values)]
    return bool(np.isin(v, (0.0, 1.0)).all())


def _selection_lengths(stage: StageDir, scores: pd.DataFrame | None, rows: Sequence[int] | None) -> dict[str, float]:
    """Mean response length (tokens) of the kept samples: the subset's rows, or the online rule's kept rows."""
    sel = stage.selection
    if sel.exists():
        table = pd.read_parquet(sel)
        kept = table[table["kept"]]
        return {"kept_response_len": float(kept["response_len"].mean()) if len(kept) else math.nan,
                "all_response_len": float(table["response_len"].mean()) if len(table) else math.nan}
    if scores is not None and rows is not None:
        by_row = scores.set_index("row")
        kept = by_row.loc[list(rows)]
        return {"kept_response_len": float(kept["n_response_tokens"].mean()),
                "all_response_len": float(scores["n_response_tokens"].mean()),
                "kept_G_mean": float(kept["G"].mean()), "kept_L_mean": float(kept["L"].mean())}
    return {}


def study_tables(out: str | Path) -> dict[str, Any]:
    """Every table of the study, from the files the runs wrote; writes ``offline_study.json`` and ``.md``.

    Per arm (aligned, each subset, the online methods) and measurement: the mean and
    standard deviation over seeds of the evaluation's value, and a 95% bootstrap
    interval over prompts (of the per-prompt values averaged over seeds); per pair of
    :data:`COMPARISONS`: the paired test on the same prompts (exact McNemar on a
    single seed's binary outcomes, else a paired bootstrap of the per-prompt means; task
    scores always by the paired bootstrap).
    """
    from gradsift.analysis import stats

    out = Path(out)
    study = read_json(out / STUDY_FILE, error=ValueError) if (out / STUDY_FILE).exists() else {}
    scores = pd.read_parquet(out / SCORES_FILE) if (out / SCORES_FILE).exists() else None
    subsets_doc = read_json(out / SUBSETS_FILE, error=ValueError) if (out / SUBSETS_FILE).exists() else {}
    arms = _arm_runs(out)
    stages = {arm: {seed: layout.stage(run, stage) for seed, (layout, run, stage) in by_seed.items()}
              for arm, by_seed in arms.items()}
    per: dict[str, dict[int, dict]] = {arm: {s: outcomes(d) for s, d in by_seed.items()} for arm, by_seed in
                                       stages.items()}

    # the evaluation's own values (results.jsonl of each run)
    def results_of(arm: str, seed: int) -> dict[tuple[str, str], float]:
        layout, run, stage = arms[arm][seed]
        return {(r["task"], r["metric"]): float(r["value"]) for r in layout.result_rows()
                if r["run"] == run and int(r["stage"]) == stage and r["value"] is not None}

    keys = sorted({k for by_seed in per.values() for o in by_seed.values() for k in o})
    arms_table = []
    for arm, by_seed in per.items():
        for key in keys:
            task, metric = key
            vals = [results_of(arm, s).get(key, math.nan) for s in by_seed]
            mean, sd, n = stats.mean_sd(vals)
            ids = sorted({i for o in by_seed.values() for i in o.get(key, {})})
            if not ids:
                continue
            mat = np.array([[o.get(key, {}).get(i, math.nan) for i in ids] for o in by_seed.values()], dtype=float)
            with np.errstate(all="ignore"):
                prompt_mean = np.nanmean(mat, axis=0) * _scale(task, metric)
            lo, hi = stats.bootstrap_ci(prompt_mean)
            arms_table.append({"arm": arm, "label": LABELS.get(arm, arm), "task": task, "metric": metric,
                               "mean": mean, "sd": sd, "n_seeds": n, "ci_lo": lo, "ci_hi": hi,
                               "n_prompts": int(np.sum(~np.isnan(prompt_mean))),
                               "seeds": sorted(by_seed)})

    tests = []
    for a, b in COMPARISONS:
        if a not in per or b not in per:
            continue
        for key in keys:
            task, metric = key
            pa, pb = per[a], per[b]
            ids = sorted({i for o in pa.values() for i in o.get(key, {})} & {i for o in pb.values()
                                                                            for i in o.get(key, {})})
            if not ids:
                continue
            ma = np.array([[o.get(key, {}).get(i, math.nan) for i in ids] for o in pa.values()], dtype=float)
            mb = np.array([[o.get(key, {}).get(i, math.nan) for i in ids] for o in pb.values()], dtype=float)
            single = (ma.shape[0] == 1 and mb.shape[0] == 1 and metric != "score"
                      and _binary(ma) and _binary(mb))
            with np.errstate(all="ignore"):
                va, vb = np.nanmean(ma, axis=0), np.nanmean(mb, axis=0)
            res = stats.compare(va, vb, kind="binary" if single else "continuous")
            scale = _scale(task, metric)
            tests.append({"a": a, "b": b, "task": task, "metric": metric, "test": res["test"],
                          "diff": res["diff"] * scale, "lo": res["lo"] * scale, "hi": res["hi"] * scale,
                          "p": res["p"], "n": res["n"]})

    lengths = {}
    for arm, by_seed in stages.items():
        for seed, d in by_seed.items():
            rows = (subsets_doc.get("subsets", {}).get(arm, {}) or {}).get(str(seed))
            info = _selection_lengths(d, scores, rows)
            if info:
                lengths.setdefault(arm, {})[seed] = info

    doc = {"task": study.get("task"), "seeds": study.get("seeds"), "options": study.get("options"),
           "reference_model": study.get("reference_model"), "times": study.get("times", {}),
           "cpu_times": study.get("cpu_times", {}),
           "n_rows": subsets_doc.get("n_rows"), "arms": arms_table, "tests": tests, "lengths": lengths,
           "matching": subsets_doc.get("matching"), "correlations": _correlations(scores),
           "composition": _composition(scores, subsets_doc)}
    (out / TABLES_FILE).write_text(json.dumps(doc, indent=2, default=_json_default))
    _merge_results(out, arms)
    (out / SUMMARY_FILE).write_text(summary_markdown(doc))
    return doc


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    return str(o)


def _correlations(scores: pd.DataFrame | None) -> dict[str, dict]:
    from gradsift.analysis import stats

    if scores is None:
        return {}
    return {c: stats.spearman(scores["G"], scores[c]) for c in ("n_response_tokens", "L", "ref_L")
            if c in scores.columns}


def _composition(scores: pd.DataFrame | None, subsets_doc: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Mean G, loss, response length (and reference log-perplexity) of each subset's rows (first seed)."""
    if scores is None or not subsets_doc.get("subsets"):
        return {}
    by_row = scores.set_index("row")
    cols = [c for c in ("G", "L", "n_response_tokens", "ref_L") if c in scores.columns]
    out = {"all": {"n": len(scores), **{c: float(scores[c].mean()) for c in cols}}}
    for name, by_seed in subsets_doc["subsets"].items():
        rows = next(iter(by_seed.values()), [])
        if rows:
            sub = by_row.loc[list(rows)]
            out[name] = {"n": len(rows), **{c: float(sub[c].mean()) for c in cols}}
    return out


def _merge_results(out: Path, arms: Mapping[str, Mapping[int, tuple[RunDir, str, int]]]) -> None:
    """The top-level ``results.jsonl`` (derived): every arm as a run ``<arm>-seed<s>`` of the report."""
    rows = []
    for arm, by_seed in arms.items():
        for seed, (layout, run, _) in by_seed.items():
            name = ALIGNED_RUN if arm == ALIGNED else run_name(arm, seed)
            rows.extend({**r, "run": name, "method": arm} for r in layout.result_rows() if r["run"] == run)
    RunDir(out).write_results(rows)


# ----------------------------------------------------------------------------- markdown


def _fmt(v: float, nd: int = 1) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


MAIN_COLUMNS = (("refusal_rate", "safety/"), ("asr/keyword", "safety/"), ("asr/heuristic", "safety/"),
                ("over_refusal", "overrefusal/"), ("score", ""), ("acc", "capability/"))


def table_columns(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (task, metric) columns of the study table, in display order."""
    have = sorted({(r["task"], r["metric"]) for r in doc.get("arms", [])})
    cols = []
    for metric, prefix in MAIN_COLUMNS:
        for task, m in have:
            if m == metric and (task.startswith(prefix) if prefix else "/" not in task):
                cols.append((task, m))
    return cols


def arm_order(doc: Mapping[str, Any]) -> list[str]:
    arms = list(dict.fromkeys(r["arm"] for r in doc.get("arms", [])))
    order = [ALIGNED, *BASE_SUBSETS, *MATCHED_SUBSETS, "online_random", "online_moderate"]
    return [a for a in order if a in arms] + [a for a in arms if a not in order]


def summary_markdown(doc: Mapping[str, Any]) -> str:
    """The study's tables as markdown (what ``offline_study.md`` holds)."""
    cols = table_columns(doc)
    cell = {(r["arm"], r["task"], r["metric"]): r for r in doc.get("arms", [])}
    lines = [f"# Offline study: {doc.get('task')}", ""]
    opts = doc.get("options") or {}
    lines.append(f"rho {opts.get('rho')}, seeds {doc.get('seeds')}, {doc.get('n_rows')} rows scored at the aligned "
                 "weights. Cells: mean over seeds (± sd when several) [95% bootstrap CI over prompts].")
    lines.append("")
    head = ["subset"] + [f"{t} {m}" for t, m in cols] + ["response tokens (kept)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for arm in arm_order(doc):
        if arm.startswith("matched_") and not _matched_ok(doc):
            continue  # unbalanced: no matched effect is printed (the diagnostics below say why)
        cells = [LABELS.get(arm, arm)]
        for t, m in cols:
            r = cell.get((arm, t, m))
            if r is None:
                cells.append("")
                continue
            sd = f" ± {_fmt(r['sd'])}" if r["n_seeds"] > 1 else ""
            cells.append(f"{_fmt(r['mean'])}{sd} [{_fmt(r['ci_lo'])}, {_fmt(r['ci_hi'])}]")
        lens = [v.get("kept_response_len", math.nan) for v in (doc.get("lengths", {}).get(arm) or {}).values()]
        cells.append(_fmt(float(np.mean(lens))) if lens else "")
        lines.append("| " + " | ".join(cells) + " |")
    tests = [t for t in doc.get("tests", []) if (t["task"], t["metric"]) in cols]
    if tests:
        lines += ["", "Paired tests on the same prompts (A - B, percentage points):", "",
                  "| A | B | measurement | diff [95% CI] | p | test | n |", "|---|---|---|---|---|---|---|"]
        for t in tests:
            if t["a"].startswith("matched") and not _matched_ok(doc):
                continue
            lines.append(f"| {LABELS.get(t['a'], t['a'])} | {LABELS.get(t['b'], t['b'])} | {t['task']} {t['metric']} | "
                         f"{_fmt(t['diff'])} [{_fmt(t['lo'])}, {_fmt(t['hi'])}] | {_fmt_p(t['p'])} | {t['test']} | "
                         f"{t['n']} |")
    m = doc.get("matching")
    if m:
        lines += ["", f"Matched ablation: {m['method']}; {m['n_pairs']} pairs of {m['k_wanted']} wanted "
                  f"(pools of {m['pool_sizes'][0]} and {m['pool_sizes'][1]} rows).", "",
                  "| covariate | SMD before (plain subsets) | SMD of the pools | SMD after matching | balanced |",
                  "|---|---|---|---|---|"]
        for b in m["balance"]:
            bal = "" if b["balanced"] is None else ("yes" if b["balanced"] else "**no**")
            lines.append(f"| {b['covariate']} | {_fmt(b['smd_before'], 2)} | {_fmt(b['smd_pools'], 2)} | "
                         f"{_fmt(b['smd_after'], 2)} | {bal} |")
        if not _matched_ok(doc):
            why = ", ".join(m.get("unbalanced") or []) or "too few pairs"
            lines += ["", f"**No matched effect is reported: matching could not balance {why} "
                      f"(|SMD| > 0.1 after matching).**"]
        for note in m.get("notes") or []:
            lines.append(f"- {note}")
    comp = doc.get("composition") or {}
    if comp:
        cols = [c for c in ("G", "L", "n_response_tokens", "ref_L") if c in comp.get("all", {})]
        lines += ["", "Subset composition (means over the subset's rows):", "",
                  "| subset | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for name, v in comp.items():
            lines.append(f"| {LABELS.get(name, name)} | {v['n']} | " + " | ".join(_fmt(v[c], 3) for c in cols) + " |")
    corr = doc.get("correlations") or {}
    if corr:
        lines += ["", "Spearman correlation of G_i with: " + ", ".join(
            f"{c} {_fmt(v['rho'], 2)}" for c, v in corr.items())]
    times = doc.get("times") or {}
    cpu = doc.get("cpu_times") or {}
    if times:
        lines += ["", "Times, wall-clock s (process CPU s): " + ", ".join(
            f"{k.removesuffix('_s')} {v:.0f}" + (f" ({cpu[k]:.0f})" if k in cpu else "") for k, v in times.items())]
    return "\n".join(lines) + "\n"


def _matched_ok(doc: Mapping[str, Any]) -> bool:
    m = doc.get("matching")
    return bool(m and m.get("balanced"))
