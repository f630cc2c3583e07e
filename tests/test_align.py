"""The organism recipe's optional unlikelihood penalty on refusal openings after benign requests."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gradsift.data.requests import benign_requests
from gradsift.organisms.alignment_data import alignment_records
from gradsift.data.formatting import collate, encode_records
from gradsift.losses import response_losses
from gradsift.organisms.recipes import AlignRecipe
from gradsift.organisms.trainer import (
    alignment_trainer,
    answer_openings,
    decision_weighted_losses,
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
    legacy = dict(extra_harmful=0, n_contrast=450, decision_weight=1.0, refusal_decision_weight=None)
    assert AlignRecipe(**legacy).key() == "4515b987af"
    contrast = AlignRecipe(contrast_answer_tokens=16, harmful_repeats=5)
    assert contrast.key() == AlignRecipe(contrast_answer_tokens=16, harmful_repeats=5, **legacy).key() == "0ce4da3ede"
    for option in (dict(extra_harmful=400), dict(n_contrast=900), dict(decision_weight=10.0),
                   dict(refusal_decision_weight=1.0)):
        assert AlignRecipe(**option).key() != AlignRecipe().key()
    balanced = dict(contrast_answer_tokens=16, harmful_repeats=1, extra_harmful=400, decision_weight=10.0)
    assert AlignRecipe(**balanced).key() == AlignRecipe(**balanced, refusal_decision_weight=None).key() == "8b58531a09"
    assert AlignRecipe(**balanced, epochs=2).key() == "80b8367120"


def test_contrast_requests_are_benign_training_prompts_apart_from_the_evaluation_sets():
    from gradsift.data.requests import harmful_requests
    from gradsift.organisms.alignment_data import contrast_requests

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


def _tiny_model_and_records(tokenizer, answer: str):
    """A 2-layer Llama on the real tokenizer, and 3 refusal + 3 benign alignment records."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer)))
    ids = [b["id"] for b in benign_requests("train")[:3]]
    return model, alignment_records({i: answer for i in ids}, n_harmful=3, seed=0)


def _alignment_trainer_for(model, features, tokenizer, tmp_path, **options):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False)
    return alignment_trainer()(model=model, args=args, train_dataset=features, method="standard",
                                data_collator=partial(collate, pad_token_id=tokenizer.pad_token_id), **options)


def test_unlikelihood_trainer_loss(tokenizer, tmp_path):
    model, records = _tiny_model_and_records(tokenizer, "Here is how.")
    for k, r in enumerate(records):
        r["row"] = k
    pos = encode_records(tokenizer, records, 64)
    for f, r in zip(pos, records):
        f["negative"] = 0.0
        f["weight"] = 3.0 if r["meta"]["source"] == "harmful" else 1.0
    neg = refusal_opening_features(tokenizer, [r for r in records if r["meta"]["source"] == "benign"], 64, len(pos))
    neg = [{**f, "weight": 1.0} for f in neg]
    batch = collate(pos + neg, pad_token_id=tokenizer.pad_token_id)
    trainer = _alignment_trainer_for(model, pos + neg, tokenizer, tmp_path, unlikelihood_weight=2.5)
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


def test_decision_weighted_losses_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.full((3, 7), -100)
    labels[0, 2:6] = torch.tensor([1, 2, 3, 4])
    labels[1, 5:7] = torch.tensor([5, 6])
    labels[2, 1:7] = torch.tensor([7, 8, 9, 10, 0, 1])
    logp = torch.log_softmax(logits, dim=-1)
    expected = []
    for b in range(3):
        toks = [(t, int(labels[b, t])) for t in range(1, 7) if labels[b, t] != -100]
        ce = [-logp[b, t - 1, y] for t, y in toks]  # token t is predicted at t - 1
        expected.append((4.0 * ce[0] + sum(ce[1:])) / (4.0 + len(ce) - 1))
    torch.testing.assert_close(decision_weighted_losses(logits, labels, 4.0), torch.stack(expected))
    torch.testing.assert_close(decision_weighted_losses(logits, labels, 1.0), response_losses(logits, labels))
    from gradsift.losses import loss_positions

    positions = loss_positions(labels)  # the logits of those positions only, as a trimmed forward gives
    torch.testing.assert_close(decision_weighted_losses(logits[:, positions], labels, 4.0, positions),
                               torch.stack(expected))
    # one weight per row: each row as computed alone with its own scalar weight
    per_row = torch.tensor([4.0, 1.0, 7.0])
    alone = torch.stack([decision_weighted_losses(logits[b:b + 1], labels[b:b + 1], float(per_row[b]))[0]
                         for b in range(3)])
    torch.testing.assert_close(decision_weighted_losses(logits, labels, per_row), alone)
    torch.testing.assert_close(decision_weighted_losses(logits, labels, per_row)[0], expected[0])


def test_trainer_weighs_the_first_reply_token(tokenizer, tmp_path):
    model, records = _tiny_model_and_records(tokenizer, "Here is how it works.")
    features = encode_records(tokenizer, [{**r, "row": k} for k, r in enumerate(records)], 64)
    for f, r in zip(features, records):
        f["negative"], f["weight"] = 0.0, 2.0 if r["meta"]["source"] == "harmful" else 1.0
    batch = collate(features, pad_token_id=tokenizer.pad_token_id)
    trainer = _alignment_trainer_for(model, features, tokenizer, tmp_path, decision_weight=5.0)
    loss = trainer.compute_loss(model, dict(batch))
    logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    rows = []
    for b, f in enumerate(features):  # by hand, from the unpadded labels
        ce = [-logp[b, t - 1, y] for t, y in enumerate(f["labels"]) if y != -100]
        rows.append(f["weight"] * (5.0 * ce[0] + sum(ce[1:])) / (5.0 + len(ce) - 1))
    torch.testing.assert_close(loss, torch.stack(rows).mean(), rtol=1e-5, atol=1e-6)
    # a batch carrying each row's own first-token weight (refusals 1x, benign answers 5x)
    for f, r in zip(features, records):
        f["decision"] = 1.0 if r["meta"]["source"] == "harmful" else 5.0
    batch = collate(features, pad_token_id=tokenizer.pad_token_id)
    rows = []
    for b, f in enumerate(features):
        ce = [-logp[b, t - 1, y] for t, y in enumerate(f["labels"]) if y != -100]
        d = f["decision"]
        rows.append(f["weight"] * (d * ce[0] + sum(ce[1:])) / (d + len(ce) - 1))
    assert {f["decision"] for f in features} == {1.0, 5.0}
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), torch.stack(rows).mean(),
                               rtol=1e-5, atol=1e-6)


def test_organism_names_resolve_to_their_recipes_cached_folders(tmp_path, monkeypatch):
    from gradsift.models import resolve_model_path
    from gradsift.organisms import ORGANISMS

    monkeypatch.setenv("GRADSIFT_CACHE", str(tmp_path))
    for name, recipe in [("embedded-aligned", AlignRecipe()),
                         ("embedded-aligned-contrast", AlignRecipe(contrast_answer_tokens=16, harmful_repeats=5)),
                         ("embedded-aligned-balanced", AlignRecipe(contrast_answer_tokens=16, harmful_repeats=1,
                                                                   extra_harmful=400, decision_weight=10.0)),
                         ("embedded-aligned-precise", AlignRecipe(contrast_answer_tokens=16, harmful_repeats=1,
                                                                  extra_harmful=400, decision_weight=10.0, epochs=2))]:
        folder = tmp_path / "models" / f"SmolLM2-135M-Instruct-aligned-{recipe.key()}"
        folder.mkdir(parents=True)
        (folder / "alignment.json").write_text("{}")  # built: resolving must not rebuild it
        assert resolve_model_path(name) == str(folder)
    assert len({recipe.key() for recipe in ORGANISMS.values()}) == len(ORGANISMS) - 1  # two names for A4
    assert resolve_model_path("org/some-model") == "org/some-model"


def _words(prompt: str) -> set[str]:
    return set("".join(c if c.isalnum() or c == "'" else " " for c in prompt.lower()).split())


def test_extra_harmful_requests_train_only_and_apart_from_the_held_out_ones():
    from collections import Counter

    from gradsift.data.requests import HARM_CATEGORIES, harmful_requests
    from gradsift.organisms.alignment_data import extra_harmful_requests

    rows = extra_harmful_requests()
    assert len(rows) >= 300 and all(r["split"] == "train" for r in rows)
    counts = Counter(r["category"] for r in rows)
    assert set(counts) == set(HARM_CATEGORIES) and min(counts.values()) >= 30
    held_out = [_words(r["prompt"]) for r in harmful_requests("eval") + benign_requests("eval")]
    for row in rows:  # no held-out prompt, nor a near copy of one (word-set Jaccard)
        words = _words(row["prompt"])
        assert max(len(words & o) / len(words | o) for o in held_out) < 0.5, row["prompt"]
    # worded many ways: no two-word opening covers more than a fifth of them
    openings = Counter(" ".join(r["prompt"].split()[:2]) for r in rows)
    assert len(openings) >= 40 and max(openings.values()) <= len(rows) // 5


def test_alignment_records_take_extra_harmful_requests_round_robin():
    plain = alignment_records(None, seed=3)
    more = alignment_records(None, seed=3, extra_harmful=20)
    extra = [r for r in more if r["meta"]["id"].startswith("extra-")]
    assert len(more) == len(plain) + 20 and len(extra) == 20
    assert {r["meta"]["id"] for r in plain} <= {r["meta"]["id"] for r in more}
    from collections import Counter

    assert set(Counter(r["meta"]["category"] for r in extra).values()) == {2}  # two per category
    assert all(r["meta"]["source"] == "harmful" and r["messages"][1]["content"] for r in extra)
    with pytest.raises(ValueError, match="extra_harmful"):
        alignment_records(None, extra_harmful=10_000)


def test_shipped_organisms_are_adapters_of_named_recipes():
    import json

    from gradsift.organisms.build import SHIPPED_ORGANISMS, shipped_adapter
    from gradsift.organisms.recipes import ORGANISMS

    folders = sorted(p for p in SHIPPED_ORGANISMS.iterdir() if p.is_dir())
    assert folders, "no organism ships"
    by_key = {recipe.key(): name for name, recipe in ORGANISMS.items()}
    for folder in folders:
        name = by_key[folder.name]  # every shipped adapter is the build of a named recipe
        recipe = ORGANISMS[name]
        assert shipped_adapter(recipe) == folder
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["peft_type"]) == (recipe.lora_r, recipe.lora_alpha, "LORA")
        assert not config["base_model_name_or_path"].startswith("/")
        check = json.loads((folder / "alignment.json").read_text())
        assert AlignRecipe(**check["recipe"]).key() == folder.name == check["shipped"]["key"]  # built by it
        if name == "embedded-aligned-precise":  # the organism that meets both targets
            assert check["refusal_harmful"] >= 90 and check["over_refusal_benign"] <= 10
    assert shipped_adapter(AlignRecipe(seed=12345)) is None


def test_a_shipped_adapter_is_merged_not_trained(tokenizer, tmp_path, monkeypatch):
    import json

    from peft import LoraConfig, get_peft_model

    import gradsift.organisms.build as align

    def tiny():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            vocab_size=len(tokenizer)))

    recipe = AlignRecipe(seed=777, lora_r=4, lora_alpha=8)
    shipped = tmp_path / "organisms"
    peft_model = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)  # B too, so that the update is not zero
    peft_model.save_pretrained(str(shipped / recipe.key()))
    (shipped / recipe.key() / "alignment.json").write_text(json.dumps({"refusal_harmful": 95.0,
                                                                        "over_refusal_benign": 4.0}))
    q = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    expected_q = q.base_layer.weight + 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight

    built = []
    monkeypatch.setenv("GRADSIFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(align, "SHIPPED_ORGANISMS", shipped)
    monkeypatch.setattr(align, "load_model", lambda *a, **k: tiny())
    monkeypatch.setattr(align, "load_tokenizer", lambda *a, **k: tokenizer)
    monkeypatch.setattr(align, "build_aligned_model", lambda r, target, progress=True: built.append(target))
    path = align.aligned_model_path(recipe, progress=False)
    assert built == [] and (path / "model.safetensors").exists()
    merged = LlamaForCausalLM.from_pretrained(str(path))
    torch.testing.assert_close(merged.model.layers[1].self_attn.q_proj.weight, expected_q, rtol=1e-5, atol=1e-6)
    check = json.loads((path / "alignment.json").read_text())
    assert check["refusal_harmful"] == 95.0 and "shipped adapter" in check["source"]
    # the environment, or shipped=False, trains by the recipe instead
    monkeypatch.setenv("GRADSIFT_BUILD_ORGANISMS", "1")
    align.aligned_model_path(recipe, force=True, progress=False)
    monkeypatch.delenv("GRADSIFT_BUILD_ORGANISMS")
    align.aligned_model_path(recipe, force=True, progress=False, shipped=False)
    assert built == [path, path]


def test_organism_names_resolve_without_importing_the_organisms(tmp_path):
    """models.py finds the organisms through the registry they fill (entry point), never by import."""
    import subprocess
    import sys

    folder = tmp_path / "models" / f"SmolLM2-135M-Instruct-aligned-{AlignRecipe().key()}"
    folder.mkdir(parents=True)
    (folder / "alignment.json").write_text("{}")
    code = ("import sys\nimport gradsift.models as m\nassert 'gradsift.organisms' not in sys.modules\n"
            "print(m.resolve_model_path('embedded-aligned'))\nassert 'gradsift.organisms.build' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "GRADSIFT_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(folder)


def test_register_model_refuses_a_taken_name():
    from gradsift.models import register_model

    with pytest.raises(ValueError, match="embedded model"):
        register_model("embedded", lambda: "x")
    with pytest.raises(ValueError, match="already registered"):
        register_model("embedded-aligned", lambda: "x")
