"""Task metrics against hand-computed values, the real GSM8K / SQuAD v2 files and rouge-score."""

from __future__ import annotations

import json
import random

import pytest

from gradsift.eval.metrics import (
    TASK_METRICS,
    exact_match,
    gsm8k_em,
    gsm8k_extract,
    mcq_accuracy,
    mcq_letter,
    rouge_l,
    score_task,
    squad_v2_scores,
)


# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"),
        ("#### $1,234.", "1234"),
        ("first 5, then #### -7 and later 99", "-7"),
        ("So 5 apples and 7.5 pears.", "7.5"),
        ("The total is $2,500.", "2500"),
        ("The answer is 18.\nExplanation: done", "18"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_gsm8k_extract(text, expected):
    assert gsm8k_extract(text) == expected


def test_gsm8k_em_numeric_equality():
    assert gsm8k_em("so the answer is 72.0", "#### 72") == 1.0
    assert gsm8k_em("It costs $1,000", "1000") == 1.0
    assert gsm8k_em("It costs 100", "1000") == 0.0
    assert gsm8k_em("I cannot tell", "#### 5") == 0.0
    with pytest.raises(ValueError, match="no number"):
        gsm8k_em("5", "none")


def test_gsm8k_extract_on_every_real_test_answer(shared_data):
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 1319
    for row in rows:
        # Reference: the text of the final "#### " line with thousands separators removed.
        final = row["answer"].split("####")[-1].strip().replace(",", "")
        assert gsm8k_extract(row["answer"]) == final
        # A model that writes the worked solution without "####" still gets its last number.
        assert gsm8k_em(row["answer"].split("####")[0] + f"The answer is {final}.", row["answer"]) == 1.0


# ----------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("C", "C"),
        ("B. Paris", "B"),
        ("(D) none of the above", "D"),
        ("A good guess: the answer is C.", "C"),
        ("Answer: (b)", None),  # lowercase letters are not answers
        ("I think (B) because A is wrong", "B"),
        ("The correct option is A", "A"),
        ("E", None),  # outside A-D
        ("Apples and Bananas", None),  # letters inside words do not count
        ("", None),
    ],
)
def test_mcq_letter(text, expected):
    assert mcq_letter(text) == expected


def test_mcq_letter_more_options_and_accuracy():
    assert mcq_letter("answer is E", n_options=5) == "E"
    assert mcq_accuracy("The answer is C", "C") == 1.0
    assert mcq_accuracy("The answer is C", 2) == 1.0  # 0-based index
    assert mcq_accuracy("The answer is C", "1") == 0.0


# ----------------------------------------------------------------------------- SQuAD v2


def test_squad_v2_hand_values():
    # Articles and punctuation are ignored: "the eiffel tower!" -> "eiffel tower".
    assert squad_v2_scores("The Eiffel Tower!", ["Eiffel Tower", "tower"]) == {"exact": 1.0, "f1": 1.0}
    # pred {paris, france} vs gold {france}: P = 1/2, R = 1, F1 = 2/3.
    s = squad_v2_scores("Paris, France", ["France"])
    assert s["exact"] == 0.0 and s["f1"] == pytest.approx(2 / 3)
    # Max over golds: gold1 {in, 1066} vs pred {1066}: P=1, R=1/2 -> 2/3; gold2 "1066" -> 1.
    assert squad_v2_scores("1066", ["in 1066", "1066"])["f1"] == 1.0
    # Token bags count repeats: pred {a1 a1 b} vs gold {a1 b b}: common {a1, b} = 2, P = R = 2/3.
    assert squad_v2_scores("x x y", ["x y y"])["f1"] == pytest.approx(2 / 3)
    # No overlap.
    assert squad_v2_scores("London", ["Paris"]) == {"exact": 0.0, "f1": 0.0}


def test_squad_v2_no_answer_handling():
    assert squad_v2_scores("", []) == {"exact": 1.0, "f1": 1.0}
    assert squad_v2_scores("Unanswerable.", []) == {"exact": 1.0, "f1": 1.0}
    assert squad_v2_scores("Paris", []) == {"exact": 0.0, "f1": 0.0}
    # Abstaining on an answerable question scores 0.
    assert squad_v2_scores("unanswerable", ["Paris"]) == {"exact": 0.0, "f1": 0.0}
    # Custom marker.
    assert squad_v2_scores("N/A", [], no_answer_strings=("", "n/a")) == {"exact": 1.0, "f1": 1.0}
    # Gold answers that normalize to nothing ("the") are dropped, as in the official script.
    assert squad_v2_scores("", ["The"]) == {"exact": 1.0, "f1": 1.0}


def test_squad_v2_real_file(shared_data):
    data = json.loads((shared_data / "squad_v2" / "small.json").read_text())
    questions = [qa for art in data["data"] for par in art["paragraphs"] for qa in par["qas"]]
    assert len(questions) == 626
    unanswerable = [qa for qa in questions if qa["is_impossible"]]
    assert len(unanswerable) == 333
    for qa in questions:
        golds = [a["text"] for a in qa["answers"]]
        assert squad_v2_scores(golds[0] if golds else "", golds) == {"exact": 1.0, "f1": 1.0}
        if qa["is_impossible"]:
            # Answering with the plausible (but wrong) span of an unanswerable question scores 0.
            plausible = qa["plausible_answers"][0]["text"]
            assert squad_v2_scores(plausible, golds) == {"exact": 0.0, "f1": 0.0}
    refs = [[a["text"] for a in qa["answers"]] for qa in questions]
    # Always abstaining: exactly the unanswerable share, in percent.
    assert score_task("squad_v2", [""] * len(refs), refs) == pytest.approx(100 * 333 / 626)


# ----------------------------------------------------------------------------- ROUGE-L, exact match


def test_rouge_l_hand_values():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = the cat on the mat = 5; P = R = 5/6.
    assert rouge_l("The cat sat on the mat.", "the cat lay on the mat") == pytest.approx(5 / 6)
    # pred a b c d, ref a c e: LCS = a c = 2, P = 2/4, R = 2/3, F = 2*(1/2)(2/3)/(1/2+2/3) = 4/7.
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("x y", "z") == 0.0
    assert rouge_l("", "z") == 0.0
    assert rouge_l("Hello, World!", "hello world") == 1.0


def test_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    vocab = ["the", "cat", "dog", "sat", "on", "mat", "a", "ran", "far", "Away!", "3", "x-ray", "it's"]
    for _ in range(200):
        pred = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))
        ref = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))
        expected = scorer.score(ref, pred)["rougeL"].fmeasure
        assert rouge_l(pred, ref) == pytest.approx(expected, abs=1e-12), (pred, ref)


def test_exact_match():
    assert exact_match("  Paris \n", "paris") == 1.0
    assert exact_match("Paris", "paris", ignore_case=False) == 0.0
    assert exact_match("New  York", "new york") == 1.0
    assert exact_match("Paris.", "Paris") == 0.0


# ----------------------------------------------------------------------------- registry


def test_score_task_is_a_mean_in_percent():
    assert set(TASK_METRICS) >= {"gsm8k", "mcq", "squad_v2", "rougeL", "exact"}
    # 2 of 3 right -> 66.67 %.
    assert score_task("gsm8k", ["#### 1", "#### 2", "3"], ["1", "2", "4"]) == pytest.approx(200 / 3)
    assert score_task("mcq", ["A", "answer is B"], ["A", "C"]) == 50.0
    # (1 + 4/7) / 2 * 100
    assert score_task("rougeL", ["a", "a b c d"], ["a", "a c e"]) == pytest.approx(50 * (1 + 4 / 7))
    with pytest.raises(ValueError, match="unknown metric"):
        score_task("bleu", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_task("exact", ["a", "b"], ["a"])
