"""The task registry: :class:`Task`, :func:`register_task`, :func:`load_task`.

A :class:`Task` holds training records (normalized, see :mod:`gradsift.data.records`)
and evaluation items ``{"row", "messages", "reference", "meta"}`` whose ``messages``
are the prompt only (no assistant turn) and whose ``reference`` is what the task's
metric compares a generation with.

A registered task is a name bound to a loader ``(n_train, n_eval, seed, **options) -> Task``
(see :func:`register_task`). The hub tasks (:mod:`gradsift.tasks.hub`) and the generated
demo tasks (:mod:`gradsift.tasks.demo`) register themselves when :mod:`gradsift.tasks`
is imported. Any other name is read as a data file or ``hf:`` source with
:func:`~gradsift.data.records.read_records` (metric ``rougeL``, reference = the response).

Sampling is deterministic: ``n_train`` / ``n_eval`` rows are drawn with
``random.Random(seed)``; records keep their source order. Train and eval never share
a row. A held-out evaluation part has ``n_eval`` rows, or :data:`EVAL_FRACTION` of
the rows (at least one) when ``n_eval`` is None.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradsift.data.records import FILE_SUFFIXES, read_records

EVAL_FRACTION = 0.1
"""Share of the rows held out for evaluation when a task has no evaluation split."""


@dataclass
class Task:
    """One stage of a continual sequence: training records, evaluation items, metric name."""

    name: str
    train: list[dict]
    eval: list[dict]
    metric: str
    source: str | None = None
    # replies this task's metric reads need up to this many tokens: evaluation generates at least
    # this many for it, whatever generation.max_new_tokens says (None: generation.max_new_tokens)
    max_new_tokens: int | None = None


Loader = Callable[..., Task]


@dataclass(frozen=True)
class RegisteredTask:
    """A name bound to its loader.

    ``load(n_train, n_eval, seed, **options)`` returns the :class:`Task`. ``options`` are
    the keyword options the loader accepts beyond those; ``reads_files`` says whether it
    takes ``path=`` / ``eval_path=`` (a local copy of its source).
    """

    name: str
    load: Loader
    description: str = ""
    options: tuple[str, ...] = ()
    reads_files: bool = False


_REGISTRY: dict[str, RegisteredTask] = {}


def register_task(
    name: str,
    load: Loader | None = None,
    *,
    description: str = "",
    options: tuple[str, ...] = (),
    reads_files: bool = False,
) -> Any:
    """Register ``load`` under ``name`` (or use as a decorator: ``@register_task("name")``).

    Raises:
        ValueError: ``name`` is already registered.
    """

    def add(fn: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"task {name!r} is already registered")
        doc = description or (fn.__doc__ or "").strip().split("\n", 1)[0]
        _REGISTRY[name] = RegisteredTask(name, fn, doc, tuple(options), reads_files)
        return fn

    return add if load is None else add(load)


def registered_task(name: str) -> RegisteredTask:
    """The registration of ``name``; :class:`KeyError` listing the choices when there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; registered: {', '.join(task_names())}") from None


def task_names() -> list[str]:
    """Every registered task name (what :func:`load_task` accepts besides data files), sorted."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- sampling


def check_count(name: str, n: int | None) -> None:
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise ValueError(f"{name} must be a non-negative integer or None, got {n!r}")


def sample_indices(n_rows: int, n: int | None, rng: random.Random) -> list[int]:
    """``n`` distinct indices of ``range(n_rows)`` drawn by ``rng`` (all when None), in order."""
    if n is None or n >= n_rows:
        return list(range(n_rows))
    return sorted(rng.sample(range(n_rows), n))


def held_out(n_rows: int, n_train: int | None, n_eval: int | None, seed: int, source: str) -> tuple[list[int], list[int]]:
    """Disjoint train/eval indices of one source, drawn by ``seed``."""
    k = n_eval if n_eval is not None else max(1, round(EVAL_FRACTION * n_rows))
    if n_rows < 2 or k >= n_rows:
        raise ValueError(
            f"{source}: {n_rows} rows cannot be split into training and {k} held-out evaluation rows; "
            "pass a smaller n_eval or a separate evaluation file"
        )
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    eval_idx, train_idx = order[:k], order[k:]
    if n_train is not None:
        train_idx = train_idx[:n_train]
    return sorted(train_idx), sorted(eval_idx)


# --------------------------------------------------------------------------- loading


def _eval_items(records: list[dict]) -> list[dict]:
    return [
        {"row": r["row"], "messages": r["messages"][:-1], "reference": r["messages"][-1]["content"], "meta": r["meta"]}
        for r in records
    ]


def _load_file(source: str, eval_path: str | None, n_train, n_eval, seed, metric: str, name: str | None,
               fields: dict) -> Task:
    records = read_records(source, **fields)
    if eval_path is None:
        train_idx, eval_idx = held_out(len(records), n_train, n_eval, seed, source)
        train = [records[i] for i in train_idx]
        evals = _eval_items([records[i] for i in eval_idx])
    else:
        eval_records = read_records(eval_path, **fields)
        train = [records[i] for i in sample_indices(len(records), n_train, random.Random(seed))]
        evals = _eval_items([eval_records[i] for i in sample_indices(len(eval_records), n_eval, random.Random(seed))])
    if name is None:
        name = source.split("@")[0].rsplit("/", 1)[-1] if source.startswith("hf:") else Path(source).stem
    return Task(name, train, evals, metric, source=source)


_SPEC_KEYS = {"name", "path", "eval_path", "metric", "n_train", "n_eval", "seed",
              "prompt_field", "response_field", "messages_field", "system_field"}
_FIELD_KEYS = ("prompt_field", "response_field", "messages_field", "system_field")


def _load_registered(entry: RegisteredTask, path, eval_path, n_train, n_eval, seed, opts: dict) -> Task:
    bad = sorted(set(opts) - set(entry.options))
    if bad:
        allowed = ", ".join(entry.options) or "none"
        raise ValueError(f"task {entry.name!r}: unknown option(s) {', '.join(bad)} (task options: {allowed})")
    if entry.reads_files:
        return entry.load(n_train, n_eval, seed, path=path, eval_path=eval_path, **opts)
    if path is not None or eval_path is not None:
        raise ValueError(f"the built-in task {entry.name!r} is generated: it takes no path or eval_path")
    return entry.load(n_train, n_eval, seed, **opts)


def load_task(
    spec: str | Path | Mapping[str, Any],
    *,
    n_train: int | None = None,
    n_eval: int | None = None,
    seed: int = 0,
    path: str | None = None,
) -> Task:
    """Load a task by registered name, file path or ``hf:`` source.

    ``spec`` may also be a dict with ``name`` (or only ``path``) and any of
    ``path``, ``eval_path``, ``metric``, ``n_train``, ``n_eval``, ``seed``, the
    :func:`~gradsift.data.records.read_records` field options (user files), and a
    registered task's own options (``with_explanation`` for medmcqa). Dict values
    override the keyword arguments.

    Raises:
        ValueError: unknown task name (the message lists the choices), bad options.
        RecordError: a bad row, naming file, row and field.
    """
    opts: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        opts = dict(spec)
        name = opts.pop("name", None)
        path = opts.pop("path", path)
        if name is None and path is None:
            raise ValueError("a task dict needs 'name' or 'path'")
        n_train = opts.pop("n_train", n_train)
        n_eval = opts.pop("n_eval", n_eval)
        seed = opts.pop("seed", seed)
    elif isinstance(spec, str | Path):
        name = str(spec)
    else:
        raise TypeError(f"task spec must be a name, a path or a dict, got {type(spec).__name__}")
    check_count("n_train", n_train)
    check_count("n_eval", n_eval)
    eval_path = opts.pop("eval_path", None)
    metric = opts.pop("metric", None)

    if name in _REGISTRY:
        task = _load_registered(_REGISTRY[name], path, eval_path, n_train, n_eval, seed, opts)
        if metric is not None:
            task.metric = metric
        return task

    source = path if path is not None else name  # with both, ``name`` names a task read from ``path``
    is_source = str(source).startswith("hf:") or Path(source).suffix.lower() in FILE_SUFFIXES or Path(source).exists()
    if not is_source:
        raise ValueError(f"unknown task {name!r}: not a data file; choose one of {', '.join(task_names())} "
                         f"or give a {'/'.join(FILE_SUFFIXES)} file or hf:NAME source")
    bad = sorted(set(opts) - set(_FIELD_KEYS))
    if bad:
        raise ValueError(
            f"unknown task option(s) {', '.join(bad)} for a data file; allowed: {', '.join(sorted(_SPEC_KEYS))}"
        )
    display = name if (name is not None and source != name) else None
    return _load_file(str(source), eval_path, n_train, n_eval, seed, metric or "rougeL", display, opts)
