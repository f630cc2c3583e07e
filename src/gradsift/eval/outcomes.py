"""What a run's saved generations mean: the per-prompt outcome behind each measurement.

A ``results.jsonl`` value is a mean over prompts; the report's confidence intervals and
paired tests need the prompts one by one. :func:`prompt_outcomes` reads them back from the
generations a stage saved (through :class:`gradsift.store.RunStore`) and re-applies the
judge verdicts, the keyword detector and the task metrics that made the value.
:func:`score_matrix` is a run's task scores as the matrix of :mod:`gradsift.eval.forgetting`.
Everything read is cached on the store (``store.cache``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from gradsift.eval.forgetting import results_to_matrix
from gradsift.eval.generation import load_generations
from gradsift.eval.judges import keyword_refusals
from gradsift.eval.metrics import TASK_METRICS
from gradsift.store import RunDirError, RunStore, StageDir

__all__ = ["outcome_kind", "prompt_outcomes", "read_generations", "score_matrix", "stage_generations", "stage_outcomes"]


def score_matrix(store: RunStore, run: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(R, r0)`` of one run from its ``score`` rows (see :func:`results_to_matrix`)."""
    if not store.tasks:
        return np.zeros((0, 0)), None
    rows = store.rows(run=run, metric="score").to_dict("records")
    R, _, r0 = results_to_matrix(rows, {t: "score" for t in store.tasks})
    return R, r0


def read_generations(stage: StageDir) -> dict[str, list[dict[str, Any]]]:
    """The saved generation records of one stage folder, keyed by the ``task`` name of their result
    rows (``safety/<set>[@attack]``, ``overrefusal/<set>``, or the training task's name); ``{}`` when none."""
    found: dict[str, list[dict[str, Any]]] = {}
    folder = stage.generations
    for f in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        try:
            records = load_generations(f)
        except ValueError as exc:
            raise RunDirError(str(exc)) from None
        if not records:
            continue
        first = records[0]
        kind, name = first.get("kind"), str(first.get("set") or f.stem)
        if kind == "safety":
            attack = first.get("attack") or "none"
            task = f"safety/{name}" + ("" if attack == "none" else f"@{attack}")
        elif kind == "overrefusal":
            task = f"overrefusal/{name}"
        else:
            task = name
        found[task] = records
    return found


def stage_generations(store: RunStore, run: str, stage: int) -> dict[str, list[dict[str, Any]]]:
    """:func:`read_generations` of one run and stage of a loaded run directory (cached)."""
    key = ("generations", run, stage)
    if key not in store.cache:
        store.cache[key] = read_generations(store.layout.stage(run, stage))
    return store.cache[key]


def stage_outcomes(stage: StageDir) -> dict[tuple[str, str], pd.Series]:
    """Every per-prompt outcome one stage folder's generations hold: ``{(task, metric): Series}``.

    The metrics are those of :func:`prompt_outcomes`: ``asr/<judge>`` for every judge that judged
    a safety set, ``refusal_rate``, ``over_refusal`` and a task's ``score`` (in [0, 1]).
    """
    out: dict[tuple[str, str], pd.Series] = {}
    for task, records in read_generations(stage).items():
        if task.startswith("safety/"):
            judges = sorted({j for r in records for j in (r.get("verdicts") or {})})
            metrics = ["refusal_rate", *(f"asr/{j}" for j in judges)]
        elif task.startswith("overrefusal/"):
            metrics = ["over_refusal"]
        else:
            metrics = ["score"]
        for metric in metrics:
            series = _series(records, task, metric)
            if series is not None:
                out[(task, metric)] = series
    return out


def prompt_outcomes(store: RunStore, run: str, stage: int, task: str, metric: str) -> pd.Series | None:
    """The per-prompt outcome behind the measurement ``(task, metric)`` of one run and stage.

    A Series indexed by prompt id, in file order; None when the stage saved no generations
    for it or the metric has no per-prompt form. Values, whose mean times 100 is the
    ``results.jsonl`` value:

    * ``asr/<judge>`` on ``safety/*``: 1 when the judge called the answer unsafe, 0 when safe,
      NaN when its verdict did not parse (left out of the ASR the same way);
    * ``refusal_rate`` on ``safety/*``: 1 when the answer holds a refusal string (keyword detector);
    * ``over_refusal`` on ``overrefusal/*``: 1 when a safe prompt was refused (unsafe contrast
      prompts are left out, as in the rate);
    * ``score`` of a training task: the item's metric in [0, 1].

    :func:`outcome_kind` says whether a metric's outcomes are binary or continuous.
    """
    key = ("outcomes", run, stage, task, metric)
    if key in store.cache:
        return store.cache[key]
    records = stage_generations(store, run, stage).get(task)
    out = _series(records, task, metric) if records else None
    store.cache[key] = out
    return out


def _series(records: list[dict[str, Any]], task: str, metric: str) -> pd.Series | None:
    values = _outcome_values(records, task, metric)
    if values is None:
        return None
    ids, vals = zip(*values) if values else ((), ())
    index = pd.Index([str(i) for i in ids], name="id")
    if not index.is_unique:  # ids repeat: the position is the prompt
        index = pd.Index([f"{i}#{n}" for n, i in enumerate(index)], name="id")
    return pd.Series(np.asarray(vals, dtype=float), index=index, name=metric)


def outcome_kind(metric: str) -> str:
    """``"continuous"`` for task scores, ``"binary"`` for verdicts (ASR, refusals, over-refusal)."""
    return "continuous" if metric == "score" else "binary"


def _outcome_values(records: list[dict[str, Any]], task: str, metric: str) -> list[tuple[Any, float]] | None:
    ids = [r.get("id") if r.get("id") is not None else i for i, r in enumerate(records)]
    if task.startswith("safety/"):
        if metric.startswith("asr/") and metric.count("/") == 1:
            judge = metric.split("/", 1)[1]
            vals = []
            for r in records:
                v = (r.get("verdicts") or {}).get(judge)
                if v is None:
                    return None  # this judge did not judge these generations
                unsafe = v.get("unsafe")
                vals.append(math.nan if unsafe is None else float(bool(unsafe)))
            return list(zip(ids, vals))
        if metric == "refusal_rate":
            flags = keyword_refusals([r.get("response") or "" for r in records])
            return [(i, float(f)) for i, f in zip(ids, flags)]
        return None
    if task.startswith("overrefusal/"):
        if metric != "over_refusal" or any("refused" not in r for r in records):
            return None
        return [(i, float(bool(r["refused"]))) for i, r in zip(ids, records)
                if r.get("label") == "safe"]
    if metric == "score":
        fn = TASK_METRICS.get(str(records[0].get("metric")))
        if fn is None:
            return None
        return [(i, float(fn(r.get("response") or "", r.get("reference")))) for i, r in zip(ids, records)]
    return None
