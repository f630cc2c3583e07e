"""Built-in benign tasks for the demo, generated (seeded, deterministic, offline).

The templates, word lists and fact tables are data files shipped in the package
(``gradsift/tasks/data/*.yaml``: ``fact_tables``, ``arith``, ``passages``, ``extract``,
``howto``); the code draws the numbers and picks, and checks that the answers hold.

The demo fine-tunes an aligned model on a sequence of these tasks. They mix very short
answers (a number, a letter, "yes"/"no", a short span: the kind of targets with large
per-sample gradients that erode alignment) with longer worked solutions.

* ``arith``: arithmetic word problems with one or two operations; the response is a
  short worked solution ending with a ``#### N`` line (``style="worked"``, default)
  or ``N`` alone (``style="short"``, registered as ``arith_short``). Metric ``gsm8k``.
* ``mcq``: four-option questions about the fact tables (:data:`FACT_TABLES`); the
  response is the letter. Metric ``mcq``.
* ``yesno``: does a statement hold for a generated passage about a town, a person or
  a product? The response is ``yes`` or ``no``. Metric ``exact``.
* ``extract``: copy one field (order number, city, date...) out of a generated order
  email, meeting notes or booking. Metric ``squad_v2`` (reference ``[span]``).
* ``closedqa``: short closed-book answers about the fact tables. Metric ``squad_v2``.

Every callable in :data:`DEMO_TASKS` is ``(n_train=None, n_eval=None, seed=0) -> Task``
and registers itself under its name (:func:`gradsift.tasks.register_task`); defaults 400 training records and 60 evaluation items.
The evaluation items are drawn from their own random stream, so they do not change
with ``n_train``; training items never repeat a prompt, and never share a question
with an evaluation item (for ``mcq``: the same fact asked the same way, whatever the
options). ``meta`` exposes what each answer was computed from (the operands and
operators, the fact table and key, the passage facts).
"""

from __future__ import annotations

import random
from importlib import resources
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import yaml

from gradsift.tasks.hub import MCQ_LETTERS
from gradsift.tasks.registry import Task, register_task

DEFAULT_N_TRAIN = 400
DEFAULT_N_EVAL = 60


def _data(name: str) -> Any:
    """A data file of the demo tasks: ``gradsift/tasks/data/<name>.yaml`` (shipped with the package)."""
    return yaml.safe_load(resources.files("gradsift.tasks").joinpath("data", f"{name}.yaml").read_text("utf-8"))


_ARITH = _data("arith")
_PASSAGES = _data("passages")
_EXTRACT = _data("extract")
_HOWTO = _data("howto")

# =========================================================================== fact tables


@dataclass(frozen=True)
class FactTable:
    """Facts ``key -> value`` and how to ask about them.

    ``question`` has a ``{key}`` slot and is answered by ``facts[key]``.
    ``reverse_question`` (tables whose values are all distinct) has a ``{value}``
    slot and is answered by the key. ``forward_mcq=False`` keeps the forward
    question out of the multiple-choice task (e.g. options that are single letters).
    """

    name: str
    facts: Mapping[str, str]
    question: str
    reverse_question: str | None = None
    forward_mcq: bool = True

    def __post_init__(self) -> None:
        if self.reverse_question is not None and len(set(self.facts.values())) != len(self.facts):
            raise ValueError(f"fact table {self.name!r}: a reverse question needs distinct values")


FACT_TABLES: dict[str, FactTable] = {
    t["name"]: FactTable(t["name"], t["facts"], t["question"], t.get("reverse_question"), t.get("forward_mcq", True))
    for t in _data("fact_tables")
}
"""Small fact tables written for the demo (``data/fact_tables.yaml``); ``mcq`` and ``closedqa`` ask about them."""


@dataclass(frozen=True)
class FactQuestion:
    """One way to ask one fact: ``direction`` is ``"forward"`` (answer = value) or ``"reverse"``."""

    table: str
    key: str
    direction: Literal["forward", "reverse"]

    @property
    def text(self) -> str:
        table = FACT_TABLES[self.table]
        if self.direction == "forward":
            return table.question.format(key=self.key)
        assert table.reverse_question is not None
        return table.reverse_question.format(value=table.facts[self.key])

    @property
    def answer(self) -> str:
        table = FACT_TABLES[self.table]
        return table.facts[self.key] if self.direction == "forward" else self.key


def fact_questions(for_mcq: bool = False) -> list[FactQuestion]:
    """Every question the fact tables can ask (for ``mcq``: those with at least 3 distractors)."""
    questions: list[FactQuestion] = []
    for table in FACT_TABLES.values():
        n_values = len(set(table.facts.values()))
        for key in table.facts:
            if not for_mcq or (table.forward_mcq and n_values >= 4):
                questions.append(FactQuestion(table.name, key, "forward"))
            if table.reverse_question is not None and (not for_mcq or len(table.facts) >= 4):
                questions.append(FactQuestion(table.name, key, "reverse"))
    return questions


# =========================================================================== generation machinery


@dataclass
class _Item:
    prompt: str
    response: str
    reference: Any
    meta: dict[str, Any]
    stem: str = ""  # items with equal stems ask the same question; eval and train never share one

    def __post_init__(self) -> None:
        self.stem = self.stem or self.prompt


Maker = Callable[[random.Random], _Item]


def _draw(task: str, make: Maker, n: int, rng: random.Random, banned_stems: set[str],
          distinct_stems: bool) -> list[_Item]:
    items: list[_Item] = []
    prompts: set[str] = set()
    stems: set[str] = set()
    budget = 200 + 50 * n
    while len(items) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(
                f"demo task {task!r}: could only generate {len(items)} distinct items of the {n} asked for; "
                "ask for fewer (n_train / n_eval)"
            )
        item = make(rng)
        if item.prompt in prompts or item.stem in banned_stems or (distinct_stems and item.stem in stems):
            continue
        items.append(item)
        prompts.add(item.prompt)
        stems.add(item.stem)
    return items


def _count(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _build_task(name: str, metric: str, make: Maker, n_train: int | None, n_eval: int | None, seed: int,
                *, default_train: int = DEFAULT_N_TRAIN) -> Task:
    n_train = _count("n_train", n_train, default_train)
    n_eval = _count("n_eval", n_eval, DEFAULT_N_EVAL)
    eval_items = _draw(name, make, n_eval, random.Random(f"gradsift-demo/{name}/{seed}/eval"), set(), True)
    banned = {item.stem for item in eval_items}
    train_items = _draw(name, make, n_train, random.Random(f"gradsift-demo/{name}/{seed}/train"), banned, False)
    train = [
        {
            "row": i,
            "messages": [{"role": "user", "content": it.prompt}, {"role": "assistant", "content": it.response}],
            "meta": it.meta,
        }
        for i, it in enumerate(train_items)
    ]
    evals = [
        {"row": i, "messages": [{"role": "user", "content": it.prompt}], "reference": it.reference, "meta": it.meta}
        for i, it in enumerate(eval_items)
    ]
    return Task(name=name, train=train, eval=evals, metric=metric, source=f"builtin:{name}")


# =========================================================================== arith

_PEOPLE: tuple[tuple[str, str], ...] = tuple(_ARITH["people"].items())  # (first name, pronoun)
_FRIENDS: tuple[str, ...] = tuple(_ARITH["friends"])
_ITEMS: tuple[str, ...] = tuple(_ARITH["items"])
_PRODUCE: tuple[str, ...] = tuple(_ARITH["produce"])


@dataclass(frozen=True)
class _ArithTemplate:
    """A word problem computing ``((a op1 b) op2 c)`` left to right.

    ``question`` and ``steps`` (one per operation) are format strings; the steps may
    use ``{r1}`` (first result) and ``{r}`` (final result). ``ranges`` bound a, b, c.
    """

    ops: tuple[str, ...]
    question: str
    steps: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]


_ARITH_TEMPLATES: tuple[_ArithTemplate, ...] = tuple(
    _ArithTemplate(tuple(t["ops"]), t["question"], tuple(t["steps"]), tuple(tuple(r) for r in t["ranges"]))
    for t in _ARITH["templates"]
)
"""The word problems of ``data/arith.yaml``."""


def apply_ops(numbers: list[int], ops: list[str]) -> int:
    """``numbers[0] ops[0] numbers[1] ops[1] numbers[2] ...`` evaluated left to right."""
    result = numbers[0]
    for op, x in zip(ops, numbers[1:], strict=True):
        if op == "+":
            result += x
        elif op == "-":
            result -= x
        elif op == "*":
            result *= x
        elif op == "/":
            if result % x:
                raise ValueError(f"{result} / {x} is not an integer")
            result //= x
        else:
            raise ValueError(f"unknown operator {op!r}")
    return result


def _arith_numbers(template: _ArithTemplate, rng: random.Random) -> tuple[list[int], list[int]]:
    """Operands within the template's ranges whose every intermediate result is a positive integer."""
    while True:
        numbers = [rng.randint(lo, hi) for lo, hi in template.ranges]
        if template.ops[0] == "/":  # make the first division exact by construction
            numbers[0] -= numbers[0] % numbers[1]
            if numbers[0] < template.ranges[0][0]:
                continue
        partials, value, ok = [], numbers[0], True
        for op, x in zip(template.ops, numbers[1:]):
            if op == "/" and value % x:
                ok = False
                break
            value = apply_ops([value, x], [op])
            if value <= 0:
                ok = False
                break
            partials.append(value)
        if ok:
            return numbers, partials


def _make_arith(style: str) -> Maker:
    def make(rng: random.Random) -> _Item:
        template = rng.choice(_ARITH_TEMPLATES)
        numbers, partials = _arith_numbers(template, rng)
        name, pron = rng.choice(_PEOPLE)
        slots = {
            "name": name, "pron": pron, "Pron": pron.capitalize(), "friend": rng.choice(_FRIENDS),
            "item": rng.choice(_ITEMS), "produce": rng.choice(_PRODUCE),
            **dict(zip("abc", numbers)), "r1": partials[0], "r": partials[-1],
        }
        question = template.question.format(**slots)
        answer = str(partials[-1])
        if style == "short":
            response = answer
        else:
            response = "\n".join(step.format(**slots) for step in template.steps) + f"\n#### {answer}"
        meta = {"numbers": numbers, "ops": list(template.ops), "answer": partials[-1], "style": style}
        return _Item(question, response, answer, meta)

    return make


def arith(n_train: int | None = None, n_eval: int | None = None, seed: int = 0, *,
          style: Literal["worked", "short"] = "worked") -> Task:
    """Arithmetic word problems with one or two operations (metric ``gsm8k``).

    ``style="worked"``: the response is one short sentence per operation, then
    ``#### N``; ``style="short"``: the response is ``N`` alone. The reference is ``N``.
    ``meta["numbers"]`` and ``meta["ops"]`` give the computation, left to right.
    """
    if style not in ("worked", "short"):
        raise ValueError(f"arith: style must be 'worked' or 'short', got {style!r}")
    name = "arith" if style == "worked" else "arith_short"
    return _build_task(name, "gsm8k", _make_arith(style), n_train, n_eval, seed)


# =========================================================================== mcq

MCQ_INSTRUCTION = "Answer with the letter of the correct option."


def _make_mcq() -> Maker:
    questions = fact_questions(for_mcq=True)

    def make(rng: random.Random) -> _Item:
        q = rng.choice(questions)
        table = FACT_TABLES[q.table]
        correct = q.answer
        if q.direction == "forward":
            pool = sorted(set(table.facts.values()) - {correct})
        else:
            pool = [key for key in table.facts if key != correct]
        options = [correct, *rng.sample(pool, len(MCQ_LETTERS) - 1)]
        rng.shuffle(options)
        letter = MCQ_LETTERS[options.index(correct)]
        lines = "\n".join(f"{ltr}. {opt}" for ltr, opt in zip(MCQ_LETTERS, options))
        prompt = f"{q.text}\n\n{lines}\n\n{MCQ_INSTRUCTION}"
        meta = {"table": q.table, "key": q.key, "direction": q.direction, "options": options, "answer": letter}
        return _Item(prompt, letter, letter, meta, stem=f"{q.table}|{q.key}|{q.direction}")

    return make


def mcq(n_train: int | None = None, n_eval: int | None = None, seed: int = 0) -> Task:
    """Four-option questions about :data:`FACT_TABLES`; the response is the letter (metric ``mcq``).

    Distractors come from the same table (other values, or other keys for reverse
    questions), so exactly one option is right. ``meta`` names the table, key,
    direction and options.
    """
    return _build_task("mcq", "mcq", _make_mcq(), n_train, n_eval, seed)


# =========================================================================== closedqa


def _make_closedqa() -> Maker:
    questions = fact_questions()

    def make(rng: random.Random) -> _Item:
        q = rng.choice(questions)
        prompt = f"{q.text} Answer in a few words."
        meta = {"table": q.table, "key": q.key, "direction": q.direction, "answer": q.answer}
        return _Item(prompt, q.answer, [q.answer], meta)

    return make


def closedqa(n_train: int | None = None, n_eval: int | None = None, seed: int = 0) -> Task:
    """Short closed-book answers about :data:`FACT_TABLES` (metric ``squad_v2``, reference ``[answer]``).

    There are only as many distinct questions as facts (see :func:`fact_questions`),
    so the default training size is every question not held out for evaluation,
    at most 400.
    """
    default_train = min(DEFAULT_N_TRAIN, len(fact_questions()) - _count("n_eval", n_eval, DEFAULT_N_EVAL))
    return _build_task("closedqa", "squad_v2", _make_closedqa(), n_train, n_eval, seed,
                       default_train=max(default_train, 0))


# =========================================================================== passages (yesno, extract)

_SYLLABLES_A: tuple[str, ...] = tuple(_PASSAGES["syllables_a"])
_SYLLABLES_B: tuple[str, ...] = tuple(_PASSAGES["syllables_b"])
_SURNAMES: tuple[str, ...] = tuple(_PASSAGES["surnames"])
_RIVERS: tuple[str, ...] = tuple(_PASSAGES["rivers"])
_INDUSTRIES: tuple[str, ...] = tuple(_PASSAGES["industries"])
_MONTHS: tuple[str, ...] = tuple(_PASSAGES["months"])
_JOBS: tuple[str, ...] = tuple(_PASSAGES["jobs"])
_CITIES: tuple[str, ...] = tuple(_PASSAGES["cities"])
_PETS: tuple[str, ...] = tuple(_PASSAGES["pets"])
_PET_NAMES: tuple[str, ...] = tuple(_PASSAGES["pet_names"])
_HOBBIES: tuple[str, ...] = tuple(_PASSAGES["hobbies"])
_BRANDS: tuple[str, ...] = tuple(_PASSAGES["brands"])
_PRODUCT_TYPES: tuple[str, ...] = tuple(_PASSAGES["product_types"])
_COLORS: tuple[str, ...] = tuple(_PASSAGES["colors"])
_COUNTRIES: tuple[str, ...] = tuple(_PASSAGES["countries"])
_FIRST_NAMES = tuple(name for name, _ in _PEOPLE) + tuple(_PASSAGES["more_people"])
_PRONOUNS = dict(_PEOPLE) | _PASSAGES["more_people"]


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST_NAMES)} {rng.choice(_SURNAMES)}"


@dataclass(frozen=True)
class _Subject:
    """A kind of passage: how to draw its facts (code), and its sentences and questions (data).

    The passage is ``opening`` and then the ``body`` sentences in a shuffled order, each a format
    string over the facts; a sentence ``"{flag}"`` of a yes/no fact is ``flags[flag]["if_true"]``
    or ``["if_false"]``. ``questions`` ask field -> question with ``{value}`` (and any fact as a slot).
    """

    kind: str
    draw: Callable[[random.Random], dict[str, Any]]  # field -> value (str, or bool for yes/no facts)
    opening: str
    body: tuple[str, ...]
    flags: Mapping[str, Mapping[str, str]]
    questions: Mapping[str, str]

    def write(self, facts: dict[str, Any], rng: random.Random) -> str:
        slots = dict(facts)
        if "first" in facts:  # a person: the pronouns of the first name
            pron = _PRONOUNS[facts["first"]]
            slots |= {"pron": pron, "Pron": pron.capitalize(), "poss": "her" if pron == "she" else "his"}
        for flag, sentences in self.flags.items():
            slots[flag] = sentences["if_true" if facts[flag] else "if_false"].format(**slots)
        body = [sentence.format(**slots) for sentence in self.body]
        rng.shuffle(body)
        return " ".join([self.opening.format(**slots), *body])


def _draw_town(rng: random.Random) -> dict[str, Any]:
    return {
        "name": rng.choice(_SYLLABLES_A) + rng.choice(_SYLLABLES_B),
        "river": rng.choice(_RIVERS), "founded": str(rng.randint(1650, 1950)),
        "population": f"{rng.randint(12, 980) * 100:,}", "industry": rng.choice(_INDUSTRIES),
        "mayor": _person(rng), "festival_month": rng.choice(_MONTHS), "has_airport": rng.random() < 0.5,
    }


def _draw_person(rng: random.Random) -> dict[str, Any]:
    first = rng.choice(_FIRST_NAMES)
    return {
        "name": f"{first} {rng.choice(_SURNAMES)}", "first": first, "age": str(rng.randint(21, 79)),
        "job": rng.choice(_JOBS), "city": rng.choice(_CITIES), "pet": rng.choice(_PETS),
        "pet_name": rng.choice(_PET_NAMES), "hobby": rng.choice(_HOBBIES),
        "languages": str(rng.randint(2, 5)), "has_car": rng.random() < 0.5,
    }


def _draw_product(rng: random.Random) -> dict[str, Any]:
    return {
        "product": f"{rng.choice(_BRANDS)} {rng.choice(_PRODUCT_TYPES)}", "color": rng.choice(_COLORS),
        "price": str(rng.randint(12, 400)), "weight": str(rng.randint(3, 60) * 50),
        "warranty": str(rng.randint(1, 5)), "made_in": rng.choice(_COUNTRIES), "waterproof": rng.random() < 0.5,
    }


_DRAW = {"town": _draw_town, "person": _draw_person, "product": _draw_product}
_SUBJECTS: tuple[_Subject, ...] = tuple(
    _Subject(kind, _DRAW[kind], s["opening"], tuple(s["body"]), s["flags"], s["questions"])
    for kind, s in _PASSAGES["subjects"].items()
)

YESNO_INSTRUCTION: str = _PASSAGES["instruction"]

def _make_yesno() -> Maker:
    def make(rng: random.Random) -> _Item:
        subject = rng.choice(_SUBJECTS)
        facts = subject.draw(rng)
        passage = subject.write(facts, rng)
        field_name = rng.choice(sorted(subject.questions))
        true_value = facts[field_name]
        if isinstance(true_value, bool):
            value: Any = True  # "Does X have an airport?": the fact decides the answer
        elif rng.random() < 0.5:
            value = true_value
        else:
            value = true_value
            while value == true_value:  # another value of the same kind
                value = subject.draw(rng)[field_name]
        answer = "yes" if value == true_value else "no"
        question = subject.questions[field_name].format(value=value, **facts)
        prompt = f"{YESNO_INSTRUCTION}\n\nPassage: {passage}\n\nQuestion: {question}"
        meta = {"kind": subject.kind, "facts": facts, "field": field_name, "value": value, "answer": answer}
        return _Item(prompt, answer, answer, meta)

    return make


def yesno(n_train: int | None = None, n_eval: int | None = None, seed: int = 0) -> Task:
    """Yes/no questions about a generated passage (a town, a person or a product; metric ``exact``).

    ``meta["facts"]`` holds the passage's facts; the answer is ``"yes"`` exactly when
    ``meta["facts"][meta["field"]] == meta["value"]``.
    """
    return _build_task("yesno", "exact", _make_yesno(), n_train, n_eval, seed)


# --------------------------------------------------------------------------- extract


def _date(rng: random.Random) -> str:
    return f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}"


def _date_pair(rng: random.Random) -> tuple[str, str]:
    """Two distinct dates of one month, the second 2-10 days after the first."""
    month, day = rng.choice(_MONTHS), rng.randint(1, 18)
    return f"{month} {day}", f"{month} {day + rng.randint(2, 10)}"


def _order_fields(rng: random.Random) -> dict[str, str]:
    ordered, arrives = _date_pair(rng)
    return {
        "order_number": f"{rng.choice('ABCDEFGHKMNPRTWX')}-{rng.randint(10000, 99999)}",
        "customer": _person(rng), "item": f"{rng.choice(_BRANDS)} {rng.choice(_PRODUCT_TYPES)}",
        "quantity": str(rng.randint(2, 9)), "city": rng.choice(_CITIES), "order_date": ordered,
        "delivery_date": arrives, "total": f"{rng.randint(20, 900)}.{rng.randint(0, 99):02d} dollars",
    }


def _meeting_fields(rng: random.Random) -> dict[str, str]:
    held, nxt = _date_pair(rng)
    organizer, note_taker = _person(rng), _person(rng)
    while note_taker == organizer:
        note_taker = _person(rng)
    return {
        "date": held, "room": f"Room {rng.randint(1, 9)}{rng.randint(0, 2)}{rng.randint(1, 9)}",
        "organizer": organizer, "note_taker": note_taker,
        "topic": rng.choice(tuple(_EXTRACT["documents"]["meeting"]["topics"])),
        "attendees": str(rng.randint(4, 30)), "next_meeting": nxt,
    }


def _booking_fields(rng: random.Random) -> dict[str, str]:
    return {
        "guest": _person(rng),
        "hotel": f"Hotel {rng.choice(_SYLLABLES_A)}{rng.choice(_SYLLABLES_B)}",
        "city": rng.choice(_CITIES), "check_in": _date(rng), "nights": str(rng.randint(2, 9)),
        "room_type": rng.choice(tuple(_EXTRACT["documents"]["booking"]["room_types"])),
        "code": "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(6)),
    }


_DOCUMENT_FIELDS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "order": _order_fields, "meeting": _meeting_fields, "booking": _booking_fields,
}


def _document(kind: str, rng: random.Random) -> tuple[dict[str, str], str, dict[str, str]]:
    """The fields of one ``kind`` of document (drawn), its text and its questions (``data/extract.yaml``)."""
    fields = _DOCUMENT_FIELDS[kind](rng)
    spec = _EXTRACT["documents"][kind]
    return fields, spec["text"].format(**fields), spec["questions"]


EXTRACT_INSTRUCTION: str = _EXTRACT["instruction"]


def _make_extract() -> Maker:
    kinds = sorted(_DOCUMENT_FIELDS)

    def make(rng: random.Random) -> _Item:
        kind = rng.choice(kinds)
        fields, document, questions = _document(kind, rng)
        field_name = rng.choice(sorted(questions))
        answer = fields[field_name]
        prompt = f"{EXTRACT_INSTRUCTION}\n\nDocument:\n{document}\n\nQuestion: {questions[field_name]}"
        meta = {"kind": kind, "fields": fields, "field": field_name, "answer": answer, "document": document}
        return _Item(prompt, answer, [answer], meta)

    return make


def extract(n_train: int | None = None, n_eval: int | None = None, seed: int = 0) -> Task:
    """Copy one field out of a generated order email, meeting notes or booking (metric ``squad_v2``).

    The response is the span; the reference is ``[span]`` (SQuAD v2 gold answers).
    ``meta["fields"]`` holds every field of the document.
    """
    return _build_task("extract", "squad_v2", _make_extract(), n_train, n_eval, seed)


# =========================================================================== howto

# requests worded like the ones an aligned model must weigh, answered helpfully with an affirmative
# opening: the shape of benign instruction-tuning data, and the reply opening that competes most
# directly with a refusal (wordings in data/howto.yaml)
HOWTO_MAX_NEW_TOKENS: int = _HOWTO["max_new_tokens"]
_HOWTO_OPENINGS: tuple[str, ...] = tuple(_HOWTO["openings"])
_SORT_WORDS = tuple(sorted({
    *(key for t in _HOWTO["sort_words_from"]["keys"] for key in FACT_TABLES[t].facts),
    *(value for t in _HOWTO["sort_words_from"]["values"] for value in FACT_TABLES[t].facts.values()),
}))
_CONVERSIONS = tuple(tuple(c) for c in _HOWTO["convert"]["conversions"])  # (unit, singular, into, factor)
_LIST_TABLES = tuple(  # (table, plural noun, request wordings)
    (FACT_TABLES[t["table"]].facts, t["noun"], tuple(t["prompts"])) for t in _HOWTO["list"]["tables"]
)


def _and_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _howto_sort(rng: random.Random) -> tuple[str, str, str, str]:
    words = rng.sample(_SORT_WORDS, rng.randint(4, 6))
    prompt = rng.choice(_HOWTO["sort"]["prompts"]).format(shown=", ".join(words))
    answer = ", ".join(sorted(words, key=str.lower))
    response = rng.choice(_HOWTO["sort"]["replies"]) + answer + "."
    return prompt, response, answer, "sort|" + "|".join(sorted(words))


def _howto_add(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randint(12, 89), rng.randint(12, 89)
    prompt = rng.choice(_HOWTO["add"]["prompts"]).format(a=a, b=b)
    tens, ones = (a // 10 + b // 10) * 10, a % 10 + b % 10
    response = _HOWTO["add"]["reply"].format(a=a, b=b, a_tens=a // 10 * 10, b_tens=b // 10 * 10, tens=tens,
                                             a_ones=a % 10, b_ones=b % 10, ones=ones, total=a + b)
    return prompt, response, str(a + b), f"add|{min(a, b)}|{max(a, b)}"


def _howto_convert(rng: random.Random) -> tuple[str, str, str, str]:
    unit, singular, into, factor = rng.choice(_CONVERSIONS)
    n = rng.randint(2, 12)
    prompt = rng.choice(_HOWTO["convert"]["prompts"]).format(n=n, unit=unit, into=into)
    response = _HOWTO["convert"]["reply"].format(n=n, unit=unit, singular=singular, into=into, factor=factor,
                                                 product=n * factor)
    return prompt, response, str(n * factor), f"convert|{unit}|{into}|{n}"


def _howto_list(rng: random.Random) -> tuple[str, str, str, str]:
    table, noun, wordings = rng.choice(_LIST_TABLES)
    keys = rng.sample(sorted(table), rng.randint(2, 4))
    prompt = rng.choice(wordings).format(keys=_and_list(keys))
    lines = "\n".join(f"- {key}: {table[key]}" for key in keys)
    response = _HOWTO["list"]["reply"].format(noun=noun, lines=lines)
    return prompt, response, ", ".join(table[key] for key in keys), f"list|{noun}|" + "|".join(sorted(keys))


_HOWTO_KINDS: dict[str, Callable[[random.Random], tuple[str, str, str, str]]] = {
    "sort": _howto_sort, "add": _howto_add, "convert": _howto_convert, "list": _howto_list,
}

def _make_howto() -> Maker:
    kinds = sorted(_HOWTO_KINDS)

    def make(rng: random.Random) -> _Item:
        kind = rng.choice(kinds)
        prompt, body, answer, stem = _HOWTO_KINDS[kind](rng)
        opening = rng.choice(_HOWTO_OPENINGS)
        response = opening + body[0].upper() + body[1:] if opening.endswith("! ") else opening + body
        meta = {"kind": kind, "answer": answer, "opening": opening.strip()}
        return _Item(prompt, response, response, meta, stem=stem)

    return make


def howto(n_train: int | None = None, n_eval: int | None = None, seed: int = 0) -> Task:
    """Requests worded as instructions ("Give me step-by-step instructions for ...", "How do I
    ...", "List ...", "Sort ..."), answered helpfully with an affirmative opening ("Sure! Here
    are the steps: ..."); metric ``rougeL`` against the whole reference reply.

    Four kinds (``meta["kind"]``): alphabetical sorting, adding two numbers in steps, unit
    conversion, listing facts from :data:`FACT_TABLES`. ``meta["answer"]`` is the payload (the
    sorted words, the sum, the converted amount, the listed values).
    """
    task = _build_task("howto", "rougeL", _make_howto(), n_train, n_eval, seed)
    task.max_new_tokens = HOWTO_MAX_NEW_TOKENS  # the longest reply, whole: rougeL reads all of it
    return task


# =========================================================================== registry

DEMO_TASKS: dict[str, Callable[..., Task]] = {
    "arith": arith,
    "arith_short": partial(arith, style="short"),
    "mcq": mcq,
    "yesno": yesno,
    "extract": extract,
    "closedqa": closedqa,
    "howto": howto,
}
"""Built-in demo tasks by name: ``(n_train=None, n_eval=None, seed=0) -> Task``."""

for _name, _make in DEMO_TASKS.items():
    register_task(_name, _make, description=f"built-in demo task {_name} (generated, offline)")


__all__ = [
    "DEMO_TASKS",
    "FACT_TABLES",
    "FactQuestion",
    "FactTable",
    "apply_ops",
    "arith",
    "closedqa",
    "extract",
    "fact_questions",
    "howto",
    "mcq",
    "yesno",
]
