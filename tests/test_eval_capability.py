"""Log-likelihood multiple-choice scoring: a naive per-pair loop, hand-computed metrics,
the real benchmark files, and (when installed) lm-evaluation-harness itself."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gradsift.eval.capability import (
    TRUTHFULQA_QA_PRIMER,
    load_arc,
    load_boolq,
    load_hellaswag,
    load_truthfulqa_mc,
    load_winogrande,
    loglikelihoods,
    mc_metrics,
    run_mc_benchmark,
)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    # Sharpen the random logits so greedy matches and ranking differences are not all ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def naive_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, int, bool]:
    """One unpadded forward per pair; lm-eval's split of the token sequence."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    cont = whole[n_ctx:]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].double()
    total, greedy = 0.0, True
    for k, token in enumerate(cont):
        position = n_ctx - 1 + k  # logits at this position predict token n_ctx + k
        row = logits[position].log_softmax(-1)
        total += row[token].item()
        greedy &= int(row.argmax()) == token
    return total, len(cont), greedy


REQUESTS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " The capital city is Paris, on the Seine."),
    ("The trophy doesn't fit into the brown suitcase because the trophy", " is too large."),
    ("Trailing space moves to the continuation ", "ok"),
    ("Q: 2+2?\nA:", " 4"),
    ("A much longer context " * 12 + "ends here:", " a"),
]


def test_loglikelihoods_equal_naive_loop(tiny_model, tokenizer):
    got = loglikelihoods(tiny_model, tokenizer, REQUESTS, batch_size=4, progress=False)
    assert len(got) == len(REQUESTS)
    for (context, continuation), (ll, n_tokens, greedy) in zip(REQUESTS, got, strict=True):
        ref_ll, ref_n, ref_greedy = naive_loglikelihood(tiny_model, tokenizer, context, continuation)
        assert n_tokens == ref_n
        assert ll == pytest.approx(ref_ll, abs=1e-4, rel=1e-5), (context, continuation)
        assert greedy == ref_greedy
    # The split puts the word boundary in the continuation: " Paris" is its own token(s).
    assert tokenizer.decode(tokenizer.encode(REQUESTS[0][0] + REQUESTS[0][1])[-got[0][1] :]) == " Paris"
    # Batch size does not change anything.
    one = loglikelihoods(tiny_model, tokenizer, REQUESTS, batch_size=1, progress=False)
    for a, b in zip(got, one, strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1:] == b[1:]


def test_empty_context_conditions_on_bos(tiny_model, tokenizer):
    cont = tokenizer.encode(" Paris is nice", add_special_tokens=False)
    ids = [tokenizer.bos_token_id] + cont
    with torch.no_grad():
        logprobs = tiny_model(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
    expected = sum(logprobs[k, ids[k + 1]].item() for k in range(len(cont)))
    ll, n, _ = loglikelihoods(tiny_model, tokenizer, [("", " Paris is nice")], progress=False)[0]
    assert n == len(cont) and ll == pytest.approx(expected, abs=1e-4)


def test_greedy_flag_on_a_greedy_continuation(tiny_model, tokenizer):
    context = "Question: What is the capital of France?\nAnswer:"
    ids = tokenizer.encode(context)
    with torch.no_grad():
        for _ in range(3):  # greedy-decode three tokens
            ids.append(int(tiny_model(torch.tensor([ids])).logits[0, -1].argmax()))
    continuation = tokenizer.decode(ids[len(tokenizer.encode(context)) :])
    ll, n, greedy = loglikelihoods(tiny_model, tokenizer, [(context, continuation)], progress=False)[0]
    assert tokenizer.encode(context + continuation) == ids  # the decoded text re-encodes to the same tokens
    assert greedy and n == 3
    # Any other last token is not greedy.
    other = tokenizer.decode(ids[len(tokenizer.encode(context)) : -1]) + " the"
    assert not loglikelihoods(tiny_model, tokenizer, [(context, other)], progress=False)[0][2]


def test_mc_metrics_hand_values():
    # lls (-5, -3, -4), correct choice 2. argmax = 1 (wrong) -> acc 0, mc1 0.
    # acc_norm with lengths (1, 1, 10): -5, -3, -0.4 -> argmax 2 (right) -> 1.
    # mc2 = e^-4 / (e^-5 + e^-3 + e^-4) = 0.0183156 / 0.0748406 = 0.244728
    m = mc_metrics([-5.0, -3.0, -4.0], [0, 0, 1], [1, 1, 10])
    assert m["acc"] == 0.0 and m["mc1"] == 0.0 and m["acc_norm"] == 1.0
    assert m["mc2"] == pytest.approx(0.244728, abs=1e-6)
    # Two true answers: mc2 = (e^-1 + e^-2) / (e^-1 + e^-2 + e^-3 + e^-4) = 0.503215 / 0.571317 = 0.880797
    m = mc_metrics([-1.0, -2.0, -3.0, -4.0], [1, 1, 0, 0], [5, 5, 5, 5])
    assert m["acc"] == 1.0 and math.isnan(m["mc1"])
    assert m["mc2"] == pytest.approx(0.880797, abs=1e-6)
    # Very negative log-likelihoods stay finite: 1 / (1 + e^-1) = 0.731059
    assert mc_metrics([-1000.0, -1001.0], [1, 0])["mc2"] == pytest.approx(0.731059, abs=1e-6)
    # Ties go to the first choice.
    assert mc_metrics([-2.0, -2.0], [0, 1])["acc"] == 0.0
    with pytest.raises(ValueError, match="no correct"):
        mc_metrics([-1.0, -2.0], [0, 0])


# ----------------------------------------------------------------------------- loaders on the real files


def test_truthfulqa_loader(shared_data):
    items = load_truthfulqa_mc(shared_data / "truthfulqa" / "mc_task.json")
    mc1 = [it for it in items if it.subset == "mc1"]
    mc2 = [it for it in items if it.subset == "mc2"]
    assert len(mc1) == len(mc2) == 790
    first = mc1[0]
    context, continuation = first.requests[0]
    assert context == TRUTHFULQA_QA_PRIMER + "\n\nQ: What happens to you if you eat watermelon seeds?\nA:"
    assert context.startswith("Q: What is human life expectancy in the United States?\nA: ")
    assert continuation == " The watermelon seeds pass through your digestive system"
    assert first.choice_lengths[0] == len("The watermelon seeds pass through your digestive system")
    # In the original file the single MC1 truth is always listed first (lm-eval's doc_to_target: 0).
    assert all(it.labels[0] == 1 and sum(it.labels) == 1 for it in mc1)
    assert all(sum(it.labels) >= 1 for it in mc2)
    assert sum(len(it.requests) for it in mc2) > sum(len(it.requests) for it in mc1)


def test_arc_loader(shared_data):
    path = shared_data / "arc" / "ARC-Challenge-Test.jsonl"
    items = load_arc(path)
    assert len(items) == 1172
    first = items[0]
    assert first.requests[0] == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
        "likely effect of this increase in rotation?\nAnswer:",
        " Planetary density will decrease.",
    )
    assert first.labels == (0, 0, 1, 0)  # answerKey C
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    numeric = [k for k, r in enumerate(rows) if r["answerKey"].isdigit()]
    assert numeric, "the test split has rows labelled 1-4"
    for k in numeric:
        assert items[k].labels.index(1) == int(rows[k]["answerKey"]) - 1
    assert {len(it.labels) for it in items} >= {4} and all(sum(it.labels) == 1 for it in items)


def test_boolq_loader(shared_data):
    items = load_boolq(shared_data / "boolq" / "val.jsonl")
    assert len(items) == 3270
    assert sum(it.labels[1] for it in items) == 2033  # "true" -> " yes"
    first = items[0]
    assert first.requests[0][0].startswith("Ethanol fuel -- All biomass goes through")
    assert first.requests[0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in first.requests] == [" no", " yes"]


def test_hellaswag_loader(tmp_path):
    rows = [
        {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
         "ctx_b": "then", "endings": [", the man adds wax.", " [header] he stops.", "the car  is clean."],
         "label": 2},
        {"ind": 7, "activity_label": "Home and Garden", "ctx_a": "[header] How to plant [title] Dig a hole.",
         "ctx_b": "", "endings": ["Water it.", "Leave."], "label": "0"},
    ]
    path = tmp_path / "hellaswag.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_hellaswag(path)
    assert items[0].requests == (
        ("Removing ice from car: Then, the man writes over the snow. Then", " , the man adds wax."),
        ("Removing ice from car: Then, the man writes over the snow. Then", "  he stops."),
        ("Removing ice from car: Then, the man writes over the snow. Then", " the car is clean."),
    )
    assert items[0].labels == (0, 0, 1)
    assert items[0].choice_lengths == (len(", the man adds wax."), len(" he stops."), len("the car is clean."))
    # stripped: "Home and Garden: [header] How to plant [title] Dig a hole."; " [title]" -> ". " gives
    # "plant.  Dig"; "[header]" dropped gives ":  How"; each double space -> one.
    assert items[1].requests[0][0] == "Home and Garden: How to plant. Dig a hole."
    assert items[1].labels == (1, 0)


def test_winogrande_loader(tmp_path):
    rows = [
        {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
         "option1": "trophy", "option2": "suitcase", "answer": "1"},
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
    ]
    path = tmp_path / "winogrande.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_winogrande(path)
    assert items[0].requests == (
        ("The trophy doesn't fit into the brown suitcase because the trophy", " is too large."),
        ("The trophy doesn't fit into the brown suitcase because the suitcase", " is too large."),
    )
    assert items[0].labels == (1, 0) and items[1].labels == (0, 1)
    assert items[1].requests[1] == ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.")


def test_loader_errors_name_file_row_and_field(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(
        json.dumps({"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "A"}) + "\n"
        + json.dumps({"question": {"choices": []}, "answerKey": "A"}) + "\n"
    )
    with pytest.raises(ValueError, match=r"arc\.jsonl: row 1: missing field 'question\.stem'"):
        load_arc(path)
    path.write_text(json.dumps({"passage": "p", "question": "q", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: field 'label' is 'maybe'"):
        load_boolq(path)
    path.write_text(json.dumps({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: field 'sentence' has no '_'"):
        load_winogrande(path)


# ----------------------------------------------------------------------------- the benchmark runner


def test_run_mc_benchmark_against_naive_scoring(tiny_model, tokenizer, shared_data, tmp_path):
    src = (shared_data / "arc" / "ARC-Challenge-Test.jsonl").read_text().splitlines()[:3]
    path = tmp_path / "arc3.jsonl"
    path.write_text("\n".join(src) + "\n")
    got = run_mc_benchmark(tiny_model, tokenizer, "arc_challenge", path, batch_size=3, progress=False)
    acc, acc_norm = [], []
    for line in src:
        row = json.loads(line)
        context = f"Question: {row['question']['stem']}\nAnswer:"
        texts = [c["text"] for c in row["question"]["choices"]]
        gold = [c["label"] for c in row["question"]["choices"]].index(row["answerKey"])
        lls = [naive_loglikelihood(tiny_model, tokenizer, context, " " + t)[0] for t in texts]
        acc.append(float(max(range(len(lls)), key=lambda k: (lls[k], -k)) == gold))
        normed = [ll / len(t) for ll, t in zip(lls, texts, strict=True)]
        acc_norm.append(float(max(range(len(lls)), key=lambda k: (normed[k], -k)) == gold))
    assert got["n"] == 3
    assert got["acc"] == pytest.approx(sum(acc) / 3)
    assert got["acc_norm"] == pytest.approx(sum(acc_norm) / 3)
    mean = sum(acc) / 3
    assert got["acc_stderr"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in acc) / 2 / 3))


def test_run_mc_benchmark_limit_and_truthfulqa(tiny_model, tokenizer, shared_data):
    path = shared_data / "truthfulqa" / "mc_task.json"
    a = run_mc_benchmark(tiny_model, tokenizer, "truthfulqa_mc", path, limit=3, seed=1, progress=False)
    b = run_mc_benchmark(tiny_model, tokenizer, "truthfulqa", path, limit=3, seed=1, progress=False)
    assert a == b and a["n"] == 3
    assert set(a) == {"mc1", "mc1_stderr", "mc2", "mc2_stderr", "n"}
    assert 0.0 <= a["mc1"] <= 1.0 and 0.0 < a["mc2"] < 1.0
    with pytest.raises(ValueError, match="unknown benchmark"):
        run_mc_benchmark(tiny_model, tokenizer, "piqa", path)


# ----------------------------------------------------------------------------- lm-evaluation-harness


def test_loglikelihoods_match_lm_eval(tiny_model, tokenizer):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=tiny_model, tokenizer=tokenizer, batch_size=2)
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=req, idx=k) for k, req in enumerate(REQUESTS)
    ]
    reference = lm.loglikelihood(instances, disable_tqdm=True)
    ours = loglikelihoods(tiny_model, tokenizer, REQUESTS, batch_size=3, progress=False)
    for (ref_ll, ref_greedy), (ll, _, greedy) in zip(reference, ours, strict=True):
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_run_lm_eval_with_local_task_files(tiny_model, tokenizer, shared_data, tmp_path):
    pytest.importorskip("lm_eval")
    from gradsift.eval.capability import lmeval_local_tasks, run_lm_eval

    include = lmeval_local_tasks(shared_data, tmp_path / "tasks")
    assert sorted(p.name for p in include.iterdir()) == ["arc_challenge.yaml", "boolq.yaml"]
    out = run_lm_eval(tiny_model, tokenizer, ["arc_challenge", "boolq"], limit=4, batch_size=4,
                      include_path=include, include_defaults=False)
    assert out["arc_challenge"]["n"] == 4 and out["boolq"]["n"] == 4
    # lm-eval's limit takes the first documents: the built-in scorer on those rows must agree.
    for task, rel in (("arc_challenge", "arc/ARC-Challenge-Test.jsonl"), ("boolq", "boolq/val.jsonl")):
        rows = tmp_path / f"{task}.jsonl"
        rows.write_text("\n".join((shared_data / rel).read_text().splitlines()[:4]) + "\n")
        ours = run_mc_benchmark(tiny_model, tokenizer, task, rows, progress=False)
        for metric in ("acc", "acc_norm") if task == "arc_challenge" else ("acc",):
            assert out[task][metric] == pytest.approx(ours[metric]), (task, metric)
