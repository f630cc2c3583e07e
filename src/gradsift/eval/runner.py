"""The evaluation runner: task scores, safety, over-refusal and capability in one call.

A run config's ``eval:`` section (or a standalone eval YAML file) becomes an
:class:`EvalConfig`; :func:`evaluate` measures a model with it and returns rows
``{"task", "metric", "value"}``. Every generation is saved under
``<out_dir>/generations/`` so that the judges can be re-run later without
generating again (:func:`rejudge`). The stage loop calls the hook built by
:func:`make_eval_hook` on the aligned model (stage 0) and after every stage.

Result naming (the report reads these names):

=========================================  ============================================
task                                       metrics
=========================================  ============================================
``<task name>``                            ``score`` (percent, the task's own metric)
``safety/<set>`` (``@<attack>`` appended   ``asr/<judge>`` (percent), ``asr/<judge>/<category>``,
when the attack is not ``none``)           ``unparsable/<judge>`` (count), ``refusal_rate``
                                           (percent, keyword refusals), ``n``
``overrefusal/<set>``                      ``over_refusal`` (percent), ``over_refusal/<category>``, ``n``,
                                           ``reply_words`` (mean words a reply), ``degenerate`` (percent
                                           of empty, one-word or looping replies: the health check)
``capability/<bench>``                     ``acc``, ``acc_norm``, ``mc1``, ``mc2`` (percent), their
                                           ``*_stderr`` (percent), ``n``
``lmeval/<task>``                          lm-eval's metric names (fractions -> percent), ``n``
``_eval``                                  ``runtime_s``
=========================================  ============================================
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gradsift.eval.generation import GenerationConfig, load_generations, make_generator, save_generations
from gradsift.eval.jailbreak import ATTACKS, apply_attack
from gradsift.eval.judges import (
    JUDGES,
    REFUSAL_STRINGS,
    Judge,
    keyword_refusals,
    make_judge,
    over_refusal,
    refusal_list_hash,
    safety_metrics,
)
from gradsift.store import EVAL_META_FILE as META_FILE
from gradsift.store import GENERATIONS_DIR

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_BENIGN",
    "BUILTIN_HARMFUL",
    "BUILTIN_XSTEST",
    "EvalConfig",
    "EvalConfigError",
    "JudgePool",
    "evaluate",
    "load_prompt_set",
    "make_eval_hook",
    "rejudge",
    "write_eval_meta",
]

BUILTIN_HARMFUL = "builtin_harmful"
"""The package's held-out harmful requests (``gradsift.data.requests.harmful_requests("eval")``)."""
BUILTIN_BENIGN = "builtin_benign"
"""The package's held-out benign and borderline requests (``benign_requests("eval")``)."""
BUILTIN_XSTEST = "builtin_xstest"
"""XSTest v2's 250 safe prompts (Röttger et al. 2024, CC BY 4.0), shipped in the package
(``data/builtin/xstest_safe.jsonl``, its source and licence in ``xstest_safe.source.json``);
an over-refusal set, category = XSTest's prompt type."""

_NOT_PERCENT = ("n", "sample_len")


class EvalConfigError(ValueError):
    """A bad ``eval`` section or evaluation input; the message names the key or the file."""


# ----------------------------------------------------------------------------- config


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SafetySetSettings(_Section):
    """One harmful-prompt set: ASR per judge and attack."""

    set: str = Field(min_length=1)
    name: str | None = None
    n: int | None = Field(None, ge=1)
    seed: int = 0
    attacks: list[str] = Field(default_factory=lambda: ["none"], min_length=1)
    judges: list[str] = Field(default_factory=lambda: ["keyword", "heuristic"], min_length=1)

    @field_validator("attacks")
    @classmethod
    def _known_attacks(cls, v: list[str]) -> list[str]:
        for a in v:
            if a not in ATTACKS:
                raise ValueError(f"unknown attack {a!r}; choose from {', '.join(ATTACKS)}")
        if len(set(v)) != len(v):
            raise ValueError("an attack is listed twice")
        return v

    @field_validator("judges")
    @classmethod
    def _known_judges(cls, v: list[str]) -> list[str]:
        v = [j.lower() for j in v]
        for j in v:
            if j not in JUDGES:
                raise ValueError(f"unknown judge {j!r}; choose from {', '.join(JUDGES)}")
        if len(set(v)) != len(v):
            raise ValueError("a judge is listed twice")
        return v

    @property
    def label(self) -> str:
        return self.name or _set_label(self.set)


class OverRefusalSettings(_Section):
    """One set of safe prompts; over-refusal = % of them refused.

    ``detector``: ``prefix`` (default) counts a response whose FIRST SENTENCE holds a
    refusal phrase (the 29 keyword strings and the extra refusal forms,
    case-insensitive; the XSTest string-match rule, which also catches "I'm so sorry,
    but I can't ..."); ``keyword`` counts any of the 29 strings anywhere, exactly as
    the keyword judge does. ``max_new_tokens`` caps the replies of this set below
    ``generation.max_new_tokens``: the prefix detector reads the first sentence only,
    so a short cap gives the same verdicts for less decoding.
    """

    set: str = Field(min_length=1)
    name: str | None = None
    n: int | None = Field(None, ge=1)
    seed: int = 0
    detector: Literal["prefix", "keyword"] = "prefix"
    max_new_tokens: int | None = Field(None, ge=1)

    @property
    def label(self) -> str:
        return self.name or _set_label(self.set)


class CapabilitySettings(_Section):
    """A built-in offline multiple-choice benchmark scored by log-likelihood."""

    bench: str
    path: str
    limit: int | None = Field(100, ge=1)
    seed: int = 0
    batch_size: int = Field(8, ge=1)

    @field_validator("bench")
    @classmethod
    def _known_bench(cls, v: str) -> str:
        from gradsift.eval.capability import MC_BENCHMARKS

        aliases = {"truthfulqa", "arc", "arc_c"}
        if v not in MC_BENCHMARKS and v not in aliases:
            raise ValueError(f"unknown benchmark {v!r}; choose from {', '.join(sorted(MC_BENCHMARKS))}")
        return v


class LMEvalSettings(_Section):
    """lm-evaluation-harness on the in-memory model (needs the ``lm-eval`` package).

    ``data_root``: a folder of local benchmark copies; task files that read them
    (ARC-Challenge, BoolQ) are written and added to ``include_path``.
    """

    tasks: list[str] = Field(min_length=1)
    limit: int | float | None = None
    include_path: str | list[str] | None = None
    data_root: str | None = None
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(8, ge=1)
    include_defaults: bool = True


class EvalConfig(_Section):
    """The ``eval:`` section. Every key is optional; see ``docs/evaluation.md``.

    ``tasks``: ``all`` / ``true`` (default) scores every task of the run at every
    stage, trained yet or not, so the full result matrix can be shown; ``seen``
    only the tasks trained so far; ``false`` none. ``task_n_eval`` caps the
    evaluation items per task. ``stage0_tasks`` (with ``tasks: seen``): score every task
    of the run on the stage-0 model too, the baseline each task's score after its own
    stage is checked against (the health check of the report). By default safety is measured on the built-in
    held-out harmful requests (keyword and heuristic judges) and over-refusal on
    the built-in benign/borderline requests; capability benchmarks are off.
    """

    generation: GenerationConfig = Field(default_factory=GenerationConfig)  # decoding for every answer
    tasks: Literal["all", "seen", "none"] = "all"
    task_n_eval: int | None = Field(None, ge=1)
    stage0_tasks: bool = False
    safety: list[SafetySetSettings] = Field(default_factory=lambda: [SafetySetSettings(set=BUILTIN_HARMFUL)])
    over_refusal: list[OverRefusalSettings] = Field(
        default_factory=lambda: [OverRefusalSettings(set=BUILTIN_BENIGN)]
    )
    capability: list[CapabilitySettings] = Field(default_factory=list)
    lm_eval: LMEvalSettings | None = None
    judge_models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    progress: bool = True

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_flag(cls, v: Any) -> Any:
        if v is True or v is None:
            return "all"
        if v is False:
            return "none"
        return v

    @field_validator("safety", "over_refusal", "capability", mode="before")
    @classmethod
    def _null_is_empty(cls, v: Any) -> Any:
        return [] if v is None else v

    @field_validator("judge_models")
    @classmethod
    def _known_judge_models(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in v:
            if name.lower() not in JUDGES:
                raise ValueError(f"unknown judge {name!r}; choose from {', '.join(JUDGES)}")
        return {k.lower(): dict(val or {}) for k, val in v.items()}

    @model_validator(mode="after")
    def _distinct_names(self) -> EvalConfig:
        seen: dict[str, int] = {}
        for i, s in enumerate(self.safety):
            for attack in s.attacks:
                key = _safety_task(s.label, attack)
                if key in seen:
                    raise ValueError(f"safety.{i}: {key!r} repeats safety.{seen[key]}; give one a distinct 'name'")
                seen[key] = i
        labels = [o.label for o in self.over_refusal]
        for i, lab in enumerate(labels):
            if lab in labels[:i]:
                raise ValueError(f"over_refusal.{i}: set name {lab!r} repeated; give one a distinct 'name'")
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = "eval",
                  base: str | Path | None = None) -> EvalConfig:
        """Validate an ``eval`` mapping; raise :class:`EvalConfigError` naming the bad key.

        Relative file paths that exist relative to ``base`` (the config file's
        folder) are made absolute; set names are checked (file, built-in or known set).
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise EvalConfigError(f"{source}: must be a mapping, got {type(data).__name__}")
        try:
            cfg = cls.model_validate(dict(data))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            raise EvalConfigError(f"{source}.{loc}: {msg}" if loc else f"{source}: {msg}") from None
        cfg._resolve_and_check(source, Path(base) if base is not None else None)
        return cfg

    def _resolve_and_check(self, source: str, base: Path | None) -> None:
        from gradsift.eval.safety import REGISTRY

        for i, s in enumerate(self.safety):
            s.set = _resolve(s.set, base)
            _check_set(s.set, f"{source}.safety.{i}.set", BUILTIN_HARMFUL, REGISTRY)
        for i, o in enumerate(self.over_refusal):
            o.set = _resolve(o.set, base)
            _check_set(o.set, f"{source}.over_refusal.{i}.set", BUILTIN_BENIGN, REGISTRY)
        for i, c in enumerate(self.capability):
            c.path = _resolve(c.path, base)
            if not Path(c.path).is_file():
                raise EvalConfigError(f"{source}.capability.{i}.path: {c.path}: no such file")
        if self.lm_eval is not None:
            le = self.lm_eval
            if isinstance(le.include_path, str):
                le.include_path = [le.include_path]
            le.include_path = [_resolve(p, base) for p in le.include_path or []] or None
            if le.data_root is not None:
                le.data_root = _resolve(le.data_root, base)
                if not Path(le.data_root).is_dir():
                    raise EvalConfigError(f"{source}.lm_eval.data_root: {le.data_root}: no such folder")

    def judge_names(self) -> list[str]:
        """Every judge used by a safety set, in first-use order."""
        return list(dict.fromkeys(j for s in self.safety for j in s.judges))


def _resolve(value: str, base: Path | None) -> str:
    if base is None or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else value


def _check_set(spec: str, key: str, builtin: str, registry: Mapping[str, Any]) -> None:
    if spec == builtin or spec.lower() in registry or Path(spec).exists():
        return
    if spec == BUILTIN_XSTEST and builtin == BUILTIN_BENIGN:
        return
    other = BUILTIN_BENIGN if builtin == BUILTIN_HARMFUL else BUILTIN_HARMFUL
    if spec == other:
        raise EvalConfigError(f"{key}: {spec!r} cannot be used here; use {builtin!r}")
    raise EvalConfigError(
        f"{key}: {spec!r} is not a file, {builtin!r} or a known set ({', '.join(sorted(registry))})"
    )


def _set_label(spec: str) -> str:
    """A set's name in results: the built-in or registry name, else the file's stem."""
    if spec in (BUILTIN_HARMFUL, BUILTIN_BENIGN, BUILTIN_XSTEST):
        return spec
    path = Path(spec)
    if path.exists() or path.suffix:
        return path.stem
    return spec.lower()


def _safety_task(label: str, attack: str) -> str:
    return f"safety/{label}" + ("" if attack == "none" else f"@{attack}")


def _file_stem(kind: str, label: str, attack: str | None = None) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "set"
    return f"{kind}-{name}" + (f"@{attack}" if attack and attack != "none" else "")


# ----------------------------------------------------------------------------- prompt sets


def _subsample(items: list[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    """``n`` items drawn with ``random.Random(seed)``, stratified by ``category``, in their original order.

    Each category gets its share of ``n`` (largest remainders), so that a subsample's rate
    weighs the categories (XSTest's ten prompt types, the harm categories) as the whole set does.
    """
    if n is None or n >= len(items):
        return items
    groups: dict[Any, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.get("category"), []).append(i)
    quota = {c: n * len(idx) / len(items) for c, idx in groups.items()}
    take = {c: int(q) for c, q in quota.items()}
    by_remainder = sorted(groups, key=lambda c: (-(quota[c] - take[c]), list(groups).index(c)))
    for c in by_remainder[: n - sum(take.values())]:
        take[c] += 1
    rng = random.Random(seed)
    keep = sorted(i for c, idx in groups.items() for i in rng.sample(idx, take[c]))
    return [items[i] for i in keep]


def load_prompt_set(spec: str, purpose: Literal["safety", "over_refusal"], n: int | None = None,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Prompt items ``{"id", "prompt", "category", "label", "context"}`` for one set.

    ``builtin_harmful`` / ``builtin_benign`` are the package's held-out requests
    (category = harm category; ``borderline`` / ``benign`` for the benign set);
    ``builtin_xstest`` XSTest's 250 safe prompts, shipped in the package;
    anything else goes through :func:`gradsift.eval.safety.load_safety_set`. For
    safety only ``unsafe`` items are kept; for over-refusal the ``safe`` items (all
    items when the file labels none as safe). ``n`` subsamples after that filter.
    """
    if spec == BUILTIN_HARMFUL:
        from gradsift.data.requests import harmful_requests

        items = [{"id": r["id"], "prompt": r["prompt"], "category": r.get("category"), "label": "unsafe",
                  "context": None} for r in harmful_requests("eval")]
    elif spec == BUILTIN_BENIGN:
        from gradsift.data.requests import benign_requests

        items = [{"id": r["id"], "prompt": r["prompt"], "category": "borderline" if r["borderline"] else "benign",
                  "label": "safe", "context": None} for r in benign_requests("eval")]
    elif spec == BUILTIN_XSTEST:
        from gradsift.data.requests import BUILTIN_DIR
        from gradsift.eval.safety import load_safety_set

        items = load_safety_set(str(BUILTIN_DIR / "xstest_safe.jsonl"))
    else:
        from gradsift.eval.safety import load_safety_set

        items = load_safety_set(spec)
    if purpose == "safety":
        items = [it for it in items if it.get("label", "unsafe") == "unsafe"]
        if not items:
            raise EvalConfigError(f"{spec}: no unsafe prompts to measure the attack success rate on")
    else:
        safe = [it for it in items if it.get("label") == "safe"]
        items = safe or [{**it, "label": "safe"} for it in items]
    return _subsample(items, n, seed)


# ----------------------------------------------------------------------------- judges


class JudgePool:
    """Builds each judge once, on first use (a judge model loads only when needed).

    ``judge_models`` maps a judge name to its constructor keyword arguments
    (``llamaguard: {model_id: ...}``, ``openai: {base_url, model}``, ...).
    """

    def __init__(self, judge_models: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.judge_models = {k.lower(): dict(v) for k, v in (judge_models or {}).items()}
        self._judges: dict[str, Judge] = {}

    def get(self, name: str) -> Judge:
        name = name.lower()
        if name not in self._judges:
            kwargs = self.judge_models.get(name, {})
            try:
                self._judges[name] = make_judge(name, **kwargs)
            except TypeError as exc:
                raise EvalConfigError(f"judge_models.{name}: {exc}") from None
        return self._judges[name]


# ----------------------------------------------------------------------------- scoring saved generations


def _row(task: str, metric: str, value: float | int) -> dict[str, Any]:
    return {"task": task, "metric": metric, "value": value}


def _task_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    from gradsift.eval.metrics import score_task

    first = records[0]
    value = score_task(first["metric"], [r["response"] for r in records], [r["reference"] for r in records])
    return [_row(first["set"], "score", value)]


def _safety_rows(records: list[dict[str, Any]], judge_names: Sequence[str], pool: JudgePool) -> list[dict[str, Any]]:
    """Judge saved safety generations (verdicts are written back into ``records``)."""
    first = records[0]
    task = _safety_task(first["set"], first.get("attack") or "none")
    prompts = [r.get("original_prompt") or r["prompt"] for r in records]
    responses = [r["response"] for r in records]
    refusals = keyword_refusals(responses)
    has_categories = any(r.get("category") for r in records)
    rows = [_row(task, "n", len(records))]
    refusal_rate = None
    for name in judge_names:
        verdicts = pool.get(name).judge(prompts, responses)
        m = safety_metrics(records, verdicts, refusals=refusals)
        refusal_rate = m["refusal_rate"]
        rows.append(_row(task, f"asr/{name}", m["asr"]))
        rows.append(_row(task, f"unparsable/{name}", m["unparsable"]))
        if has_categories:
            rows.extend(_row(task, f"asr/{name}/{cat}", v) for cat, v in m["asr_by_category"].items())
        for r, v in zip(records, verdicts):
            r.setdefault("verdicts", {})[name] = {"unsafe": v.unsafe, "score": v.score, "raw": v.raw,
                                                  "category": v.category}
    if refusal_rate is None:
        refusal_rate = 100.0 * sum(refusals) / len(refusals)
    rows.insert(1, _row(task, "refusal_rate", refusal_rate))
    return rows


def _refused(responses: Sequence[str], detector: str) -> list[bool]:
    if detector == "keyword":
        return keyword_refusals(responses, "substring")
    from gradsift.eval.judges import opens_with_refusal

    return [opens_with_refusal(r) is not None for r in responses]


def _overrefusal_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    first = records[0]
    task = f"overrefusal/{first['set']}"
    detector = first.get("detector") or "prefix"
    responses = [r["response"] for r in records]
    refused = _refused(responses, detector)
    for r, flag in zip(records, refused):
        r["refused"] = flag
    from gradsift.eval.metrics import is_degenerate, reply_words

    rows = [_row(task, "over_refusal", over_refusal(records, responses, refusals=refused)),
            _row(task, "n", len(records)),
            _row(task, "reply_words", sum(reply_words(r) for r in responses) / len(responses)),
            _row(task, "degenerate", 100.0 * sum(is_degenerate(r) for r in responses) / len(responses))]
    categories = sorted({r["category"] for r in records if r.get("category")})
    for cat in categories:
        idx = [i for i, r in enumerate(records) if r.get("category") == cat]
        sub = [records[i] for i in idx]
        rows.append(_row(task, f"over_refusal/{cat}",
                         over_refusal(sub, [responses[i] for i in idx], refusals=[refused[i] for i in idx])))
    return rows


def rejudge(out_dir: str | Path, judges: Sequence[str] | None = None, *,
            judge_models: Mapping[str, Mapping[str, Any]] | None = None,
            pool: JudgePool | None = None) -> list[dict[str, Any]]:
    """Recompute every row from the generations saved by :func:`evaluate` (no generation).

    ``out_dir`` is the folder passed to :func:`evaluate` (it holds ``generations/``).
    ``judges``: the safety judges to run (default: those that judged each file
    before). Task scores and over-refusal are recomputed too. The new verdicts are
    written back into the safety files. Rows come grouped by file, in file-name order.
    """
    folder = Path(out_dir) / GENERATIONS_DIR
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{folder}: no saved generations (*.jsonl) to re-judge")
    if judges is not None:
        for j in judges:
            if j.lower() not in JUDGES:
                raise EvalConfigError(f"unknown judge {j!r}; choose from {', '.join(JUDGES)}")
    pool = pool or JudgePool(judge_models)
    rows: list[dict[str, Any]] = []
    for path in files:
        records = load_generations(path)
        if not records:
            continue
        kind = records[0].get("kind")
        if kind == "task":
            rows.extend(_task_rows(records))
        elif kind == "safety":
            names = list(judges) if judges is not None else list(records[0].get("verdicts") or ["keyword"])
            for r in records:
                r.pop("verdicts", None)
            rows.extend(_safety_rows(records, [n.lower() for n in names], pool))
            save_generations(path, records)
        elif kind == "overrefusal":
            rows.extend(_overrefusal_rows(records))
        else:
            raise ValueError(f"{path}: line 1: field 'kind' is {kind!r}, expected task, safety or overrefusal")
    return rows


# ----------------------------------------------------------------------------- evaluate


def _percent_rows(task: str, metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        keep_as_is = key in _NOT_PERCENT or "perplexity" in key or "bits_per_byte" in key
        rows.append(_row(task, key, value if keep_as_is else 100.0 * float(value)))
    return rows


def evaluate(
    model,
    tokenizer,
    cfg: EvalConfig | Mapping[str, Any] | None = None,
    *,
    tasks: Sequence[Any] | None = None,
    out_dir: str | Path | None = None,
    stage: int | None = None,
    generator: Any | None = None,
    judges: JudgePool | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` and return rows ``{"task", "metric", "value"}`` (names: module docstring).

    Args:
        model: a loaded causal LM (``hf`` backend), or a model path (``vllm``).
        cfg: an :class:`EvalConfig` or a raw ``eval`` mapping (defaults when None).
        tasks: :class:`gradsift.tasks.Task` objects to score (their ``eval``
            items are generated and scored with the task's metric).
        out_dir: where ``generations/<kind>-<set>[@attack].jsonl`` go (nothing is
            saved when None; :func:`rejudge` needs them).
        stage: only logged.
        generator: any object with ``generate(prompts, assistant_prefixes, progress=)``
            to use instead of building one from ``cfg.generation``.
        judges: a :class:`JudgePool` to reuse judge models across calls.
    """
    if not isinstance(cfg, EvalConfig):
        cfg = EvalConfig.from_dict(cfg)
    start = time.time()
    out = Path(out_dir) / GENERATIONS_DIR if out_dir is not None else None
    pool = judges or JudgePool(cfg.judge_models)
    progress = cfg.progress
    needs_generation = bool(tasks) or bool(cfg.safety) or bool(cfg.over_refusal)
    if generator is None and needs_generation:
        if cfg.generation.backend == "vllm" and not isinstance(model, (str, Path)):
            raise EvalConfigError("generation.backend: vllm needs a model path, not a loaded model; use backend: hf")
        generator = make_generator(cfg.generation.backend, model, tokenizer, cfg.generation)
    where = f" (stage {stage})" if stage is not None else ""
    rows: list[dict[str, Any]] = []

    def generate(label: str, prompts: list[Any], prefixes: list[str | None] | None = None,
                 max_new_tokens: int | None = None) -> list[str]:
        logger.info("eval%s: generating %d answers for %s", where, len(prompts), label)
        cap = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        return generator.generate(prompts, prefixes, progress=progress, **cap)

    def save(stem: str, records: list[dict[str, Any]]) -> None:
        if out is not None:
            save_generations(out / f"{stem}.jsonl", records)

    # --- task scores
    for task in tasks or []:
        items = list(task.eval)[: cfg.task_n_eval] if cfg.task_n_eval else list(task.eval)
        if not items:
            logger.warning("eval%s: task %s has no evaluation items; skipped", where, task.name)
            continue
        need = getattr(task, "max_new_tokens", None)
        responses = generate(task.name, [it["messages"] for it in items],
                             max_new_tokens=max(need, cfg.generation.max_new_tokens) if need else None)
        records = [{"id": str(it.get("row", i)), "kind": "task", "set": task.name, "metric": task.metric,
                    "prompt": it["messages"], "reference": it["reference"], "response": resp}
                   for i, (it, resp) in enumerate(zip(items, responses))]
        save(_file_stem("task", task.name), records)
        rows.extend(_task_rows(records))

    # --- safety: attack success rate per attack and judge
    for s in cfg.safety:
        base_items = load_prompt_set(s.set, "safety", s.n, s.seed)
        for attack in s.attacks:
            items = apply_attack(base_items, attack)
            responses = generate(_safety_task(s.label, attack), [it["prompt"] for it in items],
                                 [it["assistant_prefix"] for it in items])
            records = [{"id": it["id"], "kind": "safety", "set": s.label, "attack": attack,
                        "prompt": it["prompt"], "original_prompt": it["original_prompt"],
                        "assistant_prefix": it["assistant_prefix"], "category": it.get("category"),
                        "label": it.get("label"), "response": resp} for it, resp in zip(items, responses)]
            stem = _file_stem("safety", s.label, attack)
            save(stem, records)  # before judging: a failing judge loses no generation
            rows.extend(_safety_rows(records, s.judges, pool))
            save(stem, records)  # again, with the verdicts

    # --- over-refusal on safe prompts
    for o in cfg.over_refusal:
        items = load_prompt_set(o.set, "over_refusal", o.n, o.seed)
        responses = generate(f"overrefusal/{o.label}", [it["prompt"] for it in items],
                             max_new_tokens=o.max_new_tokens)
        records = [{"id": it["id"], "kind": "overrefusal", "set": o.label, "prompt": it["prompt"],
                    "category": it.get("category"), "label": "safe", "detector": o.detector, "response": resp}
                   for it, resp in zip(items, responses)]
        rows.extend(_overrefusal_rows(records))
        save(_file_stem("overrefusal", o.label), records)

    # --- capability benchmarks (log-likelihood, offline)
    if cfg.capability or cfg.lm_eval is not None:
        if isinstance(model, (str, Path)):
            raise EvalConfigError("capability / lm_eval need a loaded model (generation.backend: hf)")
    for c in cfg.capability:
        from gradsift.eval.capability import run_mc_benchmark

        logger.info("eval%s: capability benchmark %s", where, c.bench)
        result = run_mc_benchmark(model, tokenizer, c.bench, c.path, limit=c.limit, seed=c.seed,
                                  batch_size=c.batch_size, progress=progress)
        rows.extend(_percent_rows(f"capability/{c.bench}", result))
    if cfg.lm_eval is not None:
        from gradsift.eval.capability import lmeval_local_tasks, run_lm_eval

        le = cfg.lm_eval
        include = list(le.include_path or [])
        if le.data_root is not None:
            include.append(str(lmeval_local_tasks(le.data_root)))
        results = run_lm_eval(model, tokenizer, le.tasks, limit=le.limit, batch_size=le.batch_size,
                              num_fewshot=le.num_fewshot, include_path=include or None,
                              include_defaults=le.include_defaults)
        for task_name, metrics in results.items():
            rows.extend(_percent_rows(f"lmeval/{task_name}", metrics))

    rows.append(_row("_eval", "runtime_s", time.time() - start))
    return rows


# ----------------------------------------------------------------------------- run metadata and the stage hook


def write_eval_meta(folder: str | Path, cfg: EvalConfig) -> Path:
    """Write ``eval_meta.json`` (refusal-list hash, judges, settings); rewritten only on change."""
    path = Path(folder) / META_FILE
    meta = {
        "refusal_list_hash": refusal_list_hash(),
        "refusal_strings": len(REFUSAL_STRINGS),
        "judges": cfg.judge_names(),
        "config": cfg.model_dump(mode="json"),
    }
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


def _settings_dict(task: Any) -> dict[str, Any]:
    if isinstance(task, Mapping):
        return dict(task)
    if hasattr(task, "model_dump"):
        return task.model_dump()
    return {"name": str(task)}


def make_eval_hook(eval_config: Mapping[str, Any] | EvalConfig,
                   base: str | Path | None = None) -> Callable[..., list[dict[str, Any]]]:
    """The hook the stage loop calls: ``hook(model, tokenizer, stage, tasks_so_far, run_info) -> rows``.

    ``run_info`` holds ``run_dir`` and ``tasks`` (the run's task settings). The
    generations of stage k go to ``<run_dir>/stage_<k>/generations/``;
    ``<run_dir>/eval_meta.json`` records the refusal-list hash. Task data and judge
    models are loaded once and reused across stages. ``base``: the folder that relative
    set and benchmark paths resolve against (the run config's folder; default: the
    current directory).
    """
    cfg = eval_config if isinstance(eval_config, EvalConfig) else EvalConfig.from_dict(eval_config, base=base)
    pool = JudgePool(cfg.judge_models)
    loaded: dict[str, Any] = {}

    def load(settings: dict[str, Any]):
        from gradsift.tasks import load_task

        key = json.dumps(settings, sort_keys=True, default=str)
        if key not in loaded:
            task = load_task(settings["name"], n_train=settings.get("n_train"), n_eval=settings.get("n_eval"),
                             seed=settings.get("seed", 0), path=settings.get("path"))
            task.train = []  # only the evaluation items are kept
            task.name = settings["name"]  # the name the stage loop records
            loaded[key] = task
        return loaded[key]

    def hook(model, tokenizer, stage: int, tasks_so_far: Sequence[Any], run_info: Mapping[str, Any]):
        run_dir = Path(run_info["run_dir"])
        write_eval_meta(run_dir, cfg)
        if cfg.tasks == "all" and run_info.get("tasks") is not None:
            specs = [_settings_dict(t) for t in run_info["tasks"]]
        elif cfg.tasks == "none":
            specs = []
        else:
            specs = [_settings_dict(t) for t in tasks_so_far]
            if stage == 0 and cfg.stage0_tasks and cfg.tasks == "seen" and run_info.get("tasks") is not None:
                specs = [_settings_dict(t) for t in run_info["tasks"]]
        tasks = [load(s) for s in specs]
        return evaluate(model, tokenizer, cfg, tasks=tasks, out_dir=run_dir / f"stage_{stage}", stage=stage,
                        judges=pool)

    return hook
