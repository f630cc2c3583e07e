"""The organism recipe's optional unlikelihood penalty on refusal openings after benign requests."""

from __future__ import annotations

import math
from functools import partial

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gradsift.data.alignment import alignment_records, benign_requests
from gradsift.data.formatting import collate, encode_records
from gradsift.norms.engine import response_losses
from gradsift.train.align import (
    AlignRecipe,
    _alignment_trainer,
    answer_openings,
    open_ended,
    refusal_opening_features,
    refusal_openings,
    sequence_unlikelihood,
)


def test_sequence_unlikelihood_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 4, 2]])
    got = sequence_unlikelihood(logits, labels)
    for b in range(2):
        p = 1.0
        for t in range(1, 4):  # the token at t is predicted by the logits at t-1
            if labels[b, t] != -100:
                probs = [math.exp(float(x)) for x in logits[b, t - 1]]
                p *= probs[int(labels[b, t])] / sum(probs)
        assert abs(float(got[b]) - (-math.log(1 - p))) < 1e-5


def test_recipe_key_unchanged_without_the_option():
    # the organism cached before the option existed keeps its name (and is not rebuilt)
    assert AlignRecipe().key() == AlignRecipe(benign_unlikelihood=0.0).key() == "4515b987af"
    assert AlignRecipe(benign_unlikelihood=1.0).key() != AlignRecipe().key()
    assert AlignRecipe(contrast_answer_tokens=0, refusal_weight=1.0).key() == "4515b987af"
    assert AlignRecipe(contrast_answer_tokens=16).key() != AlignRecipe().key()


def test_contrast_requests_are_benign_training_prompts_apart_from_the_evaluation_sets():
    from gradsift.data.alignment import contrast_requests, harmful_requests

    rows = contrast_requests()
    assert len(rows) >= 300 and all(r["split"] == "train" for r in rows)
    border = contrast_requests(borderline=True)
    assert 0 < len(border) < len(rows)
    norm = lambda p: " ".join(p.lower().replace("?", " ").replace(".", " ").split())  # noqa: E731
    mine = {norm(r["prompt"]) for r in rows}
    others = {norm(r["prompt"]) for r in benign_requests("all") + harmful_requests("all")}
    assert not mine & others  # no held-out benign or borderline prompt, no harmful one
    # they open like the harmful requests: the three commonest openings of those are well covered
    opening = lambda p: " ".join(p.split()[:2])  # noqa: E731
    for words in ("How do", "How can", "Write a"):
        assert sum(opening(r["prompt"]) == words for r in rows) >= 30


def test_answer_openings_and_open_ended_features(tokenizer):
    answers = {"a": "Photosynthesis is how plants turn light into sugar and oxygen.", "b": "Yes."}
    opened = answer_openings(tokenizer, answers, n_tokens=4)
    ids_a = tokenizer(answers["a"], add_special_tokens=False)["input_ids"]
    assert opened["a"] == tokenizer.decode(ids_a[:4]).rstrip() and answers["a"].startswith(opened["a"])
    assert opened["b"] == "Yes."  # shorter than n_tokens: whole
    from gradsift.data.formatting import encode

    messages = [{"role": "user", "content": "Explain photosynthesis."}, {"role": "assistant", "content": opened["a"]}]
    whole = encode(tokenizer, messages, 128)
    cut = open_ended(tokenizer, whole, row=7)
    assert cut["row"] == 7 and cut["input_ids"] == whole["input_ids"][:len(cut["input_ids"])]
    labelled = [i for i, lab in zip(cut["input_ids"], cut["labels"]) if lab != -100]
    assert tokenizer.decode(labelled).strip() == opened["a"]  # the opening only: no end-of-turn token
    assert len(cut["input_ids"]) < len(whole["input_ids"])


def test_refusal_opening_features(tokenizer):
    openings = refusal_openings()
    assert "I'm sorry, but I" in openings and len(openings) >= 5
    benign = [{"messages": [{"role": "user", "content": b["prompt"]}, {"role": "assistant", "content": "x"}]}
              for b in benign_requests("train")[:len(openings) + 2]]
    feats = refusal_opening_features(tokenizer, benign, max_length=128, first_row=100)
    for j, f in enumerate(feats):
        assert f["negative"] == 1.0 and f["row"] == 100 + j
        labelled = [i for i, lab in zip(f["input_ids"], f["labels"]) if lab != -100]
        assert tokenizer.decode(labelled).strip() == openings[j % len(openings)]  # the opening, no end of turn
        prompt = tokenizer.decode([i for i, lab in zip(f["input_ids"], f["labels"]) if lab == -100])
        assert benign[j]["messages"][0]["content"] in prompt


def test_unlikelihood_trainer_loss(tokenizer, tmp_path):
    from transformers import TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer)))
    ids = [b["id"] for b in benign_requests("train")[:3]]
    records = alignment_records({i: "Here is how." for i in ids}, n_harmful=3, seed=0)
    for k, r in enumerate(records):
        r["row"] = k
    pos = encode_records(tokenizer, records, 64)
    for f, r in zip(pos, records):
        f["negative"] = 0.0
        f["weight"] = 3.0 if r["meta"]["source"] == "harmful" else 1.0
    neg = refusal_opening_features(tokenizer, [r for r in records if r["meta"]["source"] == "benign"], 64, len(pos))
    neg = [{**f, "weight": 1.0} for f in neg]
    batch = collate(pos + neg, pad_token_id=tokenizer.pad_token_id)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False)
    trainer = _alignment_trainer()(model=model, args=args, train_dataset=pos + neg, method="standard",
                                   data_collator=partial(collate, pad_token_id=tokenizer.pad_token_id),
                                   unlikelihood_weight=2.5)
    loss = trainer.compute_loss(model, dict(batch))
    # by hand: mean token loss on the answer rows, 3 x that on the refusal rows,
    # 2.5 x -log(1 - p(opening)) on the openings; averaged over the rows
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    negative = batch["negative"].bool()
    harmful = torch.tensor([r["meta"]["source"] == "harmful" for r in records] + [False] * len(neg))
    ce = response_losses(logits[~negative], batch["labels"][~negative])
    ul = sequence_unlikelihood(logits[negative], batch["labels"][negative])
    w = torch.where(harmful[~negative], 3.0, 1.0)
    expected = ((w * ce).sum() + 2.5 * ul.sum()) / len(negative)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # a batch without openings: the weighted mean of the rows' mean token losses
    only = collate(pos, pad_token_id=tokenizer.pad_token_id)
    torch.testing.assert_close(trainer.compute_loss(model, dict(only)), (w * ce).mean(), rtol=1e-5, atol=1e-6)
    assert negative.sum() == 3 and (~negative).sum() == len(pos)


def test_organism_names_resolve_to_their_recipes_cached_folders(tmp_path, monkeypatch):
    from gradsift.models import resolve_model_path
    from gradsift.train.align import ORGANISMS

    monkeypatch.setenv("GRADSIFT_CACHE", str(tmp_path))
    for name, recipe in [("embedded-aligned", AlignRecipe()),
                         ("embedded-aligned-contrast", AlignRecipe(contrast_answer_tokens=16, harmful_repeats=5))]:
        folder = tmp_path / "models" / f"SmolLM2-135M-Instruct-aligned-{recipe.key()}"
        folder.mkdir(parents=True)
        (folder / "alignment.json").write_text("{}")  # built: resolving must not rebuild it
        assert resolve_model_path(name) == str(folder)
    assert ORGANISMS["embedded-aligned"].key() != ORGANISMS["embedded-aligned-contrast"].key()
    assert resolve_model_path("org/some-model") == "org/some-model"
