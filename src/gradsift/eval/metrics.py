"""Task metrics: answer extraction and scoring for the continual-learning tasks.

Every function scores ONE prediction against its reference and returns a float in
[0, 1] (``squad_v2_scores`` returns a dict of two such floats). ``score_task``
averages a metric over a task's predictions and reports it in percent (0-100),
the unit used in the result matrix ``R`` and in the paper's tables.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "TASK_METRICS",
    "exact_match",
    "gsm8k_em",
    "gsm8k_extract",
    "is_degenerate",
    "item_scores",
    "mcq_accuracy",
    "mcq_letter",
    "normalize_squad",
    "reply_words",
    "rouge_l",
    "score_task",
    "squad_v2_scores",
]

# ----------------------------------------------------------------------------- GSM8K

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")


def _clean_number(raw: str) -> str | None:
    value = raw.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if value in {"", "-"}:
        return None
    return value


def gsm8k_extract(text: str | None) -> str | None:
    """The final numeric answer of a GSM8K-style solution, as a plain number string.

    Definition: if the text contains ``####``, the first number after the last
    ``####`` (the GSM8K answer line ``#### 72``); otherwise the last number in the
    text. Thousands separators (``,``), currency signs (``$``) and a trailing
    period are removed: ``"#### $1,234."`` -> ``"1234"``. Returns ``None`` when the
    text has no number.
    """
    if not text:
        return None
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        match = _NUMBER.search(tail)
        if match:
            return _clean_number(match.group())
    numbers = _NUMBER.findall(text)
    for raw in reversed(numbers):
        value = _clean_number(raw)
        if value is not None:
            return value
    return None


def _as_decimal(value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(value)
    except InvalidOperation:
        return None


def gsm8k_em(prediction: str, reference: str | int | float) -> float:
    """GSM8K exact match: 1.0 iff the extracted final numbers are numerically equal.

    Both sides go through :func:`gsm8k_extract`, so the reference may be a full
    GSM8K answer (``"... #### 72"``) or the bare number. Equality is exact decimal
    equality (``"72.0"`` equals ``"72"``); a prediction without a number scores 0.
    """
    pred = _as_decimal(gsm8k_extract(prediction))
    ref = _as_decimal(gsm8k_extract(str(reference)))
    if ref is None:
        raise ValueError(f"GSM8K reference has no number: {reference!r}")
    return float(pred is not None and pred == ref)


# ----------------------------------------------------------------------------- multiple choice

_LETTERS = "ABCDEFGHIJ"


def mcq_letter(text: str | None, n_options: int = 4) -> str | None:
    """The answer letter chosen in a multiple-choice response, or ``None``.

    Definition, over the letters allowed by ``n_options`` (A-D by default), first
    rule that matches wins:

    1. an explicit statement: ``answer is C``, ``answer: (C)``, ``Answer - C``;
    2. a parenthesised letter: ``(C)``;
    3. the first standalone capital letter (``C``, ``C.``, ``C)``), not part of a word.
    """
    if not text:
        return None
    if not 1 <= n_options <= len(_LETTERS):
        raise ValueError(f"n_options must be in 1..{len(_LETTERS)}, got {n_options}")
    allowed = _LETTERS[:n_options]
    cls = f"[{allowed}]"
    patterns = (
        rf"(?i:answer)\s*(?i:is|:|-)?\s*(?i:option\s*)?\(?({cls})(?![A-Za-z0-9'])",
        rf"\(({cls})\)",
        rf"(?<![A-Za-z0-9'])({cls})(?![A-Za-z0-9'])",
    )
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


def _reference_letter(reference: str | int) -> str:
    if isinstance(reference, int):
        return _LETTERS[reference]
    ref = str(reference).strip().upper()
    if ref.isdigit():
        return _LETTERS[int(ref)]
    if len(ref) == 1 and ref in _LETTERS:
        return ref
    letter = mcq_letter(ref, n_options=len(_LETTERS))
    if letter is None:
        raise ValueError(f"multiple-choice reference is not a letter or 0-based index: {reference!r}")
    return letter


def mcq_accuracy(prediction: str, reference: str | int, n_options: int = 4) -> float:
    """1.0 iff the letter extracted by :func:`mcq_letter` equals the reference.

    The reference is a letter (``"C"``) or a 0-based option index (``2`` or ``"2"``).
    """
    return float(mcq_letter(prediction, n_options) == _reference_letter(reference))


# ----------------------------------------------------------------------------- SQuAD v2

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_squad(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation, drop articles, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _f1(gold: str, pred: str) -> float:
    gold_toks = normalize_squad(gold).split()
    pred_toks = normalize_squad(pred).split()
    if not gold_toks or not pred_toks:
        # No-answer on either side: F1 is 1 iff both are empty.
        return float(gold_toks == pred_toks)
    common = Counter(gold_toks) & Counter(pred_toks)
    n_same = sum(common.values())
    if n_same == 0:
        return 0.0
    precision = n_same / len(pred_toks)
    recall = n_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_v2_scores(
    prediction: str,
    answers: Sequence[str],
    no_answer_strings: Sequence[str] = ("", "unanswerable"),
) -> dict[str, float]:
    """Exact match and token F1 of one prediction, as the official SQuAD v2 script.

    Definitions (fractions in [0, 1]; the official script prints percents):

    - both sides are normalized with :func:`normalize_squad`;
    - a prediction whose normalized form equals a normalized ``no_answer_strings``
      entry is the empty (abstaining) answer;
    - gold answers that normalize to nothing are dropped; an unanswerable question
      (no gold left) has the single gold answer ``""``, so it scores 1 iff the
      prediction abstains;
    - ``exact`` = max over gold answers of [normalized gold == normalized prediction];
      ``f1`` = max over gold answers of the F1 of the two bags of tokens.
    """
    markers = {normalize_squad(s) for s in no_answer_strings}
    if normalize_squad(prediction) in markers:
        prediction = ""
    golds = [a for a in answers if normalize_squad(a)] or [""]
    pred_norm = normalize_squad(prediction)
    exact = max(float(normalize_squad(g) == pred_norm) for g in golds)
    f1 = max(_f1(g, prediction) for g in golds)
    return {"exact": exact, "f1": f1}


# ----------------------------------------------------------------------------- ROUGE-L and exact match


def _rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            current[j] = previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) of a prediction against one reference.

    Tokens: the lowercased text split on every run of characters other than
    ``a-z0-9`` (no stemming). With L the length of the longest common subsequence,
    P = L / |prediction tokens|, R = L / |reference tokens| and F = 2PR / (P + R);
    0 when either side has no token or L = 0.
    """
    pred = _rouge_tokens(prediction)
    ref = _rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str, ignore_case: bool = True) -> float:
    """1.0 iff the two strings are equal after trimming and collapsing whitespace
    (and lowercasing, when ``ignore_case``)."""

    def norm(s: str) -> str:
        s = " ".join(str(s).split())
        return s.lower() if ignore_case else s

    return float(norm(prediction) == norm(reference))


# ----------------------------------------------------------------------------- registry


def _squad_f1(prediction: str, answers: Sequence[str]) -> float:
    return squad_v2_scores(prediction, answers)["f1"]


def _squad_exact(prediction: str, answers: Sequence[str]) -> float:
    return squad_v2_scores(prediction, answers)["exact"]


TASK_METRICS: dict[str, Callable[[str, Any], float]] = {
    "gsm8k": gsm8k_em,
    "mcq": mcq_accuracy,
    "squad_v2": _squad_f1,
    "squad_v2_exact": _squad_exact,
    "rougeL": rouge_l,
    "exact": exact_match,
}
"""Per-item metrics by name; each maps ``(prediction, reference) -> [0, 1]``.
``squad_v2`` is the token F1 (references: lists of gold answers, ``[]`` when
unanswerable) and ``squad_v2_exact`` its exact match."""


def score_task(metric: str, predictions: Sequence[str], references: Sequence[Any]) -> float:
    """Mean of a :data:`TASK_METRICS` metric over a task, in PERCENT (0-100)."""
    scores = item_scores(metric, predictions, references)
    if not scores:
        raise ValueError(f"{metric}: no predictions to score")
    return 100.0 * sum(scores) / len(scores)


def item_scores(metric: str, predictions: Sequence[str], references: Sequence[Any]) -> list[float]:
    """The :data:`TASK_METRICS` metric of every prediction, in [0, 1] (``score_task`` is 100x their mean)."""
    try:
        fn = TASK_METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(TASK_METRICS)}") from None
    if len(predictions) != len(references):
        raise ValueError(f"{metric}: {len(predictions)} predictions but {len(references)} references")
    return [float(fn(p, r)) for p, r in zip(predictions, references, strict=True)]


# ----------------------------------------------------------------------------- reply health

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
DEGENERATE_MIN_WORDS = 8
"""A reply of at least this many words is degenerate when fewer than :data:`DEGENERATE_DISTINCT`
of its words are distinct (a loop such as "no no no no ..." or "1. 1. 1. ...")."""
DEGENERATE_DISTINCT = 0.3


def reply_words(text: str | None) -> int:
    """The number of words of a reply: runs of letters and digits (an apostrophe suffix such as
    "'m" or "'t" stays with its word), punctuation and markup not counted."""
    return len(_WORD.findall(text or ""))


def is_degenerate(text: str | None) -> bool:
    """True for a reply that says nothing a benign request asked for: empty, a single word
    ("no", "B", "42", "Sure!"), or a loop (at least :data:`DEGENERATE_MIN_WORDS` words of which
    fewer than :data:`DEGENERATE_DISTINCT` are distinct, case-insensitive)."""
    words = [w.lower() for w in _WORD.findall(text or "")]
    if len(words) <= 1:
        return True
    return len(words) >= DEGENERATE_MIN_WORDS and len(set(words)) < DEGENERATE_DISTINCT * len(words)
