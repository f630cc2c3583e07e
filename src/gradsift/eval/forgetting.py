"""Continual-learning metrics on the result matrix R.

Conventions: tasks are trained in run order 1..T. ``R`` is a T x T matrix with
``R[j][i]`` = score on task ``i`` after training stage ``j + 1`` (0-based rows and
columns, both in run order). Entries above the diagonal (tasks not trained yet)
may be NaN; entries on or below it must be finite. The scores before any
training (stage 0) are a separate optional vector ``r0``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["as_result_matrix", "forgetting", "interference", "mean_over_stages", "results_to_matrix"]


def as_result_matrix(R: Any) -> np.ndarray:
    """``R`` as a float64 T x T array, checked: square, finite on and below the diagonal."""
    arr = np.asarray(R, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square T x T matrix, got shape {arr.shape}")
    lower = np.tril(np.ones_like(arr, dtype=bool))
    bad = lower & ~np.isfinite(arr)
    if bad.any():
        j, i = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(
            f"R[{j}][{i}] (task {i} after stage {j + 1}) is {arr[j, i]}; "
            "only entries above the diagonal (tasks not trained yet) may be missing"
        )
    return arr


def forgetting(R: Any) -> dict[str, float]:
    """Average accuracy, backward transfer, forgetting and the largest single-step drop.

    With T tasks and ``R`` as in the module docstring:

    - ``AA`` = mean_i R[T-1][i], the final average score;
    - ``BWT`` = 1/(T-1) * sum_{i<T-1} (R[T-1][i] - R[i][i])  (GEM, Lopez-Paz & Ranzato
      2017): negative when learning later tasks hurt earlier ones;
    - ``FM`` = 1/(T-1) * sum_{i<T-1} max_{l in [i, T-2]} (R[l][i] - R[T-1][i])
      (Chaudhry et al. 2018): the best score task i reached before the final stage
      minus its final score, averaged over all but the last task;
    - ``max_drop`` = max over tasks i and stages j >= i of R[j][i] - R[j+1][i], the
      largest fall caused by one training stage (0 when no score ever falls).

    For T = 1, BWT = FM = max_drop = 0.
    """
    arr = as_result_matrix(R)
    T = arr.shape[0]
    final = arr[T - 1]
    out = {"AA": float(final.mean()), "BWT": 0.0, "FM": 0.0, "max_drop": 0.0}
    if T == 1:
        return out
    diag = np.diag(arr)
    out["BWT"] = float(np.mean(final[: T - 1] - diag[: T - 1]))
    out["FM"] = float(np.mean([arr[i : T - 1, i].max() - final[i] for i in range(T - 1)]))
    drops = [arr[j, i] - arr[j + 1, i] for i in range(T - 1) for j in range(i, T - 1)]
    out["max_drop"] = float(max(0.0, max(drops)))
    return out


def interference(R: Any, r0: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Task-interference matrix D (T x T): D[j][i] = R[j][i] - R[j-1][i].

    D[j][i] is the change in task i's score caused by training stage j + 1. The
    first row compares with the pre-training scores ``r0`` when given, else it
    is NaN. Entries above the diagonal are NaN wherever R is.
    """
    arr = as_result_matrix(R)
    T = arr.shape[0]
    out = np.full_like(arr, np.nan)
    out[1:] = arr[1:] - arr[:-1]
    if r0 is not None:
        base = np.asarray(r0, dtype=np.float64)
        if base.shape != (T,):
            raise ValueError(f"r0 must have one score per task ({T}), got shape {base.shape}")
        out[0] = arr[0] - base
    return out


def mean_over_stages(values: Iterable[float | None]) -> float:
    """Mean of a per-checkpoint quantity over the checkpoints of a sequence.

    The paper reports safety (e.g. AdvBench ASR) as the mean over the checkpoints
    of the task sequence; pass one value per checkpoint (include stage 0 only if
    the aligned model's value should count). ``None``/NaN entries (checkpoints not
    evaluated) are skipped; at least one value is required.
    """
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not kept:
        raise ValueError("mean_over_stages needs at least one evaluated checkpoint")
    return float(sum(kept) / len(kept))


def results_to_matrix(
    rows: Iterable[Mapping[str, Any]], metric_per_task: Mapping[str, str]
) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """Build ``(R, tasks, r0)`` from ``results.jsonl`` rows of one run.

    Rows are dicts with ``run, method, seed, stage, task, metric, value``; stage 0 is
    before any training and stage k is after the k-th task. ``metric_per_task`` maps
    each task to the metric that enters R, and its key order IS the run order
    (``{"dolly": "rougeL", "gsm8k": "gsm8k", ...}``). Rows of other tasks or
    metrics are ignored. ``R[k-1][i]`` holds the stage-k value for task i (NaN
    where absent); ``r0`` holds the stage-0 values, or is None if there are none.
    Rows from more than one (run, method, seed) or two values for one cell are errors.
    """
    tasks = list(metric_per_task)
    if not tasks:
        raise ValueError("metric_per_task is empty")
    index = {t: i for i, t in enumerate(tasks)}
    T = len(tasks)
    R = np.full((T, T), np.nan)
    r0 = np.full(T, np.nan)
    groups: set[tuple[Any, Any, Any]] = set()
    seen: set[tuple[int, str]] = set()
    for n, row in enumerate(rows):
        missing = [k for k in ("stage", "task", "metric", "value") if k not in row]
        if missing:
            raise ValueError(f"results row {n}: missing field {missing[0]!r}")
        task = row["task"]
        if task not in index or row["metric"] != metric_per_task[task]:
            continue
        groups.add((row.get("run"), row.get("method"), row.get("seed")))
        if len(groups) > 1:
            raise ValueError(
                f"results row {n}: rows mix runs {sorted(map(str, groups))}; filter to one (run, method, seed) first"
            )
        stage = int(row["stage"])
        if not 0 <= stage <= T:
            raise ValueError(f"results row {n}: field 'stage' is {stage}, outside 0..{T} for {T} tasks")
        if (stage, task) in seen:
            raise ValueError(f"results row {n}: second value for task {task!r} at stage {stage}")
        seen.add((stage, task))
        value = float(row["value"])
        if stage == 0:
            r0[index[task]] = value
        else:
            R[stage - 1, index[task]] = value
    return R, tasks, (None if np.isnan(r0).all() else r0)
