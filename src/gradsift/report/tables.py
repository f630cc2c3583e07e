"""Tables of a run: the paper-style summary, ASR per stage, per-category ASR, selection stats.

Every number is a mean over seeds of a per-run quantity; the standard deviation
(sample, ddof=1) is given only when more than one seed has a value.

Where the run saved its generations, the prompt-level measures also get a 95%
bootstrap confidence interval over prompts and a paired test against the
reference method (Moderate-G_i, ``moderate``) on the same prompts
(:mod:`gradsift.analysis.stats`):

* the interval resamples prompts; a prompt's value is its outcome averaged over the
  seeds (and over the checkpoints, for a measure averaged over checkpoints);
* a verdict at one checkpoint (final ASR, ASR at stage k) is tested with the exact
  McNemar test on the pairs (seed, prompt), seed s of a method against seed s of the
  reference; a measure averaged over checkpoints, and a task score, with a paired
  bootstrap over prompts of the per-prompt difference (the prompt is the resampled
  unit, so the checkpoints and seeds of one prompt stay together).

The primary safety metric is the attack success rate on the primary safety set,
judged by the primary judge and averaged over the checkpoints (stages 0..K), the
way the paper reports it. The primary judge is the one asked for
(the ``judge`` argument, ``gradsift report --judge``), else the first one measured
in the order :data:`JUDGE_PREFERENCE`: trained safety classifiers first (Llama
Guard is the paper's judge), then the string heuristics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gradsift.store import RunStore

__all__ = [
    "JUDGE_PREFERENCE",
    "REFERENCE_METHOD",
    "Column",
    "comparison_table",
    "PAPER_COLUMNS",
    "asr_per_stage",
    "category_asr_table",
    "format_value",
    "judges_measured",
    "metric_per_stage",
    "paper_columns_for",
    "paper_table",
    "primary_judge",
    "primary_safety_set",
    "prompt_frame",
    "prompt_interval",
    "paired_test",
    "reference_method",
    "run_metrics",
    "stage_intervals",
    "selection_table",
    "summary_markdown",
    "timing_table",
]

JUDGE_PREFERENCE = ("llamaguard", "harmbench", "openai", "heuristic", "keyword")
MISSING = "—"
REFERENCE_METHOD = "moderate"
LEVEL = 0.95
N_RESAMPLES = 10000


@dataclass(frozen=True)
class Column:
    """One column of the paper table: ``key`` in :func:`run_metrics`, a label and a number format."""

    key: str
    label: str
    fmt: str = ".1f"
    better: str = ""  # "lower", "higher" or "" (no direction)
    help: str = ""


def _paper_columns(judge: str | None) -> list[Column]:
    j = judge or "no judge"
    return [
        Column("asr", f"ASR ({j})" if judge else "ASR", better="lower",
               help=f"attack success rate (%) judged by {j}, mean over checkpoints 0..K"),
        Column("asr_keyword", "ASR (keyword)", better="lower",
               help="% of harmful prompts answered without a refusal string, mean over checkpoints"),
        Column("asr_heuristic", "harmful compliance (heuristic)", better="lower",
               help="% of harmful prompts the heuristic judge calls compliant, mean over checkpoints"),
        Column("refusal_rate", "refusal rate", better="higher",
               help="% of harmful prompts refused (keyword), mean over checkpoints"),
        Column("over_refusal", "over-refusal", better="lower",
               help="% of safe prompts refused, mean over checkpoints"),
        Column("AA", "AA", better="higher", help="average task score after the last stage"),
        Column("BWT", "BWT", ".2f", better="higher", help="backward transfer (negative: forgetting)"),
        Column("FM", "FM", ".2f", better="lower", help="forgetting measure"),
        Column("max_drop", "max drop", ".2f", better="lower", help="largest fall of a task score in one stage"),
        Column("final_asr", f"final ASR ({j})" if judge else "final ASR", better="lower",
               help="ASR after the last stage"),
        Column("kept_fraction", "kept fraction", ".3f", help="fraction of the training samples stepped on"),
        Column("train_time_s", "train time (s)", ".1f", help="training wall-clock, all stages"),
    ]


PAPER_COLUMNS = _paper_columns(None)


# --------------------------------------------------------------------------- choices


def judges_measured(store: RunStore, safety_set: str | None = None) -> list[str]:
    """Judges with an ``asr/<judge>`` row (on ``safety_set`` or any set), preference order first."""
    tasks = [safety_set] if safety_set else store.task_names("safety/")
    found: set[str] = set()
    for t in tasks:
        for m in store.metric_names(t, "asr/"):
            parts = m.split("/")
            if len(parts) == 2:
                found.add(parts[1])
    return [j for j in JUDGE_PREFERENCE if j in found] + sorted(found - set(JUDGE_PREFERENCE))


def _configured_sets(store: RunStore) -> list[str]:
    """``safety/<label>`` of the sets in the run config's ``eval.safety`` list, in config order."""
    ev = store.config.get("eval")
    items = ev.get("safety") if isinstance(ev, dict) else None
    out = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not item.get("set"):
            continue
        spec = str(item["set"])
        label = item.get("name") or (Path(spec).stem if Path(spec).suffix else spec.lower())
        out.append(f"safety/{label}")
    return out


def primary_safety_set(store: RunStore) -> str | None:
    """The safety set of the headline ASR (attack-free sets only, when there are any): an AdvBench set
    if measured (the paper's), else the first set of the config's ``eval.safety`` list, else the first
    measured set by name."""
    sets = store.task_names("safety/")
    plain = [s for s in sets if "@" not in s] or sets
    for s in plain:
        if s.split("/", 1)[1].lower().startswith("advbench"):
            return s
    for s in _configured_sets(store):
        if s in plain:
            return s
    return plain[0] if plain else None


def primary_judge(store: RunStore, judge: str | None = None) -> str | None:
    """The judge of the headline ASR: ``judge`` when given (it must have been measured), else the
    first measured one in :data:`JUDGE_PREFERENCE`; None when no ASR was measured."""
    measured = judges_measured(store, primary_safety_set(store))
    if judge:
        if judge not in measured:
            raise ValueError(f"judge {judge!r} was not measured in {store.path}; "
                             f"measured: {', '.join(measured) or 'none'}")
        return judge
    return measured[0] if measured else None


# --------------------------------------------------------------------------- per run


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def _sum(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.sum(kept)) if kept else math.nan


def run_metrics(store: RunStore, judge: str | None = None) -> pd.DataFrame:
    """One row per run: ``run, method, seed`` and every :data:`PAPER_COLUMNS` key (NaN when not measured)."""
    from gradsift.eval.forgetting import forgetting

    sset = primary_safety_set(store)
    j = primary_judge(store, judge)
    over_sets = store.task_names("overrefusal/")
    over_set = over_sets[0] if over_sets else None
    train_stages = list(range(1, store.n_stages + 1))
    records = []
    for run in store.runs:
        rec: dict[str, float | str | int | None] = {"run": run, "method": store.run_method(run),
                                                    "seed": store.run_seed(run)}

        def over_stages(task: str | None, metric: str) -> float:
            return _mean(store.series(run, task, metric)) if task else math.nan

        rec["asr"] = over_stages(sset, f"asr/{j}") if j else math.nan
        rec["asr_keyword"] = over_stages(sset, "asr/keyword")
        rec["asr_heuristic"] = over_stages(sset, "asr/heuristic")
        rec["refusal_rate"] = over_stages(sset, "refusal_rate")
        rec["over_refusal"] = over_stages(over_set, "over_refusal")
        fm = {"AA": math.nan, "BWT": math.nan, "FM": math.nan, "max_drop": math.nan}
        if store.tasks:
            from gradsift.eval.outcomes import score_matrix

            R, _ = score_matrix(store, run)
            try:
                fm = forgetting(R)
            except ValueError:  # a score on or below the diagonal is missing
                pass
        rec.update(fm)
        rec["final_asr"] = store.value(run, store.n_stages, sset, f"asr/{j}") if (j and sset) else math.nan
        kept, runtime = [], []
        for k, task in zip(train_stages, store.tasks):
            kept.append(store.value(run, k, task, "train/kept_fraction"))
            runtime.append(store.value(run, k, task, "train/runtime_s"))
        rec["kept_fraction"] = _mean(kept)
        rec["train_time_s"] = _sum(runtime)
        records.append(rec)
    cols = ["run", "method", "seed"] + [c.key for c in PAPER_COLUMNS]
    return pd.DataFrame(records, columns=cols)


# --------------------------------------------------------------------------- over seeds


def _aggregate(frame: pd.DataFrame, keys: Sequence[str], by: str = "method",
               order: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, std (ddof=1, only with > 1 value) and count per group, as ``key``, ``key_std``, ``key_n``."""
    out = {}
    groups = order if order is not None else list(dict.fromkeys(frame[by]))
    for g in groups:
        sub = frame[frame[by] == g]
        row: dict[str, float] = {"n_seeds": float(len(sub))}
        for k in keys:
            vals = sub[k].astype(float).dropna().to_numpy()
            row[k] = float(vals.mean()) if len(vals) else math.nan
            row[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
            row[f"{k}_n"] = float(len(vals))
        out[g] = row
    table = pd.DataFrame.from_dict(out, orient="index")
    table.index.name = by
    if len(table):
        table["n_seeds"] = table["n_seeds"].astype(int)
    return table


def paper_table(store: RunStore, judge: str | None = None) -> pd.DataFrame:
    """The paper-style table: one row per method (index), columns ``n_seeds`` and for each
    :data:`PAPER_COLUMNS` key the mean over seeds (``key``), its std (``key_std``, NaN with
    one seed) and the number of seeds with a value (``key_n``).

    For the prompt-level keys (ASR, refusal, over-refusal, final ASR) with saved generations,
    also ``key_lo``/``key_hi`` (95% bootstrap interval over prompts) and ``key_p`` (paired test
    against :func:`reference_method`, NaN for the reference); NaN where not available.
    """
    per_run = run_metrics(store, judge)
    methods = [m for m in store.methods if (per_run["method"] == m).any()]
    table = _aggregate(per_run, [c.key for c in PAPER_COLUMNS], order=methods)
    measures = _prompt_measures(store, judge)
    ref = reference_method(store)
    for key in [c.key for c in PAPER_COLUMNS if c.key in measures]:
        task, metric, stages = measures[key]
        lo, hi, p = [], [], []
        for method in table.index:
            a, b, _ = prompt_interval(store, method, task, metric, stages)
            t = paired_test(store, method, ref, task, metric, stages) if ref and method != ref else None
            lo.append(a)
            hi.append(b)
            p.append(t["p"] if t else math.nan)
        if len(table):
            table[f"{key}_lo"], table[f"{key}_hi"], table[f"{key}_p"] = lo, hi, p
    return table


# --------------------------------------------------------------------------- over prompts


def reference_method(store: RunStore) -> str | None:
    """The method every other one is tested against: Moderate-G_i when the run has it."""
    return REFERENCE_METHOD if REFERENCE_METHOD in store.methods else None


def _prompt_measures(store: RunStore, judge: str | None = None) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Paper-table keys with a per-prompt form: key -> (task, metric, checkpoints averaged)."""
    sset = primary_safety_set(store)
    j = primary_judge(store, judge)
    over_sets = store.task_names("overrefusal/")
    every = tuple(store.stages)
    out: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    if sset:
        if j:
            out["asr"] = (sset, f"asr/{j}", every)
            out["final_asr"] = (sset, f"asr/{j}", (store.n_stages,))
        out["asr_keyword"] = (sset, "asr/keyword", every)
        out["asr_heuristic"] = (sset, "asr/heuristic", every)
        out["refusal_rate"] = (sset, "refusal_rate", every)
    if over_sets:
        out["over_refusal"] = (over_sets[0], "over_refusal", every)
    return out


def prompt_frame(store: RunStore, method: str, task: str, metric: str,
                 stages: Sequence[int] | None = None) -> pd.DataFrame:
    """Long table ``seed, stage, id, value`` of the per-prompt outcomes of one method
    (:func:`gradsift.eval.outcomes.prompt_outcomes`); empty when no generations were saved."""
    from gradsift.eval.outcomes import prompt_outcomes

    parts = []
    for run in store.runs_of(method):
        seed = store.run_seed(run)
        for stage in store.stages if stages is None else stages:
            s = prompt_outcomes(store, run, stage, task, metric)
            if s is None or not len(s):
                continue
            parts.append(pd.DataFrame({"seed": seed, "stage": stage, "id": s.index.to_numpy(),
                                       "value": s.to_numpy(float)}))
    if not parts:
        return pd.DataFrame({"seed": pd.Series(dtype="int64"), "stage": pd.Series(dtype="int64"),
                             "id": pd.Series(dtype=str), "value": pd.Series(dtype=float)})
    return pd.concat(parts, ignore_index=True)


def prompt_interval(store: RunStore, method: str, task: str, metric: str,
                    stages: Sequence[int] | None = None) -> tuple[float, float, int]:
    """``(lo, hi, n_prompts)``: the 95% bootstrap interval over prompts of the measure in percent
    (a prompt's value: its outcome averaged over seeds and ``stages``); NaN without generations."""
    from gradsift.analysis.stats import bootstrap_ci

    key = ("interval", method, task, metric, tuple(stages) if stages is not None else None)
    if key not in store.cache:
        frame = prompt_frame(store, method, task, metric, stages).dropna(subset=["value"])
        if not len(frame):
            store.cache[key] = (math.nan, math.nan, 0)
        else:
            per_prompt = frame.groupby("id", sort=False)["value"].mean().to_numpy(float)
            lo, hi = bootstrap_ci(per_prompt, level=LEVEL, n_resamples=N_RESAMPLES, seed=0)
            store.cache[key] = (100.0 * lo, 100.0 * hi, int(per_prompt.size))
    return store.cache[key]


def paired_test(store: RunStore, method: str, reference: str | None, task: str, metric: str,
                stages: Sequence[int] | None = None) -> dict | None:
    """``method`` against ``reference`` on the same prompts (and seeds, and checkpoints).

    Returns the :func:`gradsift.analysis.stats.compare` dict with ``diff``, ``lo``, ``hi`` in
    percentage points (method minus reference), ``p``, ``n`` (pairs tested: (seed, prompt)
    pairs for McNemar, prompts for the bootstrap), ``test`` and ``vs``; None when the two share
    no prompt outcome (no generations, or no seed in common).
    """
    from gradsift.analysis.stats import compare
    from gradsift.eval.outcomes import outcome_kind

    if reference is None or method == reference:
        return None
    key = ("paired", method, reference, task, metric, tuple(stages) if stages is not None else None)
    if key in store.cache:
        return store.cache[key]
    a = prompt_frame(store, method, task, metric, stages)
    b = prompt_frame(store, reference, task, metric, stages)
    both = a.merge(b, on=["seed", "stage", "id"], suffixes=("_a", "_b")).dropna(subset=["value_a", "value_b"])
    out = None
    if len(both):
        single = both["stage"].nunique() == 1
        if outcome_kind(metric) == "binary" and single:
            out = compare(both["value_a"].to_numpy(), both["value_b"].to_numpy(), kind="binary", level=LEVEL)
        else:
            per = both.groupby("id", sort=False)[["value_a", "value_b"]].mean()
            out = compare(per["value_a"].to_numpy(), per["value_b"].to_numpy(), kind="continuous", level=LEVEL,
                          n_resamples=N_RESAMPLES, seed=0)
        for k in ("diff", "lo", "hi"):
            out[k] = 100.0 * out[k]
        out["vs"] = reference
    store.cache[key] = out
    return out


def stage_intervals(store: RunStore, task: str, metric: str) -> pd.DataFrame:
    """Per method and checkpoint: ``method, stage, lo, hi, n_prompts, p, diff, test`` (the 95% interval
    over prompts and the paired test against the reference method at that checkpoint)."""
    ref = reference_method(store)
    rows = []
    for method in store.methods:
        if not store.runs_of(method):
            continue
        for s in store.stages:
            lo, hi, n = prompt_interval(store, method, task, metric, (s,))
            t = paired_test(store, method, ref, task, metric, (s,))
            rows.append({"method": method, "stage": s, "lo": lo, "hi": hi, "n_prompts": n,
                         "p": t["p"] if t else math.nan, "diff": t["diff"] if t else math.nan,
                         "test": t["test"] if t else ""})
    return pd.DataFrame(rows, columns=["method", "stage", "lo", "hi", "n_prompts", "p", "diff", "test"])


def comparison_table(store: RunStore, judge: str | None = None) -> pd.DataFrame:
    """Every paired test of a method against the reference method, one row each:
    ``measure, label, method, vs, value, lo, hi, diff, diff_lo, diff_hi, p, test, n``.

    The measures: the paper table's prompt-level columns and each task's score after the last
    stage. ``value``/``lo``/``hi``: the method's mean over seeds and its interval over prompts;
    ``diff``/``diff_lo``/``diff_hi``: method minus reference in points with its interval. Empty
    when there is no reference method or no saved generations.
    """
    ref = reference_method(store)
    cols = ["measure", "label", "method", "vs", "value", "lo", "hi", "diff", "diff_lo", "diff_hi", "p", "test", "n"]
    if ref is None:
        return pd.DataFrame(columns=cols)
    labels = {c.key: c.label for c in paper_columns_for(store, judge)}
    measures = [(key, labels.get(key, key), *spec) for key, spec in _prompt_measures(store, judge).items()]
    last = (store.n_stages,)
    measures += [(f"score:{t}", f"score on {t} after stage {store.n_stages}", t, "score", last) for t in store.tasks]
    rows = []
    seen: set[tuple] = set()
    for key, label, task, metric, stages in measures:
        if (task, metric, stages) in seen or not len(store.rows(task=task, metric=metric)):
            continue  # the same numbers under another column (asr is asr_<judge>), or never measured
        seen.add((task, metric, stages))
        for method in store.methods:
            if method == ref or not store.runs_of(method):
                continue
            t = paired_test(store, method, ref, task, metric, stages)
            if t is None:
                continue
            lo, hi, _ = prompt_interval(store, method, task, metric, stages)
            vals = [_mean(store.series(r, task, metric, list(stages))) for r in store.runs_of(method)]
            rows.append({"measure": key, "label": label, "method": method, "vs": ref, "value": _mean(vals),
                         "lo": lo, "hi": hi, "diff": t["diff"], "diff_lo": t["lo"], "diff_hi": t["hi"],
                         "p": t["p"], "test": t["test"], "n": t["n"]})
    return pd.DataFrame(rows, columns=cols)


def metric_per_stage(store: RunStore, task: str, metric: str) -> pd.DataFrame:
    """Long table ``method, stage, mean, std, n`` of one measurement over seeds, stages 0..K."""
    rows = []
    for method in store.methods:
        runs = store.runs_of(method)
        if not runs:
            continue
        per_run = np.array([store.series(r, task, metric) for r in runs], dtype=float)
        for s in store.stages:
            vals = per_run[:, s][~np.isnan(per_run[:, s])]
            rows.append({"method": method, "stage": s,
                         "mean": float(vals.mean()) if len(vals) else math.nan,
                         "std": float(vals.std(ddof=1)) if len(vals) > 1 else math.nan,
                         "n": int(len(vals))})
    return pd.DataFrame(rows, columns=["method", "stage", "mean", "std", "n"])


def asr_per_stage(store: RunStore, judge: str | None = None, safety_set: str | None = None,
                  stat: str = "mean") -> pd.DataFrame:
    """ASR per stage: index method, columns stages 0..K, the ``stat`` (mean, std or n) over seeds."""
    sset = safety_set or primary_safety_set(store)
    j = judge or primary_judge(store)
    if sset is None or j is None:
        return pd.DataFrame(index=pd.Index([], name="method"), columns=store.stages, dtype=float)
    long = metric_per_stage(store, sset, f"asr/{j}")
    wide = long.pivot(index="method", columns="stage", values=stat)
    wide = wide.reindex([m for m in store.methods if m in wide.index])
    wide.columns.name = "stage"
    return wide


def category_asr_table(store: RunStore, judge: str | None = None) -> tuple[pd.DataFrame, str | None]:
    """Per-category ASR on the primary set, mean over checkpoints then over seeds.

    Returns ``(table, judge)``: index category, one column per method; the judge is the
    primary one if it reports categories, else the first judge that does (None: no categories).
    """
    sset = primary_safety_set(store)
    if sset is None:
        return pd.DataFrame(), None
    metrics = store.metric_names(sset, "asr/")
    by_judge: dict[str, list[str]] = {}
    for m in metrics:
        parts = m.split("/", 2)
        if len(parts) == 3:
            by_judge.setdefault(parts[1], []).append(parts[2])
    if not by_judge:
        return pd.DataFrame(), None
    j = primary_judge(store, judge)
    if j not in by_judge:
        j = next(x for x in list(JUDGE_PREFERENCE) + sorted(by_judge) if x in by_judge)
    table = {}
    for method in store.methods:
        runs = store.runs_of(method)
        if not runs:
            continue
        col = {}
        for cat in sorted(by_judge[j]):
            col[cat] = _mean([_mean(store.series(r, sset, f"asr/{j}/{cat}")) for r in runs])
        table[method] = col
    frame = pd.DataFrame(table)
    frame.index.name = "category"
    return frame, j


SELECTION_METRICS = ("train/kept_fraction", "train/G_kept_mean", "train/G_dropped_mean", "train/L_kept_mean",
                     "train/L_all_mean", "train/response_len_kept", "train/response_len_dropped")


def selection_table(store: RunStore) -> pd.DataFrame:
    """Selection statistics per method and stage (mean over seeds): the ``train/*`` summaries."""
    rows = []
    for method in store.methods:
        runs = store.runs_of(method)
        for k, task in enumerate(store.tasks, start=1):
            rec: dict[str, object] = {"method": method, "stage": k, "task": task}
            any_value = False
            for m in SELECTION_METRICS:
                v = _mean([store.value(r, k, task, m) for r in runs])
                any_value |= not math.isnan(v)
                rec[m.removeprefix("train/")] = v
            if any_value:
                rows.append(rec)
    columns = ["method", "stage", "task"] + [m.removeprefix("train/") for m in SELECTION_METRICS]
    return pd.DataFrame(rows, columns=columns)


def timing_table(store: RunStore) -> pd.DataFrame:
    """Wall-clock per method (mean over seeds, seconds): training and evaluation, summed over stages."""
    rows = []
    for method in store.methods:
        runs = store.runs_of(method)
        if not runs:
            continue
        train = [_sum([store.value(r, k, t, "train/runtime_s") for k, t in enumerate(store.tasks, start=1)])
                 for r in runs]
        evals = [_sum(store.series(r, "_eval", "runtime_s")) for r in runs]
        steps = [_sum([store.value(r, k, t, "train/steps") for k, t in enumerate(store.tasks, start=1)])
                 for r in runs]
        rows.append({"method": method, "train_s": _mean(train), "eval_s": _mean(evals), "steps": _mean(steps)})
    return pd.DataFrame(rows, columns=["method", "train_s", "eval_s", "steps"])


# --------------------------------------------------------------------------- text


def format_value(mean: float, std: float = math.nan, fmt: str = ".1f") -> str:
    """``"12.3 ± 0.4"``, ``"12.3"`` (no std) or ``"—"`` (missing)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return MISSING
    text = format(mean, fmt)
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {format(std, fmt)}"
    return text


def _cell(table: pd.DataFrame, method: str, col: Column) -> str:
    return format_value(table.at[method, col.key], table.at[method, f"{col.key}_std"], col.fmt)


def paper_columns_for(store: RunStore, judge: str | None = None) -> list[Column]:
    """:data:`PAPER_COLUMNS` with the primary judge named in the labels."""
    return _paper_columns(primary_judge(store, judge))


def summary_markdown(store: RunStore, judge: str | None = None) -> str:
    """The short markdown summary: the paper table and one line per method."""
    table = paper_table(store, judge)
    cols = paper_columns_for(store, judge)
    j = primary_judge(store, judge)
    sset = primary_safety_set(store)
    lines = [f"## gradsift run: {store.path.name}", ""]
    safety = (f"ASR on {sset.removeprefix('safety/')} judged by {j}, mean over checkpoints 0..{store.n_stages}"
              if sset and j else "not measured")
    lines.append(f"Tasks in order: {' -> '.join(store.tasks) or MISSING}; seeds: "
                 f"{', '.join(map(str, store.seeds)) or MISSING}; safety: {safety}.")
    lines.append("")
    if not len(table):
        lines.append("No results yet.")
        return "\n".join(lines) + "\n"
    lines.append("| method | seeds | " + " | ".join(c.label for c in cols) + " |")
    lines.append("|---|---:|" + "---:|" * len(cols))
    for method in table.index:
        cells = [_cell(table, method, c) for c in cols]
        lines.append(f"| {method} | {int(table.at[method, 'n_seeds'])} | " + " | ".join(cells) + " |")
    lines.append("")
    def fmt(method: str, key: str, spec: str = ".1f", unit: str = "") -> str:
        text = format_value(table.at[method, key], math.nan, spec)
        return text if text == MISSING else text + unit

    for method in table.index:
        n = int(table.at[method, "n_seeds"])
        parts = [f"ASR {fmt(method, 'asr', unit='%')} (final {fmt(method, 'final_asr', unit='%')})",
                 f"AA {fmt(method, 'AA')}", f"BWT {fmt(method, 'BWT', '+.2f')}"]
        if not math.isnan(table.at[method, "kept_fraction"]):
            parts.append(f"kept {100 * table.at[method, 'kept_fraction']:.0f}% of the samples")
        parts.append(f"training {fmt(method, 'train_time_s', unit=' s')}")
        lines.append(f"- **{method}** ({n} seed{'s' if n != 1 else ''}): " + ", ".join(parts))
    tests = comparison_table(store, judge)
    if len(tests):
        ref = tests["vs"].iloc[0]
        lines += ["", f"Paired tests against {ref} on the same prompts (difference in points, 95% interval):", "",
                  "| measure | method | value [95% CI] | diff vs " + str(ref) + " [95% CI] | p | test |",
                  "|---|---|---:|---:|---:|---|"]
        for _, r in tests.iterrows():
            p = r["p"]
            p_text = MISSING if math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")
            lines.append(f"| {r['label']} | {r['method']} | {format_value(r['value'])} "
                         f"[{format_value(r['lo'])}, {format_value(r['hi'])}] | {r['diff']:+.1f} "
                         f"[{r['diff_lo']:+.1f}, {r['diff_hi']:+.1f}] | {p_text} | {r['test']} |")
    return "\n".join(lines) + "\n"
