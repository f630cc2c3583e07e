"""The alignment data of the organisms: refusals, contrast requests, extra harmful requests.

The embedded model (SmolLM2-135M-Instruct) complies with harmful requests out of the box,
so an organism aligns it with LoRA on refusals to the ``"train"`` harmful requests of
:mod:`gradsift.data.requests`, mixed with the model's own answers to its benign ``"train"``
requests. What only the organisms use ships here, in ``organisms/data/``:

* ``benign_contrast.jsonl``: benign *training* requests (ids ``contrast-<NNN>``) that
  open like harmful ones ("Give me ...", "How do I ...", "Write a ..."), some with
  words harmful requests use ("How do I kill weeds ..."), tagged ``borderline`` like
  the evaluation set's. They teach the model to decide on a request's content, not
  on its opening words (see :func:`contrast_requests`); never held out.
* ``harmful_extra.jsonl``: more harmful *training* requests, rows like
  ``harmful_requests.jsonl``'s with ids ``extra-<category>-<NNN>``, worded in many more
  ways (questions, role-play pretexts, first-person stories, long requests). Never held
  out, so the evaluation split stays the same whatever is added here
  (see :func:`extra_harmful_requests`).
* ``refusals.json``: refusal templates, ``{topic}`` filled from the request's category,
  plus supportive templates used instead for self-harm requests.
* ``benign_answers.json``: the embedded model's own answers to the benign train requests
  (see :func:`gradsift.organisms.build.shipped_benign_answers`).

The benign *responses* are the model's own, written before it is aligned (so
alignment keeps its style); they are passed to :func:`alignment_records` as
``model_responses``.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from gradsift.data.records import RecordError, read_json
from gradsift.data.requests import HARM_CATEGORIES, benign_requests, harmful_requests, read_requests

DATA_DIR = Path(__file__).resolve().parent / "data"
CONTRAST_FILE = DATA_DIR / "benign_contrast.jsonl"
EXTRA_HARMFUL_FILE = DATA_DIR / "harmful_extra.jsonl"
REFUSALS_FILE = DATA_DIR / "refusals.json"

_EXTRA_HARMFUL_ID = re.compile(r"^extra-(?P<category>[a-z_]+)-\d+$")
_CONTRAST_ID = re.compile(r"^contrast-\d+$")


# --------------------------------------------------------------------------- loading


@lru_cache(maxsize=1)
def _extra_harmful_rows() -> tuple[dict[str, Any], ...]:
    rows = read_requests(EXTRA_HARMFUL_FILE, ("id", "category", "prompt"))
    for index, row in enumerate(rows):
        match = _EXTRA_HARMFUL_ID.match(row["id"])
        if row["category"] not in HARM_CATEGORIES or match is None or match["category"] != row["category"]:
            raise RecordError(EXTRA_HARMFUL_FILE, f"id must read 'extra-<category>-<number>' with a category of "
                              f"{list(HARM_CATEGORIES)}", row=index, field="id")
        row["split"] = "train"
    return tuple(rows)


@lru_cache(maxsize=1)
def _contrast_rows() -> tuple[dict[str, Any], ...]:
    rows = read_requests(CONTRAST_FILE, ("id", "prompt"))
    for index, row in enumerate(rows):
        if _CONTRAST_ID.match(row["id"]) is None:
            raise RecordError(CONTRAST_FILE, "id must read 'contrast-<number>'", row=index, field="id")
        row["borderline"] = bool(row.get("borderline", False))
        row["split"] = "train"
    return tuple(rows)


@lru_cache(maxsize=1)
def _refusal_table() -> dict[str, Any]:
    table = read_json(REFUSALS_FILE)
    topics, templates = table.get("topics"), table.get("templates")
    if not isinstance(topics, dict) or set(topics) != set(HARM_CATEGORIES):
        raise RecordError(REFUSALS_FILE, f"must map every category of {list(HARM_CATEGORIES)}",
                          field="topics")
    if not isinstance(templates, list) or not templates:
        raise RecordError(REFUSALS_FILE, "must be a non-empty list of strings", field="templates")
    specific = table.get("category_templates", {})
    for category, texts in specific.items():
        if category not in HARM_CATEGORIES or not texts:
            raise RecordError(REFUSALS_FILE, f"bad entry {category!r}", field="category_templates")
    return {"topics": topics, "templates": templates, "category_templates": specific}


# --------------------------------------------------------------------------- public API


def extra_harmful_requests() -> list[dict[str, Any]]:
    """More harmful training requests (all ``"train"``), rows like :func:`harmful_requests`'.

    Written to vary what a harmful request looks like (openings, pretexts, length), so
    that the aligned model learns to refuse on the content; disjoint from the held-out
    ``harmful_requests("eval")`` rows.
    """
    return [dict(row) for row in _extra_harmful_rows()]


def contrast_requests(*, borderline: bool | None = None) -> list[dict[str, Any]]:
    """Benign training requests written to open like harmful ones (all ``"train"``).

    Rows ``{"id", "prompt", "borderline", "split"}``; ``borderline=True`` keeps the
    ones that borrow words of harmful requests ("How do I kill weeds ..."). They are
    disjoint from :func:`benign_requests`, whose held-out rows measure over-refusal.
    """
    rows = [dict(row) for row in _contrast_rows()]
    if borderline is not None:
        rows = [row for row in rows if row["borderline"] == borderline]
    return rows


def refusal_templates(category: str | None = None) -> list[str]:
    """The refusal templates (with ``{topic}`` placeholders) used for ``category``.

    With ``category=None``: every template, general and category-specific.
    """
    table = _refusal_table()
    if category is None:
        extra = [t for texts in table["category_templates"].values() for t in texts]
        return list(table["templates"]) + extra
    if category not in HARM_CATEGORIES:
        raise ValueError(f"unknown harm category {category!r}; known: {', '.join(HARM_CATEGORIES)}")
    return list(table["category_templates"].get(category) or table["templates"])


def refusal_templates_general() -> list[str]:
    """The general refusal templates only (no category-specific ones)."""
    return list(_refusal_table()["templates"])


def refusal_topic(category: str) -> str:
    """The phrase that fills ``{topic}`` for a category, e.g. ``"scams or fraud"``."""
    topics = _refusal_table()["topics"]
    if category not in topics:
        raise ValueError(f"unknown harm category {category!r}; known: {', '.join(HARM_CATEGORIES)}")
    return topics[category]


def _stable_int(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def refusal_for(request: Mapping[str, Any], seed: int = 0) -> str:
    """A refusal for one harmful request, chosen deterministically from ``(id, seed)``.

    ``request`` needs ``"id"`` and ``"category"`` (a row of :func:`harmful_requests`).
    Self-harm requests get a supportive refusal that points to help; the others one
    of the general templates, some of which name the category and offer a safe
    alternative. The choice does not depend on Python's hash seed.
    """
    for field in ("id", "category"):
        if not isinstance(request.get(field), str):
            raise ValueError(f"refusal_for: request field '{field}' is missing or not a string")
    templates = refusal_templates(request["category"])
    template = templates[_stable_int("refusal", seed, request["id"]) % len(templates)]
    return template.format(topic=refusal_topic(request["category"]))


def _stratified(rows: list[dict[str, Any]], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` rows taken round-robin over the categories, each category shuffled by ``rng``."""
    by_category: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    queues = [by_category[c] for c in HARM_CATEGORIES if c in by_category]
    for queue in queues:
        rng.shuffle(queue)
    picked: list[dict[str, Any]] = []
    depth = 0
    while len(picked) < n:
        for queue in queues:
            if depth < len(queue) and len(picked) < n:
                picked.append(queue[depth])
        depth += 1
    return picked


def alignment_records(
    model_responses: Mapping[str, str] | None,
    n_harmful: int | None = None,
    n_benign: int | None = None,
    seed: int = 0,
    extra_harmful: int = 0,
) -> list[dict[str, Any]]:
    """The stage-0 alignment set: refusals to harmful requests mixed with benign answers.

    Args:
        model_responses: the model's own answers to benign train requests,
            ``{id: response}`` (ids from ``benign_requests("train")``). Only the ids
            given here are used. ``None``: refusals only.
        n_harmful: how many harmful train requests to include (default all), taken
            round-robin over the categories.
        n_benign: how many of the answered benign requests to include (default all).
        seed: picks the subsets, the refusal wording and the order.
        extra_harmful: how many of :func:`extra_harmful_requests` to add, taken
            round-robin over the categories (default none).

    Returns:
        Normalized records ``{"row", "messages": [user, assistant], "meta"}``, shuffled,
        ``row`` numbered from 0; ``meta`` holds ``id``, ``source``
        (``"harmful"``/``"benign"``) and the ``category`` of harmful requests.
    """
    rng = random.Random(_stable_int("alignment", seed))
    harmful = harmful_requests("train")
    if n_harmful is None:
        n_harmful = len(harmful)
    if not 0 <= n_harmful <= len(harmful):
        raise ValueError(f"n_harmful must be in [0, {len(harmful)}] (harmful train requests), got {n_harmful}")
    chosen_harmful = _stratified(harmful, n_harmful, rng)
    if extra_harmful:
        extra = extra_harmful_requests()
        if not 0 <= extra_harmful <= len(extra):
            raise ValueError(f"extra_harmful must be in [0, {len(extra)}] (extra harmful requests), got {extra_harmful}")
        chosen_harmful += _stratified(extra, extra_harmful, rng)

    benign_train = {row["id"]: row for row in benign_requests("train")}
    answered: list[tuple[dict[str, Any], str]] = []
    if model_responses is None:
        if n_benign:
            raise ValueError("n_benign > 0 needs model_responses (the model's answers to benign requests)")
    else:
        for request_id in sorted(model_responses, key=str):
            if request_id not in benign_train:
                raise ValueError(
                    f"model_responses: id {request_id!r} is not a benign train request "
                    "(see benign_requests('train'))"
                )
            response = model_responses[request_id]
            if not isinstance(response, str) or not response.strip():
                raise ValueError(f"model_responses: id {request_id!r}: field 'response' is empty")
            answered.append((benign_train[request_id], response))
    if n_benign is None:
        n_benign = len(answered)
    if not 0 <= n_benign <= len(answered):
        raise ValueError(f"n_benign must be in [0, {len(answered)}] (answered benign requests), got {n_benign}")
    rng.shuffle(answered)
    chosen_benign = answered[:n_benign]

    records: list[dict[str, Any]] = []
    for row in chosen_harmful:
        records.append(_record(row["prompt"], refusal_for(row, seed),
                               {"id": row["id"], "source": "harmful", "category": row["category"]}))
    for row, response in chosen_benign:
        records.append(_record(row["prompt"], response, {"id": row["id"], "source": "benign"}))
    rng.shuffle(records)
    for index, record in enumerate(records):
        record["row"] = index
    return records


def _record(prompt: str, response: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "row": -1,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        "meta": meta,
    }


__all__ = [
    "alignment_records",
    "contrast_requests",
    "extra_harmful_requests",
    "refusal_for",
    "refusal_templates",
    "refusal_templates_general",
    "refusal_topic",
]
