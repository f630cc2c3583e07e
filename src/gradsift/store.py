"""The run directory: its layout (:class:`RunDir`), written and read here only.

What ``gradsift train`` / ``gradsift run`` write (:mod:`gradsift.train.stages`) and
``gradsift eval`` / ``gradsift report`` / the studies read::

    config.resolved.yaml               the resolved run config
    environment.json                   the machine the run ran on
    eval_meta.json                     refusal-list hash, judges, evaluation settings
    results.jsonl                      one measurement a line: run, method, seed, stage, task, metric, value
    <method>-seed<seed>/               one run per method and seed (:class:`RunPath`)
        base_model/                    (models built from a config dict only) the initial weights
        stage_<k>/                     one stage (:class:`StageDir`): stage 0 is the aligned model
            adapter/                   LoRA adapter of stage k (safetensors)
            model/                     full weights (full fine-tuning only)
            log.jsonl                  the Trainer's per-step log (loss, lr, kept fraction, mean G ...)
            selection.parquet          every scored sample: step, row, G, L, scored, kept, response_len
            ewc.safetensors            (ewc) Fisher diagonal and anchor parameters
            generations/*.jsonl        per-prompt generations and verdicts
            capability-<bench>.jsonl   (studies) a held-out capability benchmark, question by question
            DONE                       written last: the stage is complete
    analysis/<study>/                  what a study writes about this run directory

``gradsift eval --out DIR`` writes the same top-level files and ``generations/`` at the top.

:func:`load_run` reads the config and the results into a :class:`RunStore`; the per-stage
selection tables, training logs and saved generations are read on first use and cached.
What the saved generations mean (the per-prompt outcome behind one ``results.jsonl``
measurement) is :mod:`gradsift.eval.outcomes`: this module only names and reads files.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

__all__ = ["RESULT_COLUMNS", "RunDir", "RunDirError", "RunPath", "RunStore", "StageDir", "load_run",
           "parse_run_name", "run_name"]

RESULT_COLUMNS = ("run", "method", "seed", "stage", "task", "metric", "value")
CONFIG_FILE = "config.resolved.yaml"
RESULTS_FILE = "results.jsonl"
ENVIRONMENT_FILE = "environment.json"
EVAL_META_FILE = "eval_meta.json"
GENERATIONS_DIR = "generations"
ANALYSIS_DIR = "analysis"
DONE_FILE = "DONE"
_RUN_NAME = re.compile(r"^(?P<method>.+)-seed(?P<seed>-?\d+)$")
_STAGE_NAME = re.compile(r"^stage_(?P<stage>\d+)$")


class RunDirError(ValueError):
    """The folder is not a readable gradsift run directory (the message says why)."""


def run_name(method: str, seed: int) -> str:
    """The folder (and ``run`` column) of one method and seed: ``<method>-seed<seed>``."""
    return f"{method}-seed{seed}"


def parse_run_name(name: str) -> tuple[str, int] | None:
    """``(method, seed)`` of a run name, None when ``name`` is not one."""
    m = _RUN_NAME.match(name)
    return (m.group("method"), int(m.group("seed"))) if m else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class StageDir:
    """``<run>/stage_<k>/``: what one stage wrote."""

    path: Path
    stage: int

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def trainer(self) -> Path:
        """The Trainer's own output folder (checkpoints, when enabled)."""
        return self.path / "trainer"

    @property
    def log(self) -> Path:
        return self.path / "log.jsonl"

    @property
    def selection(self) -> Path:
        return self.path / "selection.parquet"

    @property
    def ewc(self) -> Path:
        return self.path / "ewc.safetensors"

    @property
    def generations(self) -> Path:
        return self.path / GENERATIONS_DIR

    def capability(self, bench: str) -> Path:
        """``capability-<bench>.jsonl``: one held-out capability benchmark, question by question."""
        return self.path / f"capability-{bench}.jsonl"

    def capability_files(self) -> dict[str, Path]:
        """The benchmarks scored question by question at this stage: ``{bench: file}``."""
        return {p.stem.removeprefix("capability-"): p for p in sorted(self.path.glob("capability-*.jsonl"))}

    @property
    def done(self) -> bool:
        """The stage completed (its DONE marker is written last)."""
        return (self.path / DONE_FILE).exists()

    def mark_done(self, note: str | None = None) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / DONE_FILE).write_text((note or _now()) + "\n")

    def fresh(self) -> StageDir:
        """Empty the folder (left by an interrupted attempt) and create it."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        return self


@dataclass(frozen=True)
class RunPath:
    """``<method>-seed<seed>/``: the stages of one run."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def base_model(self) -> Path:
        """The initial weights of a model built from a config dict (saved once, reused by every stage)."""
        return self.path / "base_model"

    def stage(self, stage: int) -> StageDir:
        return StageDir(self.path / f"stage_{stage}", stage)

    def stages(self) -> list[StageDir]:
        """The stage folders present, in stage order."""
        found = [(int(m.group("stage")), p) for p in self.path.glob("stage_*")
                 if p.is_dir() and (m := _STAGE_NAME.match(p.name))]
        return [StageDir(p, k) for k, p in sorted(found)]

    def last_done_stage(self) -> int:
        """The highest stage with a DONE marker (-1 if none)."""
        return max((s.stage for s in self.stages() if s.done), default=-1)


@dataclass(frozen=True)
class RunDir:
    """The layout of one run directory (see the module docstring): paths, and the results file.

    Writers (the stage loop, ``gradsift eval``) and readers (:func:`load_run`, the studies)
    name every file through it.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser())

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def environment_file(self) -> Path:
        return self.path / ENVIRONMENT_FILE

    @property
    def eval_meta_file(self) -> Path:
        return self.path / EVAL_META_FILE

    @property
    def generations(self) -> Path:
        """``generations/`` at the top (``gradsift eval --out``)."""
        return self.path / GENERATIONS_DIR

    def run(self, name: str) -> RunPath:
        return RunPath(self.path / name)

    def run_of(self, method: str, seed: int) -> RunPath:
        return self.run(run_name(method, seed))

    def stage(self, run: str, stage: int) -> StageDir:
        return self.run(run).stage(stage)

    def run_names(self) -> list[str]:
        """The ``<method>-seed<seed>`` folders that hold at least one stage."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if p.is_dir() and _RUN_NAME.match(p.name) and any(p.glob("stage_*")))

    def analysis(self, study: str, create: bool = True) -> Path:
        """``analysis/<study>/``: the folder a study writes into (created, unless ``create=False``)."""
        folder = self.path / ANALYSIS_DIR / study
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        return folder

    # ----------------------------------------------------------------- results.jsonl

    def append_results(self, rows: Iterable[Mapping[str, Any]], **keys: Any) -> None:
        """Append measurements to ``results.jsonl``; ``keys`` (run, method, seed, stage) fill every row.

        Raises:
            ValueError: a row lacks one of :data:`RESULT_COLUMNS`.
        """
        lines = []
        for row in rows:
            full = {**keys, **{k: v for k, v in row.items() if k not in keys}}
            missing = [k for k in RESULT_COLUMNS if k not in full]
            if missing:
                raise ValueError(f"result row {dict(row)} lacks {missing}")
            lines.append(json.dumps({k: full[k] for k in RESULT_COLUMNS}
                                    | {k: v for k, v in full.items() if k not in RESULT_COLUMNS}) + "\n")
        self.path.mkdir(parents=True, exist_ok=True)
        with self.results_file.open("a", encoding="utf-8") as fh:
            fh.writelines(lines)

    def result_rows(self) -> list[dict[str, Any]]:
        """The raw rows of ``results.jsonl`` (``[]`` when absent)."""
        from gradsift.data.records import iter_jsonl

        if not self.results_file.exists():
            return []
        return [row for _, row in iter_jsonl(self.results_file, error=RunDirError)]

    def drop_results(self, run: str, from_stage: int) -> None:
        """Remove the rows of ``run`` with stage >= ``from_stage`` (left by an interrupted stage)."""
        if not self.results_file.exists():
            return
        self.write_results([row for row in self.result_rows()
                            if not (row.get("run") == run and int(row.get("stage", -1)) >= from_stage)])

    def write_results(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Replace ``results.jsonl`` with ``rows`` (atomically)."""
        from gradsift.data.records import write_jsonl

        write_jsonl(self.results_file, rows)


# --------------------------------------------------------------------------- reading


def _read_results(path: Path) -> pd.DataFrame:
    """``results.jsonl`` as a DataFrame; a bad line raises naming the file, row and field."""
    from gradsift.data.records import iter_jsonl

    rows: list[dict[str, Any]] = []
    for lineno, row in iter_jsonl(path, error=RunDirError):
        for key in RESULT_COLUMNS:
            if key not in row:
                raise RunDirError(f"{path}: row {lineno}: missing field {key!r}")
        try:
            stage = int(row["stage"])
            seed = int(row["seed"])
        except (TypeError, ValueError):
            raise RunDirError(f"{path}: row {lineno}: field 'stage' and 'seed' must be integers") from None
        value = row["value"]
        if value is None:
            value = math.nan
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RunDirError(f"{path}: row {lineno}: field 'value' must be a number, got {value!r}")
        rows.append({"run": str(row["run"]), "method": str(row["method"]), "seed": seed, "stage": stage,
                     "task": str(row["task"]), "metric": str(row["metric"]), "value": float(value)})
    frame = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    frame = frame.astype({"run": str, "method": str, "seed": "int64", "stage": "int64", "task": str,
                          "metric": str, "value": "float64"})
    # a rerun may append a second value for the same cell: the later one wins
    return frame.drop_duplicates(["run", "stage", "task", "metric"], keep="last").reset_index(drop=True)


def _unique_in_order(values) -> list:
    seen: dict[Any, None] = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


@dataclass
class RunStore:
    """One run directory, loaded.

    Attributes:
        path: the run directory.
        results: every measurement, columns ``run, method, seed, stage, task, metric, value``.
        config: the resolved run config (``{}`` when the file is absent).
        tasks: the training tasks in run order (stage k trained ``tasks[k-1]``).
        methods: the methods, in config order.
        seeds: the seeds, in config order.
        runs: the ``<method>-seed<seed>`` runs that have results or a folder.
    """

    path: Path
    results: pd.DataFrame
    config: dict[str, Any]
    tasks: list[str]
    methods: list[str]
    seeds: list[int]
    runs: list[str]
    _selection: dict[tuple[str, int], pd.DataFrame | None] = field(default_factory=dict, repr=False)
    _logs: dict[tuple[str, int], pd.DataFrame | None] = field(default_factory=dict, repr=False)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # derived tables (outcomes, intervals, tests)

    # ----------------------------------------------------------------- structure

    @property
    def n_stages(self) -> int:
        """K, the number of training stages (checkpoints are stages 0..K)."""
        return len(self.tasks)

    @property
    def stages(self) -> list[int]:
        """All checkpoints: 0 (the aligned model) .. K."""
        return list(range(self.n_stages + 1))

    def run_name(self, method: str, seed: int) -> str:
        return run_name(method, seed)

    def runs_of(self, method: str) -> list[str]:
        """The runs of one method, in seed order."""
        return [r for r in self.runs if self.run_method(r) == method]

    def run_method(self, run: str) -> str:
        rows = self.results[self.results["run"] == run]
        if len(rows):
            return str(rows["method"].iloc[0])
        m = _RUN_NAME.match(run)
        return m.group("method") if m else run

    def run_seed(self, run: str) -> int | None:
        rows = self.results[self.results["run"] == run]
        if len(rows):
            return int(rows["seed"].iloc[0])
        m = _RUN_NAME.match(run)
        return int(m.group("seed")) if m else None

    # ----------------------------------------------------------------- results

    def rows(self, *, run: str | None = None, method: str | None = None, task: str | None = None,
             metric: str | None = None, stage: int | None = None) -> pd.DataFrame:
        """The result rows matching every given field."""
        df = self.results
        mask = np.ones(len(df), dtype=bool)
        for col, val in (("run", run), ("method", method), ("task", task), ("metric", metric), ("stage", stage)):
            if val is not None:
                mask &= (df[col] == val).to_numpy()
        return df[mask]

    def value(self, run: str, stage: int, task: str, metric: str) -> float:
        """One measurement, NaN when it was not taken."""
        hit = self.rows(run=run, stage=stage, task=task, metric=metric)
        return float(hit["value"].iloc[-1]) if len(hit) else math.nan

    def series(self, run: str, task: str, metric: str, stages: list[int] | None = None) -> list[float]:
        """One value per stage (NaN where missing), stages 0..K unless given."""
        hit = self.rows(run=run, task=task, metric=metric)
        by_stage = dict(zip(hit["stage"].tolist(), hit["value"].tolist()))
        return [float(by_stage.get(s, math.nan)) for s in (self.stages if stages is None else stages)]

    def task_names(self, prefix: str) -> list[str]:
        """Measured ``task`` names starting with ``prefix`` (e.g. ``"safety/"``), sorted."""
        names = self.results.loc[self.results["task"].str.startswith(prefix), "task"].unique()
        return sorted(str(n) for n in names)

    def metric_names(self, task: str, prefix: str = "") -> list[str]:
        """Metrics measured for ``task`` starting with ``prefix``, sorted."""
        rows = self.rows(task=task)
        return sorted(str(m) for m in rows["metric"].unique() if str(m).startswith(prefix))

    # ----------------------------------------------------------------- per-stage files

    @property
    def layout(self) -> RunDir:
        return RunDir(self.path)

    def stage_dir(self, run: str, stage: int) -> Path:
        return self.layout.stage(run, stage).path

    def selection(self, run: str, stage: int) -> pd.DataFrame | None:
        """``selection.parquet`` of one stage (None when the method selects nothing)."""
        key = (run, stage)
        if key not in self._selection:
            p = self.layout.stage(run, stage).selection
            self._selection[key] = pd.read_parquet(p) if p.exists() else None
        return self._selection[key]

    def log(self, run: str, stage: int) -> pd.DataFrame | None:
        """The per-step training log of one stage: rows with a ``loss`` (summary rows dropped)."""
        key = (run, stage)
        if key not in self._logs:
            p = self.layout.stage(run, stage).log
            frame = None
            if p.exists():
                from gradsift.data.records import iter_jsonl

                frame = pd.DataFrame([record for _, record in iter_jsonl(p, error=RunDirError)])
                if "loss" in frame and "step" in frame:
                    frame = frame[frame["loss"].notna()].reset_index(drop=True)
                else:
                    frame = frame.iloc[0:0]
            self._logs[key] = frame
        return self._logs[key]


def load_run(run_dir: str | Path) -> RunStore:
    """Read a run directory written by ``gradsift train``.

    Raises :class:`RunDirError` when the folder does not exist or holds neither
    ``results.jsonl`` nor ``config.resolved.yaml``, or when either is malformed.
    """
    layout = RunDir(run_dir)
    path = layout.path
    if not path.is_dir():
        raise RunDirError(f"{path}: no such run directory")
    cfg_path, res_path = layout.config_file, layout.results_file
    if not cfg_path.exists() and not res_path.exists():
        raise RunDirError(
            f"{path} is not a gradsift run directory: it has neither {RESULTS_FILE} nor {CONFIG_FILE} "
            "(pass the folder given to `gradsift train --output`)"
        )
    config: dict[str, Any] = {}
    if cfg_path.exists():
        try:
            loaded = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise RunDirError(f"{cfg_path}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise RunDirError(f"{cfg_path}: expected a mapping at the top level")
        config = loaded or {}
    results = _read_results(res_path) if res_path.exists() else pd.DataFrame(
        {c: pd.Series(dtype=t) for c, t in zip(RESULT_COLUMNS, (str, str, "int64", "int64", str, str, "float64"))})

    cfg_tasks = [str(t["name"]) for t in config.get("tasks") or [] if isinstance(t, dict) and "name" in t]
    if cfg_tasks:
        tasks = cfg_tasks
    else:  # no config: the task trained at stage k is the one with train/* rows at stage k
        train = results[results["metric"].str.startswith("train/") & (results["stage"] > 0)]
        tasks = [str(t) for t in train.sort_values("stage").drop_duplicates("stage")["task"]]

    method_cfg = config.get("method")
    method_list = method_cfg if isinstance(method_cfg, list) else ([method_cfg] if method_cfg else [])
    methods = _unique_in_order([str(m["name"]) for m in method_list if isinstance(m, dict) and "name" in m]
                               + results["method"].tolist())
    seeds = _unique_in_order([int(s) for s in config.get("seeds") or []] + sorted(results["seed"].unique().tolist()))
    seeds = [int(s) for s in seeds]

    runs_found = set(results["run"].unique().tolist())
    runs_found |= set(layout.run_names())

    def order(run: str) -> tuple[int, int, str]:
        m = _RUN_NAME.match(run)
        method, seed = (m.group("method"), int(m.group("seed"))) if m else (run, 0)
        mi = methods.index(method) if method in methods else len(methods)
        si = seeds.index(seed) if seed in seeds else len(seeds)
        return mi, si, run

    runs = sorted(runs_found, key=order)
    for run in runs:  # runs with a folder but no results still name a method
        m = _RUN_NAME.match(run)
        if m and m.group("method") not in methods:
            methods.append(m.group("method"))
    return RunStore(path=path, results=results, config=config, tasks=tasks, methods=methods, seeds=seeds, runs=runs)
