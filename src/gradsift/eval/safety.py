"""Safety prompt sets: AdvBench, HarmBench, JailbreakBench, XSTest and any prompt file.

Every loader returns a list of items with the same keys::

    {"id": str, "prompt": str, "category": str | None, "label": "unsafe" | "safe", "context": str | None}

``load_safety_set(spec)`` takes either a registry name (``advbench``, ``harmbench``,
``jailbreakbench``, ``xstest``: loaded from the Hugging Face hub with ``datasets``)
or a local file (``.csv``, ``.jsonl``, ``.json``, ``.txt``). The format of a local
file is recognised from its columns:

- AdvBench ``harmful_behaviors.csv`` (``goal,target``), or its headerless one-column
  variant (one prompt per line);
- HarmBench behaviors (``Behavior, FunctionalCategory, SemanticCategory, Tags,
  ContextString, BehaviorID``): contextual behaviors become
  ``ContextString + "\\n\\n---\\n\\n" + Behavior``; copyright behaviors are left out
  unless ``include_copyright=True`` (their judging needs hashing, not a classifier);
- JailbreakBench behaviors (``Goal, Target, Behavior, Category, Source``);
- XSTest v2 (``id, prompt, type, label, focus, note``): the label comes from the file
  (250 safe, 200 unsafe prompts), the category is ``type``;
- anything else with a prompt column (``prompt_field``, or the first of
  ``prompt``, ``goal``, ``Behavior``, ``question``); optional ``id``, ``category``,
  ``label`` and ``context`` columns are used when present.
"""

from __future__ import annotations

import csv
import io
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gradsift.data.records import iter_jsonl, read_json

CONTEXT_SEPARATOR = "\n\n---\n\n"
PROMPT_FIELDS = ("prompt", "goal", "Behavior", "question")

HARMBENCH_COLUMNS = ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID")
JBB_COLUMNS = ("Goal", "Target", "Behavior", "Category")
XSTEST_COLUMNS = ("id", "prompt", "type", "label")

# registry name -> (hub dataset, config, split, row format)
REGISTRY: dict[str, tuple[str, str | None, str, str]] = {
    "advbench": ("walledai/AdvBench", None, "train", "generic"),
    "harmbench": ("walledai/HarmBench", "standard", "train", "harmbench_hub"),
    "harmbench-contextual": ("walledai/HarmBench", "contextual", "train", "harmbench_hub"),
    "jailbreakbench": ("JailbreakBench/JBB-Behaviors", "behaviors", "harmful", "jailbreakbench"),
    "jbb": ("JailbreakBench/JBB-Behaviors", "behaviors", "harmful", "jailbreakbench"),
    "xstest": ("walledai/XSTest", None, "test", "generic"),
}


class SafetySetError(ValueError):
    """A safety prompt file that cannot be read (the message names file, row and field)."""


def _item(id_: Any, prompt: str, category: str | None, label: str, context: str | None) -> dict[str, Any]:
    return {
        "id": str(id_),
        "prompt": prompt,
        "category": category or None,
        "label": label,
        "context": context or None,
    }


def _require(columns: Iterable[str], needed: Iterable[str], source: str) -> None:
    have = set(columns)
    for col in needed:
        if col not in have:
            raise SafetySetError(f"{source}: missing column {col!r} (columns: {', '.join(sorted(have))})")


def _text(row: dict[str, Any], field: str, source: str, row_no: int, required: bool = True) -> str:
    value = row.get(field)
    value = "" if value is None else str(value).strip()
    if required and not value:
        raise SafetySetError(f"{source}: row {row_no}: empty field {field!r}")
    return value


# ----------------------------------------------------------------------------- row formats


def _parse_harmbench(rows: list[dict], source: str, include_copyright: bool) -> list[dict]:
    needed = ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID")
    _require(rows[0].keys(), needed, source)
    items = []
    for i, row in enumerate(rows, start=1):
        kind = _text(row, "FunctionalCategory", source, i)
        if kind == "copyright" and not include_copyright:
            continue
        behavior = _text(row, "Behavior", source, i)
        context = _text(row, "ContextString", source, i, required=kind == "contextual")
        prompt = context + CONTEXT_SEPARATOR + behavior if context else behavior
        category = _text(row, "SemanticCategory", source, i, required=False)
        items.append(_item(_text(row, "BehaviorID", source, i), prompt, category, "unsafe", context))
    return items


def _parse_harmbench_hub(rows: list[dict], source: str) -> list[dict]:
    _require(rows[0].keys(), ("prompt",), source)
    items = []
    for i, row in enumerate(rows, start=1):
        behavior = _text(row, "prompt", source, i)
        context = _text(row, "context", source, i, required=False)
        prompt = context + CONTEXT_SEPARATOR + behavior if context else behavior
        items.append(_item(f"harmbench-{i - 1}", prompt, _text(row, "category", source, i, False), "unsafe", context))
    return items


def _parse_jailbreakbench(rows: list[dict], source: str) -> list[dict]:
    _require(rows[0].keys(), ("Goal", "Category"), source)
    items = []
    for i, row in enumerate(rows, start=1):
        idx = _text(row, "Index", source, i, required=False) or str(i)
        items.append(_item(f"jbb-{idx}", _text(row, "Goal", source, i), _text(row, "Category", source, i, False),
                           "unsafe", None))
    return items


def _parse_xstest(rows: list[dict], source: str) -> list[dict]:
    _require(rows[0].keys(), XSTEST_COLUMNS, source)
    items = []
    for i, row in enumerate(rows, start=1):
        label = _text(row, "label", source, i).lower()
        if label not in ("safe", "unsafe"):
            raise SafetySetError(f"{source}: row {i}: field 'label' must be 'safe' or 'unsafe', got {label!r}")
        items.append(_item(_text(row, "id", source, i), _text(row, "prompt", source, i),
                           _text(row, "type", source, i, False), label, None))
    return items


def _parse_generic(rows: list[dict], source: str, prompt_field: str | None, id_prefix: str) -> list[dict]:
    columns = list(rows[0].keys())
    if prompt_field is None:
        prompt_field = next((c for c in PROMPT_FIELDS if c in columns), None)
        if prompt_field is None:
            raise SafetySetError(
                f"{source}: missing column 'prompt' (tried {', '.join(PROMPT_FIELDS)}; columns: {', '.join(columns)})"
            )
    _require(columns, (prompt_field,), source)
    items = []
    for i, row in enumerate(rows, start=1):
        label = _text(row, "label", source, i, required=False).lower() or "unsafe"
        if label not in ("safe", "unsafe"):
            raise SafetySetError(f"{source}: row {i}: field 'label' must be 'safe' or 'unsafe', got {label!r}")
        id_ = _text(row, "id", source, i, required=False) or f"{id_prefix}-{i - 1}"
        category = _text(row, "category", source, i, False) or _text(row, "type", source, i, False)
        context = _text(row, "context", source, i, False)
        items.append(_item(id_, _text(row, prompt_field, source, i), category, label, context))
    return items


def _detect_and_parse(rows: list[dict], source: str, prompt_field: str | None, include_copyright: bool,
                      id_prefix: str) -> list[dict]:
    columns = set(rows[0].keys())
    if prompt_field is None:
        if {"Behavior", "FunctionalCategory"} <= columns:
            return _parse_harmbench(rows, source, include_copyright)
        if {"Goal", "Category"} <= columns:
            return _parse_jailbreakbench(rows, source)
        if set(XSTEST_COLUMNS) <= columns:
            return _parse_xstest(rows, source)
        if {"goal", "target"} <= columns:
            id_prefix = "advbench"
    return _parse_generic(rows, source, prompt_field, id_prefix)


# ----------------------------------------------------------------------------- files


def _read_csv(path: Path, prompt_field: str | None) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise SafetySetError(f"{path}: empty file (expected a header row with column 'prompt')")
    records = list(csv.reader(io.StringIO(text)))
    records = [r for r in records if r]  # blank lines; an empty quoted cell stays (and is reported)
    header = [h.strip() for h in records[0]]
    known = set(PROMPT_FIELDS) | set(HARMBENCH_COLUMNS) | set(JBB_COLUMNS) | set(XSTEST_COLUMNS) | {"target", "id"}
    if prompt_field is not None:
        known.add(prompt_field)
    if len(header) == 1 and header[0] not in known:
        # headerless one-column file (e.g. the AdvBench prompts alone): every line is a prompt
        return [{"prompt": r[0]} for r in records]
    rows = []
    for line_no, r in enumerate(records[1:], start=1):
        if len(r) != len(header):
            raise SafetySetError(f"{path}: row {line_no}: {len(r)} fields, the header has {len(header)}")
        rows.append(dict(zip(header, r)))
    if not rows:
        raise SafetySetError(f"{path}: empty file (a header and no rows)")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in iter_jsonl(path, error=SafetySetError)]


def _read_file(path: Path, prompt_field: str | None) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, prompt_field)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        data = read_json(path, error=SafetySetError) if path.read_text(encoding="utf-8").strip() else []
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise SafetySetError(f"{path}: expected a JSON list of objects")
        return data
    if suffix == ".txt":
        return [{"prompt": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise SafetySetError(f"{path}: unsupported file type {suffix!r} (use .csv, .jsonl, .json or .txt)")


def _load_hub(name: str) -> tuple[list[dict], str, str]:
    repo, config, split, fmt = REGISTRY[name]
    import datasets

    ds = datasets.load_dataset(repo, config, split=split) if config else datasets.load_dataset(repo, split=split)
    return [dict(r) for r in ds], f"hf:{repo}" + (f"[{config}]" if config else "") + f" ({split})", fmt


def load_safety_set(
    spec: str | os.PathLike,
    *,
    n: int | None = None,
    seed: int = 0,
    prompt_field: str | None = None,
    include_copyright: bool = False,
) -> list[dict[str, Any]]:
    """Load a safety prompt set (see the module docstring for the formats).

    Args:
        spec: a registry name (``advbench``, ``harmbench``, ``harmbench-contextual``,
            ``jailbreakbench``/``jbb``, ``xstest``; read from the hub) or a file path.
        n: keep a random subset of ``n`` items (drawn with ``seed``, kept in file order).
        prompt_field: the prompt column of a generic file (skips format detection).
        include_copyright: keep HarmBench's copyright behaviors.
    """
    path = Path(spec)
    if path.exists():
        rows = _read_file(path, prompt_field)
        source, fmt = str(path), "file"
        id_prefix = path.stem
    elif str(spec).lower() in REGISTRY:
        name = str(spec).lower()
        rows, source, fmt = _load_hub(name)
        id_prefix = name
    else:
        raise SafetySetError(
            f"{spec}: not a file and not a known safety set (known: {', '.join(sorted(REGISTRY))})"
        )
    if not rows:
        raise SafetySetError(f"{source}: empty file (no rows)")

    if fmt == "harmbench_hub":
        items = _parse_harmbench_hub(rows, source)
    elif fmt == "jailbreakbench":
        items = _parse_jailbreakbench(rows, source)
    elif fmt == "generic":
        items = _parse_generic(rows, source, prompt_field, id_prefix)
    else:
        items = _detect_and_parse(rows, source, prompt_field, include_copyright, id_prefix)
    if not items:
        raise SafetySetError(f"{source}: no prompts left after filtering")

    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n < len(items):
            keep = sorted(random.Random(seed).sample(range(len(items)), n))
            items = [items[i] for i in keep]
    return items
