"""Reading training records from files and the Hugging Face Hub.

Every source is turned into the same normalized record::

    {"row": 0, "messages": [{"role": "user", "content": "..."},
                            {"role": "assistant", "content": "..."}], "meta": {...}}

The last message is always the assistant response the model learns; the loss is
computed on it only (see :mod:`gradsift.data.formatting`). ``row`` is the 0-based
index of the record in its source, so every later error or audit can point back
to the original line. Columns that the layout does not use are kept in ``meta``.

Sources:

* ``.jsonl`` (one object per line, blank lines skipped), ``.json`` (a list of
  objects, or an object ``{"data": [...]}``), ``.csv`` (header row, every cell read
  as text), ``.parquet``;
* ``hf:NAME[:CONFIG][@SPLIT]``, read with :func:`datasets.load_dataset` (split
  ``train`` by default), e.g. ``hf:openai/gsm8k:main@test``.

Layouts, detected per file from the first row (or forced by the ``*_field`` options):

* ``prompt`` + ``response``;
* ``messages``: a list of ``{"role", "content"}`` turns whose last turn is the
  assistant's (in a CSV cell the list is written as JSON);
* Alpaca ``instruction`` / ``input`` / ``output``: the user turn is the instruction,
  followed by a blank line and the input when the input is not empty.

A ``system`` column (or the column named by ``system_field``) becomes a leading
system message when it is not empty. Text values are kept verbatim (not stripped).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class RecordError(ValueError):
    """Bad input data. The message is one line: ``<file>: row <n>: field '<f>': <problem>``.

    ``row`` and ``field`` are omitted from the message when they do not apply
    (an unreadable file); a JSON Lines syntax error names the line instead of the row.
    """

    def __init__(
        self,
        file: str | Path,
        problem: str,
        *,
        row: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.file = str(file)
        self.row = row
        self.field = field
        self.line = line
        self.problem = problem
        parts = [self.file]
        if line is not None:
            parts.append(f"line {line}")
        if row is not None:
            parts.append(f"row {row}")
        if field is not None:
            parts.append(f"field '{field}'")
        parts.append(" ".join(str(problem).split()))  # keep the message on one line
        super().__init__(": ".join(parts))


# --------------------------------------------------------------------------- raw rows


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """Split ``hf:NAME[:CONFIG][@SPLIT]`` into ``(name, config, split)``; split defaults to ``train``."""
    if not source.startswith("hf:"):
        raise ValueError(f"{source!r} is not a hub source (expected hf:NAME[:CONFIG][@SPLIT])")
    body = source[3:]
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    config: str | None = None
    if ":" in body:
        body, config = body.split(":", 1)
    if not body or not split or config == "":
        raise ValueError(f"{source!r}: malformed hub source (expected hf:NAME[:CONFIG][@SPLIT])")
    return body, config, split


def _read_hf(source: str, limit: int | None) -> list[dict]:
    import datasets

    name, config, split = parse_hf_source(source)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, unknown dataset or split: report it on one line
        raise RecordError(source, f"cannot load from the hub: {type(exc).__name__}: {exc}") from exc
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list()


def iter_jsonl(path: str | Path, error: type[ValueError] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file.

    A line that is not a JSON object raises a one-line error naming the file and
    line: :class:`RecordError`, or ``error(message)`` when an error class is given.
    """
    path = Path(path)

    def fail(lineno: int, problem: str) -> ValueError:
        return error(f"{path}: line {lineno}: {problem}") if error else RecordError(path, problem, line=lineno)

    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise fail(lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise fail(lineno, f"expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write objects as JSON Lines, atomically (a temporary file, then a rename); return the path.

    The folder is created; a reader never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_json(path: str | Path, error: type[ValueError] | None = None) -> Any:
    """The value of a JSON file; invalid JSON raises a one-line error naming the file, line and
    column: :class:`RecordError`, or ``error(message)`` when an error class is given."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            problem = f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            raise (error(f"{path}: {problem}") if error else RecordError(path, problem)) from None


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows: list[dict] = []
    for _, obj in iter_jsonl(path):
        if limit is not None and len(rows) >= limit:
            break
        rows.append(obj)
    return rows


def _read_json(path: Path) -> list[dict]:
    obj = read_json(path)
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise RecordError(path, 'expected a JSON list of objects or an object {"data": [...]}')
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise RecordError(path, f"expected a JSON object, got {type(item).__name__}", row=i)
    return obj


def _read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise RecordError(path, "empty CSV file (no header row)")
        rows = []
        for i, row in enumerate(reader):
            if None in row:  # more cells than header columns
                raise RecordError(path, f"{len(row[None])} cell(s) more than the header has", row=i)
            rows.append(dict(row))
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_rows(source: str | Path, *, limit: int | None = None) -> list[dict]:
    """Read the raw rows (dicts, original columns) of a file or ``hf:`` source.

    Raises :class:`RecordError` naming the file for an unknown extension, a missing
    or unreadable file, or invalid JSON (with its line for JSON Lines).
    """
    if isinstance(source, str) and source.startswith("hf:"):
        return _read_hf(source, limit)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise RecordError(
            path,
            f"unknown file type {suffix or '(no extension)'!r}; expected one of {', '.join(FILE_SUFFIXES)} or hf:NAME",
        )
    if not path.is_file():
        raise RecordError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path, limit)
        if suffix == ".json":
            rows = _read_json(path)
        elif suffix == ".csv":
            rows = _read_csv(path)
        else:
            rows = _read_parquet(path)
    except RecordError:
        raise
    except Exception as exc:  # OSError, UnicodeDecodeError, csv.Error, pyarrow's own error types...
        raise RecordError(path, f"cannot read the file: {type(exc).__name__}: {exc}") from exc
    return rows if limit is None else rows[:limit]


# --------------------------------------------------------------------------- field checks


def get_text(row: Mapping[str, Any], field: str, file: str, index: int, *, allow_empty: bool = False) -> str:
    """``row[field]`` as a string; RecordError when missing, not a string, or (unless allowed) blank."""
    if field not in row:
        raise RecordError(file, "missing", row=index, field=field)
    value = row[field]
    if value is None:
        raise RecordError(file, "missing (null value)", row=index, field=field)
    if not isinstance(value, str):
        raise RecordError(file, f"expected a string, got {type(value).__name__}", row=index, field=field)
    if not allow_empty and not value.strip():
        raise RecordError(file, "empty", row=index, field=field)
    return value


def optional_text(row: Mapping[str, Any], field: str, file: str, index: int) -> str:
    """A column that may be missing or null (read as ''); when present it must be a string."""
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(file, f"expected a string, got {type(value).__name__}", row=index, field=field)
    return value


def _parse_messages(value: Any, file: str, index: int, field: str) -> list[dict]:
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(file, f"not a JSON list of messages: {exc.msg}", row=index, field=field) from exc
    if not isinstance(value, list) or not value:
        raise RecordError(file, "expected a non-empty list of {role, content} messages", row=index, field=field)
    messages = []
    for j, msg in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(msg, Mapping):
            raise RecordError(file, f"expected an object, got {type(msg).__name__}", row=index, field=where)
        role = msg.get("role")
        if role not in ROLES:
            raise RecordError(file, f"role must be one of {', '.join(ROLES)}, got {role!r}", row=index, field=where)
        content = get_text(msg, "content", file, index, allow_empty=True) if "content" in msg else None
        if content is None:
            raise RecordError(file, "missing content", row=index, field=where)
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise RecordError(
            file, f"the last message must be the assistant's response, got role {messages[-1]['role']!r}",
            row=index, field=field,
        )
    if len(messages) < 2:
        raise RecordError(file, "needs at least one message before the assistant's response", row=index, field=field)
    if not messages[-1]["content"].strip():
        last = f"{field}[{len(messages) - 1}]"
        raise RecordError(file, "empty response (last assistant message)", row=index, field=last)
    return messages


# --------------------------------------------------------------------------- layouts


def detect_layout(
    columns: Iterable[str],
    *,
    prompt_field: str | None = None,
    response_field: str | None = None,
    messages_field: str | None = None,
) -> str:
    """Return ``"messages"``, ``"prompt"`` or ``"alpaca"`` for a set of column names (``""`` when none fits)."""
    cols = set(columns)
    if messages_field is not None:
        return "messages"
    if prompt_field is not None or response_field is not None:
        return "prompt"
    if "messages" in cols:
        return "messages"
    if {"prompt", "response"} <= cols:
        return "prompt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    return ""


def normalize_row(
    row: Mapping[str, Any],
    layout: str,
    file: str,
    index: int,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    messages_field: str = "messages",
    system_field: str | None = None,
) -> dict:
    """Turn one raw row into a normalized record (see the module docstring)."""
    if layout == "messages":
        if messages_field not in row:
            raise RecordError(file, "missing", row=index, field=messages_field)
        messages = _parse_messages(row[messages_field], file, index, messages_field)
        used = {messages_field}
    elif layout == "prompt":
        prompt = get_text(row, prompt_field, file, index)
        response = get_text(row, response_field, file, index)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        used = {prompt_field, response_field}
    elif layout == "alpaca":
        instruction = get_text(row, "instruction", file, index)
        extra = optional_text(row, "input", file, index)
        response = get_text(row, "output", file, index)
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
        used = {"instruction", "input", "output"}
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if system_field is not None:
        system = optional_text(row, system_field, file, index)
        used.add(system_field)
        if system.strip():
            if messages[0]["role"] == "system":
                raise RecordError(
                    file,
                    f"both a system column and a system message in '{messages_field}'",
                    row=index,
                    field=system_field,
                )
            messages.insert(0, {"role": "system", "content": system})
    meta = {k: v for k, v in row.items() if k not in used}
    return {"row": index, "messages": messages, "meta": meta}


def read_records(
    source: str | Path,
    *,
    prompt_field: str | None = None,
    response_field: str | None = None,
    messages_field: str | None = None,
    system_field: str | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Read a file or ``hf:`` source into normalized records (see the module docstring).

    Args:
        source: a ``.jsonl``/``.json``/``.csv``/``.parquet`` path or ``hf:NAME[:CONFIG][@SPLIT]``.
        prompt_field, response_field: column names of a prompt/response layout
            (each defaults to ``prompt`` / ``response`` when the other is given).
        messages_field: column holding a list of chat messages.
        system_field: column holding an optional system prompt (default: ``system`` when present).
        limit: read only the first ``limit`` rows.

    Raises:
        RecordError: one line naming the file, the row and the field at fault.
    """
    if messages_field is not None and (prompt_field is not None or response_field is not None):
        raise ValueError("give either messages_field or prompt_field/response_field, not both")
    rows = read_rows(source, limit=limit)
    file = str(source)
    if not rows:
        return []
    layout = detect_layout(
        rows[0].keys(), prompt_field=prompt_field, response_field=response_field, messages_field=messages_field
    )
    if not layout:
        raise RecordError(
            file,
            f"cannot tell the layout from the columns {sorted(rows[0])}: expected 'prompt'+'response', 'messages', "
            "or 'instruction'+'output' (or name the columns with prompt_field/response_field/messages_field)",
            row=0,
        )
    if system_field is None and "system" in rows[0] and layout != "messages":
        system_field = "system"
    return [
        normalize_row(
            row,
            layout,
            file,
            i,
            prompt_field=prompt_field or "prompt",
            response_field=response_field or "response",
            messages_field=messages_field or "messages",
            system_field=system_field,
        )
        for i, row in enumerate(rows)
    ]
