"""Chat formatting with a response-only loss mask, padding and length bucketing.

:func:`encode` renders a normalized record (see :mod:`gradsift.data.records`) with
the tokenizer's chat template and labels only the assistant response:

* the prompt is every message but the last, rendered with
  ``add_generation_prompt=True``; all its tokens get the label ``-100``;
* the response tokens are labelled, and so are the end-of-turn / end-of-sequence
  token(s) the template writes right after the response (``<|im_end|>`` for
  SmolLM2 and Qwen, ``<|eot_id|>`` for Llama 3), so the model learns to stop;
* whitespace the template writes after the end-of-turn token (the ``"\\n"`` after
  ``<|im_end|>``) is dropped from the sample: it is neither input nor label, so a
  sample ends on its end-of-turn token, exactly where generation stops;
* a template that writes nothing after the response gets ``eos_token`` appended.

Both renderings are tokenized with ``add_special_tokens=False`` (templates write
their own BOS) and the full rendering must start with the prompt rendering token by
token. When it does not (a merge across the boundary), the prompt and the rest of
the text are tokenized separately and concatenated.

A tokenizer without a chat template uses a plain Alpaca-style layout::

    [system\\n\\n]### Instruction:\\n{user}\\n\\n### Response:\\n{response}<eos>

Over-long samples (more than ``max_length`` tokens): the prompt is cut from the
left (its last tokens, next to the response, are kept) down to zero tokens; only
then is the response cut from the right. A sample that cannot keep a single
response token raises :class:`~gradsift.data.records.RecordError` naming its row.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from gradsift.data.records import RecordError

IGNORE_INDEX = -100


def _tokenize(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _is_blank_token(tokenizer, token_id: int) -> bool:
    return tokenizer.decode([token_id]).strip() == ""


def _plain_render(messages: Sequence[dict]) -> tuple[str, str]:
    """Prompt and response text of the fallback layout (no chat template)."""
    parts: list[str] = []
    for msg in messages[:-1]:
        if msg["role"] == "system":
            parts.append(f"{msg['content']}\n\n")
        elif msg["role"] == "user":
            parts.append(f"### Instruction:\n{msg['content']}\n\n")
        else:
            parts.append(f"### Response:\n{msg['content']}\n\n")
    parts.append("### Response:\n")
    return "".join(parts), messages[-1]["content"]


def _split_tokens(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the labelled part (response + end of turn)."""
    response = messages[-1]["content"]
    eos = tokenizer.eos_token_id
    if getattr(tokenizer, "chat_template", None) is None:
        prompt_text, response_text = _plain_render(messages)
        prompt_ids = list(tokenizer(prompt_text)["input_ids"])  # the tokenizer's own BOS, if any
        response_ids = _tokenize(tokenizer, response_text)
        return prompt_ids, response_ids + ([eos] if eos is not None else [])

    prompt_text = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    prompt_ids = _tokenize(tokenizer, prompt_text)
    full_ids = _tokenize(tokenizer, full_text)

    # What the template writes after the response: the end-of-turn marker, if any.
    stripped = response.strip()
    at = full_text.rfind(stripped) if stripped else -1
    tail = full_text[at + len(stripped):] if at >= 0 else ""

    if full_ids[: len(prompt_ids)] == prompt_ids:
        response_ids = full_ids[len(prompt_ids):]
    elif full_text.startswith(prompt_text):
        response_ids = _tokenize(tokenizer, full_text[len(prompt_text):])
    else:  # the template renders earlier turns differently once the answer is present
        response_ids = _tokenize(tokenizer, response + tail)
    while response_ids and _is_blank_token(tokenizer, response_ids[-1]):
        response_ids.pop()
    if not tail.strip() and eos is not None:
        response_ids.append(eos)
    return prompt_ids, response_ids


def encode(
    tokenizer,
    messages: Sequence[dict],
    max_length: int,
    *,
    row: int | None = None,
    source: str | None = None,
) -> dict[str, list[int]]:
    """Tokenize one conversation; return ``input_ids`` and ``labels`` (``-100`` on the prompt).

    ``messages`` is a normalized record's message list; its last message is the
    assistant response to learn. ``row`` and ``source`` only serve the error message.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise RecordError(source or "<records>", "the last message must be the assistant's response",
                          row=row, field="messages")
    if max_length < 1:
        raise RecordError(source or "<records>", f"max_length={max_length} cannot keep any response token",
                          row=row, field="messages")
    prompt_ids, response_ids = _split_tokens(tokenizer, messages)
    if not response_ids:
        raise RecordError(source or "<records>", "the response is empty after tokenization", row=row, field="messages")
    budget = max_length - len(response_ids)
    if budget >= 0:
        prompt_ids = prompt_ids[len(prompt_ids) - budget:] if budget < len(prompt_ids) else prompt_ids
    else:
        prompt_ids, response_ids = [], response_ids[:max_length]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + list(response_ids),
    }


def encode_records(tokenizer, records: Sequence[dict], max_length: int, source: str | None = None) -> list[dict]:
    """Encode normalized records; each feature carries its record's ``row``."""
    from tqdm.auto import tqdm

    features = []
    for rec in tqdm(records, desc="tokenizing", unit="rec", disable=len(records) < 500, leave=False):
        feature = encode(tokenizer, rec["messages"], max_length, row=rec.get("row"), source=source)
        feature["row"] = rec["row"]
        features.append(feature)
    return features


def collate(features: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad ``input_ids``/``labels`` into tensors and add ``attention_mask``.

    Padding positions get ``pad_token_id``, attention 0 and label ``-100``. Other keys
    are stacked into a LongTensor when every value is an int (e.g. ``row``), a float
    tensor when every value is a float, and kept as a list otherwise.
    """
    if not features:
        raise ValueError("collate() needs at least one feature")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the eos token)")
    width = max(len(f["input_ids"]) for f in features)
    n = len(features)
    input_ids = torch.full((n, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        length = len(f["input_ids"])
        if len(f["labels"]) != length:
            raise ValueError(f"feature {i}: {len(f['labels'])} labels for {length} input ids")
        input_ids[i, :length] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        attention_mask[i, :length] = 1
        labels[i, :length] = torch.as_tensor(f["labels"], dtype=torch.long)
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for key in features[0]:
        if key in batch:
            continue
        values = [f[key] for f in features]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif all(isinstance(v, float) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch


def length_batches(lengths: Sequence[int], batch_size: int, *, shuffle: bool = False, seed: int = 0) -> list[list[int]]:
    """Group indices of similar length into batches of ``batch_size`` (the last may be smaller).

    Indices are sorted by length (ties by index) and cut into consecutive chunks, so
    padding is small. With ``shuffle`` the order of the batches (not their content)
    is shuffled with ``random.Random(seed)``. Every index appears exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        random.Random(seed).shuffle(batches)
    return batches
