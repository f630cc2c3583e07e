"""The hub tasks: the paper's sequence Dolly -> GSM8K -> MedMCQA -> SQuAD v2, and Alpaca.

Each reads the Hugging Face Hub through :func:`datasets.load_dataset`, or a local
copy in the hub's record format given with ``path=`` (a ``.jsonl``/``.json``/
``.csv``/``.parquet`` file, or a folder holding a ``train`` file and a
``test``/``validation``/``dev`` file; SQuAD v2 also takes the official nested JSON).
Tasks without an evaluation split hold out a seeded random part of the training
rows (:func:`gradsift.tasks.registry.held_out`). The conversion into chat turns:

* ``dolly``: user = instruction, plus ``"\\n\\nContext:\\n" + context`` when the context
  is not empty; response = response; metric ``rougeL``.
* ``gsm8k``: user = question; response = the worked solution with the ``<<...>>``
  calculator annotations removed (they are tool-call markup, not prose a chat model
  should learn to write), ending with its ``#### N`` line; reference = ``N`` without
  thousands separators; metric ``gsm8k``.
* ``medmcqa``: user = question and options ``A.``-``D.``, asking for the letter;
  response = the letter of ``cop`` (0-based, as on the hub), or with the option
  ``with_explanation=True`` the letter, a blank line and ``Explanation: <exp>``;
  reference = the letter; metric ``mcq``.
* ``squad_v2``: user = :data:`SQUAD_INSTRUCTION`, the context and the question;
  response = the first gold answer, or :data:`UNANSWERABLE` for impossible questions;
  reference = every gold answer text (``[]`` when impossible); metric ``squad_v2``.
* ``alpaca``: user = instruction, plus a blank line and the input when not empty;
  response = output; metric ``rougeL``.

Each registers itself with :func:`gradsift.tasks.registry.register_task`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from gradsift.data.records import FILE_SUFFIXES, RecordError, get_text, optional_text, read_rows
from gradsift.tasks.registry import Task, held_out, register_task, sample_indices

UNANSWERABLE = "unanswerable"
"""The response taught for SQuAD v2 questions that the context cannot answer."""

SQUAD_INSTRUCTION = (
    "Answer the question using only the context below. If the context does not contain "
    f'the answer, reply "{UNANSWERABLE}".'
)
MCQ_LETTERS = ("A", "B", "C", "D")

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_EVAL_SPLIT_WORDS = ("test", "validation", "valid", "val", "dev", "eval")


@dataclass(frozen=True)
class Converted:
    """One row as chat turns: the prompt messages, the response, the metric's reference."""

    prompt: list[dict]
    response: str
    reference: Any
    used: frozenset[str]


Converter = Callable[..., Converted]


@dataclass(frozen=True)
class HubTask:
    """Where a hub task lives and how its rows become chat turns."""

    name: str
    hub: str
    hub_config: str | None
    train_split: str
    eval_split: str | None
    metric: str
    convert: Converter
    description: str
    options: tuple[str, ...] = ()
    flatten: Callable[[list[dict], str], list[dict]] | None = field(default=None)

    def hub_source(self, split: str) -> str:
        config = f":{self.hub_config}" if self.hub_config else ""
        return f"hf:{self.hub}{config}@{split}"


# --------------------------------------------------------------------------- converters


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def convert_dolly(row: Mapping, file: str, index: int) -> Converted:
    instruction = get_text(row, "instruction", file, index)
    context = optional_text(row, "context", file, index)
    response = get_text(row, "response", file, index)
    user = instruction + (f"\n\nContext:\n{context}" if context.strip() else "")
    return Converted(_user(user), response, response, frozenset({"instruction", "context", "response"}))


def gsm8k_final_answer(answer: str) -> str | None:
    """The number after the last ``####`` of a GSM8K solution, without thousands separators."""
    if "####" not in answer:
        return None
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return final or None


def convert_gsm8k(row: Mapping, file: str, index: int) -> Converted:
    question = get_text(row, "question", file, index)
    answer = get_text(row, "answer", file, index)
    final = gsm8k_final_answer(answer)
    if final is None:
        raise RecordError(file, "no final '#### <number>' line", row=index, field="answer")
    return Converted(_user(question), _CALCULATOR.sub("", answer), final, frozenset({"question", "answer"}))


def _mcq_index(row: Mapping, file: str, index: int) -> int:
    if "cop" not in row:
        raise RecordError(file, "missing", row=index, field="cop")
    cop = row["cop"]
    if isinstance(cop, str) and cop.strip().lstrip("-").isdigit():  # CSV cells are text
        cop = int(cop)
    if not isinstance(cop, int) or isinstance(cop, bool) or not 0 <= cop < len(MCQ_LETTERS):
        raise RecordError(file, f"expected the correct option's index 0-3, got {row['cop']!r}", row=index, field="cop")
    return cop


def convert_medmcqa(row: Mapping, file: str, index: int, *, with_explanation: bool = False) -> Converted:
    question = get_text(row, "question", file, index)
    options = [get_text(row, key, file, index, allow_empty=True) for key in ("opa", "opb", "opc", "opd")]
    letter = MCQ_LETTERS[_mcq_index(row, file, index)]
    lines = "\n".join(f"{ltr}. {opt}" for ltr, opt in zip(MCQ_LETTERS, options))
    user = f"{question}\n\n{lines}\n\nAnswer with the letter of the correct option."
    response = letter
    explanation = optional_text(row, "exp", file, index)
    if with_explanation and explanation.strip():
        response = f"{letter}\n\nExplanation: {explanation.strip()}"
    used = {"question", "opa", "opb", "opc", "opd", "cop", "exp"}
    return Converted(_user(user), response, letter, frozenset(used))


def _squad_answers(row: Mapping, file: str, index: int) -> list[str]:
    if "answers" not in row:
        raise RecordError(file, "missing", row=index, field="answers")
    answers = row["answers"]
    if isinstance(answers, str):  # CSV cells hold the struct as JSON
        try:
            answers = json.loads(answers)
        except json.JSONDecodeError as exc:
            raise RecordError(file, f"not JSON: {exc.msg}", row=index, field="answers") from exc
    if isinstance(answers, Mapping):
        texts = answers.get("text")
    elif isinstance(answers, list):  # the official nested layout: [{"text", "answer_start"}]
        texts = [a.get("text") if isinstance(a, Mapping) else a for a in answers]
    else:
        texts = None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise RecordError(file, 'expected {"text": [str, ...], "answer_start": [...]}', row=index, field="answers")
    return list(texts)


def convert_squad_v2(row: Mapping, file: str, index: int) -> Converted:
    context = get_text(row, "context", file, index)
    question = get_text(row, "question", file, index)
    texts = _squad_answers(row, file, index)
    user = f"{SQUAD_INSTRUCTION}\n\nContext:\n{context}\n\nQuestion: {question}"
    response = texts[0] if texts else UNANSWERABLE
    if not response.strip():
        raise RecordError(file, "empty answer text", row=index, field="answers")
    used = {"context", "question", "answers", "is_impossible", "plausible_answers"}
    return Converted(_user(user), response, texts, frozenset(used))


def flatten_squad(rows: list[dict], file: str) -> list[dict]:
    """Flatten the official nested SQuAD JSON (articles > paragraphs > qas) into hub rows."""
    if not rows or "paragraphs" not in rows[0]:
        return rows
    flat = []
    for a, article in enumerate(rows):
        if "paragraphs" not in article:
            raise RecordError(file, "an article without paragraphs in nested SQuAD JSON", row=a, field="paragraphs")
        for paragraph in article["paragraphs"] or []:
            for qa in paragraph.get("qas") or []:
                answers = qa.get("answers") or []
                flat.append(
                    {
                        "id": qa.get("id"),
                        "title": article.get("title"),
                        "context": paragraph.get("context"),
                        "question": qa.get("question"),
                        "answers": {
                            "text": [x.get("text") for x in answers],
                            "answer_start": [x.get("answer_start") for x in answers],
                        },
                    }
                )
    return flat


def convert_alpaca(row: Mapping, file: str, index: int) -> Converted:
    instruction = get_text(row, "instruction", file, index)
    extra = optional_text(row, "input", file, index)
    output = get_text(row, "output", file, index)
    user = instruction + (f"\n\n{extra}" if extra.strip() else "")
    return Converted(_user(user), output, output, frozenset({"instruction", "input", "output", "text"}))


HUB_TASKS: dict[str, HubTask] = {
    spec.name: spec
    for spec in (
        HubTask("dolly", "databricks/databricks-dolly-15k", None, "train", None, "rougeL", convert_dolly,
                 "Dolly 15k human-written instructions (held-out eval split)"),
        HubTask("gsm8k", "openai/gsm8k", "main", "train", "test", "gsm8k", convert_gsm8k,
                 "GSM8K grade-school math word problems, worked solutions"),
        HubTask("medmcqa", "openlifescienceai/medmcqa", None, "train", "validation", "mcq", convert_medmcqa,
                 "MedMCQA medical entrance-exam multiple choice (answer letter)", options=("with_explanation",)),
        HubTask("squad_v2", "rajpurkar/squad_v2", None, "train", "validation", "squad_v2", convert_squad_v2,
                 "SQuAD v2 extractive QA with unanswerable questions", flatten=flatten_squad),
        HubTask("alpaca", "tatsu-lab/alpaca", None, "train", None, "rougeL", convert_alpaca,
                 "Stanford Alpaca 52k instructions (held-out eval split)"),
    )
}


# --------------------------------------------------------------------------- loading


def _find_split_files(folder: Path) -> tuple[Path, Path | None]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in FILE_SUFFIXES]
    train = [p for p in files if "train" in p.stem.lower()]
    evals = [p for p in files if "train" not in p.stem.lower()
             and any(w in re.split(r"[^a-z]+", p.stem.lower()) for w in _EVAL_SPLIT_WORDS)]
    if len(train) != 1:
        found = ", ".join(p.name for p in files) or "no data files"
        raise ValueError(f"{folder}: expected exactly one training file (name containing 'train'), found: {found}")
    if len(evals) > 1:
        names = ", ".join(p.name for p in evals)
        raise ValueError(f"{folder}: several evaluation files ({names}); pass one as eval_path")
    return train[0], evals[0] if evals else None


def _build(
    source: str, rows: list[dict], idx: list[int], convert: Converter, options: dict, *, as_eval: bool
) -> list[dict]:
    """Convert the rows ``idx`` into training records or (``as_eval``) evaluation items."""
    out = []
    for i in idx:
        c = convert(rows[i], source, i, **options)
        meta = {k: v for k, v in rows[i].items() if k not in c.used}
        if as_eval:
            out.append({"row": i, "messages": c.prompt, "reference": c.reference, "meta": meta})
        else:
            out.append({"row": i, "messages": c.prompt + [{"role": "assistant", "content": c.response}], "meta": meta})
    return out


def load_hub_task(spec: HubTask, n_train: int | None, n_eval: int | None, seed: int, *,
                  path: str | None = None, eval_path: str | None = None, **options: Any) -> Task:
    """Load ``spec`` from the hub, or from a local copy in the hub's record format (``path``)."""
    if path is None:
        train_src = spec.hub_source(spec.train_split)
        eval_src = eval_path or (spec.hub_source(spec.eval_split) if spec.eval_split else None)
    elif str(path).startswith("hf:") or not Path(path).is_dir():
        train_src, eval_src = str(path), eval_path
    else:
        train_file, eval_file = _find_split_files(Path(path))
        train_src, eval_src = str(train_file), eval_path or (str(eval_file) if eval_file else None)

    def rows_of(src: str) -> list[dict]:
        rows = read_rows(src)
        return spec.flatten(rows, src) if spec.flatten else rows

    train_rows = rows_of(train_src)
    if eval_src is None:
        train_idx, eval_idx = held_out(len(train_rows), n_train, n_eval, seed, train_src)
        eval_rows, eval_name = train_rows, train_src
    else:
        eval_rows, eval_name = rows_of(eval_src), eval_src
        train_idx = sample_indices(len(train_rows), n_train, random.Random(seed))
        eval_idx = sample_indices(len(eval_rows), n_eval, random.Random(seed))
    train = _build(train_src, train_rows, train_idx, spec.convert, options, as_eval=False)
    evals = _build(eval_name, eval_rows, eval_idx, spec.convert, options, as_eval=True)
    return Task(spec.name, train, evals, spec.metric, source=train_src)


for _spec in HUB_TASKS.values():
    register_task(_spec.name, partial(load_hub_task, _spec), description=_spec.description,
                  options=_spec.options, reads_files=True)
