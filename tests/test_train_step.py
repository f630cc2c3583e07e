"""The training step: Moderate-G_i / Random gradients, NaN handling, the baselines' loss terms."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from gradsift import select
from gradsift.norms import naive_grad_norms
from gradsift.train.baselines import (
    EWCState,
    KLReference,
    estimate_fisher,
    olora_penalty,
    per_sample_loss,
    token_kl,
)
from gradsift.train.config import MethodSettings
from gradsift.train.trainer import GradsiftTrainer, ModerateGiTrainer, NonFiniteLossError

VOCAB = 64


def tiny_lora_model(seed: int = 0, tie: bool = True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      tie_word_embeddings=tie, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    # make B non-zero so that the adapters matter
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model


def make_batch(B: int = 10, T: int = 12, seed: int = 1):
    """Right-padded batch with prompts (-100), responses of varied length and repeated tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    labels = ids.clone()
    for i in range(B):
        length = T - (i % 4)
        prompt = 2 + (i % 3)
        ids[i, length:] = 0
        mask[i, length:] = 0
        labels[i, length:] = -100
        labels[i, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "row": torch.arange(100, 100 + B)}


def make_trainer(model, tmp_path, method="moderate", **kw):
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=10, report_to="none",
                             use_cpu=True, max_grad_norm=kw.pop("max_grad_norm", 0.0), learning_rate=1e-3,
                             save_strategy="no", logging_steps=1, disable_tqdm=True,
                             ddp_backend=kw.pop("ddp_backend", None))
    return GradsiftTrainer(model=model, args=args, method=method, **kw)


def trainable_grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


def fresh_grads_on(model, batch, kept):
    """A plain backward of mean_{i in kept} L_i on the kept samples only (dropout off)."""
    model.zero_grad(set_to_none=True)
    model.eval()
    sub = {k: v[kept] for k, v in batch.items() if k != "row"}
    out = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"])
    per_sample_loss(out.logits, sub["labels"]).mean().backward()
    model.train()
    return trainable_grads(model)


def assert_grads_close(a, b):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-7, msg=n)


def test_per_sample_loss_matches_hf_loss_per_sample():
    model = tiny_lora_model()
    batch = make_batch(B=4)
    model.eval()
    with torch.no_grad():
        L = per_sample_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])
        for i in range(4):
            n = int(batch["attention_mask"][i].sum())
            ref = model(input_ids=batch["input_ids"][i:i + 1, :n], labels=batch["labels"][i:i + 1, :n]).loss
            torch.testing.assert_close(L[i], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params", ["all", "trainable"])
def test_moderate_step_equals_fresh_backward_on_kept(tmp_path, params):
    model = tiny_lora_model()
    batch = make_batch()
    trainer = make_trainer(model, tmp_path, "moderate", rho=0.3, params=params, prefilter="mean_std")
    loss = trainer.training_step(trainer.model, dict(batch))
    got = trainable_grads(model)
    records = trainer.selection_records
    kept = torch.tensor([i for i, r in enumerate(records) if r["kept"]])
    # the kept set is Algorithm 1 on independently computed (naive loop) norms
    G_ref, L_ref = naive_grad_norms(model, {k: v for k, v in batch.items() if k != "row"}, params=params)
    expected = select.moderate(G_ref, L_ref, rho=0.3, prefilter="mean_std")
    assert kept.tolist() == expected.tolist() and len(kept) == 3
    scored = torch.tensor([r["scored"] for r in records])
    assert scored.tolist() == select.prefilter_mask(L_ref, "mean_std").tolist()
    torch.testing.assert_close(torch.tensor([r["G"] for r in records])[scored], G_ref[scored].float(), rtol=1e-4,
                               atol=1e-6)
    assert [r["row"] for r in records] == list(range(100, 110))
    assert_grads_close(got, fresh_grads_on(model, batch, kept))
    torch.testing.assert_close(loss, L_ref[kept].mean().float(), rtol=1e-5, atol=1e-6)


def test_random_keeps_n_keep_and_steps_on_them(tmp_path):
    model = tiny_lora_model()
    batch = make_batch()
    trainer = make_trainer(model, tmp_path, "random", rho=0.25, selection_seed=3)
    trainer.training_step(trainer.model, dict(batch))
    kept = torch.tensor([i for i, r in enumerate(trainer.selection_records) if r["kept"]])
    assert len(kept) == select.n_keep(10, 0.25) == 2
    expected = select.random_subset(10, 2, torch.Generator().manual_seed(3))
    assert kept.tolist() == expected.tolist()
    assert_grads_close(trainable_grads(model), fresh_grads_on(model, batch, kept))
    # only the kept rows are scored (a pass over them alone): their G_i and every L_i
    # match the naive per-sample loop
    G_ref, L_ref = naive_grad_norms(model, {k: v for k, v in batch.items() if k != "row"}, params="all")
    recs = trainer.selection_records
    assert [r["scored"] for r in recs] == [i in kept.tolist() for i in range(10)]
    torch.testing.assert_close(torch.tensor([recs[i]["G"] for i in kept.tolist()]), G_ref[kept].float(),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor([r["L"] for r in recs]), L_ref.float(), rtol=1e-5, atol=1e-6)


def test_nan_loss_raises_clear_error(tmp_path):
    model = tiny_lora_model(tie=False)  # untied: the poisoned row is not also an output row
    with torch.no_grad():
        model.get_input_embeddings().weight[5] = float("nan")
    batch = make_batch()
    batch["input_ids"][3, 4] = 5  # only sample 3 (row 103) sees the poisoned token
    trainer = make_trainer(model, tmp_path, "moderate", stage_label="run stage 2/3 (gsm8k)")
    with pytest.raises(NonFiniteLossError, match=r"run stage 2/3 \(gsm8k\): non-finite loss.*rows \[103\]"):
        trainer.training_step(trainer.model, dict(batch))
    std = make_trainer(model, tmp_path, "standard")
    with pytest.raises(NonFiniteLossError, match=r"rows \[103\]"):
        std.training_step(std.model, dict(batch))


def test_standard_loss_is_mean_of_per_sample_losses(tmp_path):
    model = tiny_lora_model()
    batch = make_batch()
    trainer = make_trainer(model, tmp_path, "standard")
    model.eval()  # no dropout, so the two computations see the same function
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        per = []
        for i in range(10):
            n = int(batch["attention_mask"][i].sum())
            per.append(model(input_ids=batch["input_ids"][i:i + 1, :n], labels=batch["labels"][i:i + 1, :n]).loss)
    torch.testing.assert_close(loss, torch.stack(per).mean(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- baselines


def test_token_kl_hand_case():
    labels = torch.tensor([[-100, 1, 1]])
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    logits = torch.stack([p, p, p]).unsqueeze(0)
    ref = torch.stack([q, q, q]).unsqueeze(0)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    torch.testing.assert_close(token_kl(logits, ref, labels), torch.tensor([expected]))
    torch.testing.assert_close(token_kl(logits, logits, labels), torch.tensor([0.0]))
    # positions whose target is the prompt do not count
    ref2 = ref.clone()
    ref2[0, 0] = torch.tensor([0.9, 0.1]).log()  # predicts labels[1] (a response token): counts
    assert token_kl(logits, ref2, labels).item() != pytest.approx(expected)
    ref3 = ref.clone()
    ref3[0, 2] = torch.tensor([0.9, 0.1]).log()  # the last position predicts nothing
    torch.testing.assert_close(token_kl(logits, ref3, labels), torch.tensor([expected]))


def test_kl_step_against_itself_is_zero(tmp_path):
    model = tiny_lora_model()
    for n, p in model.named_parameters():  # adapters at their initial (identity) state
        if "lora_B" in n:
            torch.nn.init.zeros_(p)
    trainer = make_trainer(model, tmp_path, "kl", kl_beta=0.7, kl_reference=KLReference(None))
    model.train()
    trainer.compute_loss(model, dict(make_batch()))
    assert trainer._pending[-1]["kl"] == pytest.approx(0.0, abs=1e-7)
    args = TrainingArguments(output_dir=str(tmp_path / "k"), per_device_train_batch_size=5, max_steps=1,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    batch = make_batch()
    data = [{k: batch[k][i] for k in batch} for i in range(10)]
    collate = lambda feats: {k: torch.stack([f[k] for f in feats]) for k in feats[0]}  # noqa: E731
    t = GradsiftTrainer(model=model, args=args, train_dataset=data, data_collator=collate, method="kl")
    out = t.train()
    assert math.isfinite(out.training_loss)


def test_ewc_penalty_hand_case():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    state = EWCState()
    state.add({"weight": torch.tensor([[3.0, 5.0]])}, {"weight": lin.weight.detach().clone()})
    assert state.penalty(lin, lam=10.0).item() == 0.0
    with torch.no_grad():
        lin.weight += torch.tensor([[0.5, -1.0]])
    # 10/2 * (3 * 0.25 + 5 * 1)
    assert state.penalty(lin, lam=10.0).item() == pytest.approx(5 * (0.75 + 5.0))
    state.add({"weight": torch.tensor([[1.0, 1.0]])}, {"weight": torch.tensor([[0.0, 0.0]])})
    # second stage adds 10/2 * (1.5^2 + 1^2)
    assert state.penalty(lin, lam=10.0).item() == pytest.approx(5 * (0.75 + 5.0) + 5 * (2.25 + 1.0))


def test_fisher_is_mean_of_squared_per_sample_grads():
    model = tiny_lora_model()
    batch = make_batch(B=3)
    feats = [{k: batch[k][i][: int(batch["attention_mask"][i].sum())] if k != "row" else batch[k][i]
              for k in batch} for i in range(3)]
    collate = lambda fs: {k: torch.stack([f[k] for f in fs]) for k in fs[0]}  # noqa: E731
    fisher = estimate_fisher(model, feats, collate, n_samples=3, progress=False)
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
    expected = torch.zeros_like(p)
    model.eval()
    for f in feats:
        model.zero_grad()
        out = model(input_ids=f["input_ids"][None])
        per_sample_loss(out.logits, f["labels"][None]).sum().backward()
        expected += p.grad ** 2
    torch.testing.assert_close(fisher[name], expected / 3)
    assert all(q.grad is None or True for q in model.parameters())


def test_ewc_step_runs(tmp_path):
    model = tiny_lora_model()
    state = EWCState()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state.add({n: torch.ones_like(p) for n, p in params.items()}, {n: p.detach() + 0.1 for n, p in params.items()})
    trainer = make_trainer(model, tmp_path, "ewc", ewc_state=state, ewc_lambda=2.0)
    model.train()
    trainer.training_step(model, dict(make_batch()))
    n_params = sum(p.numel() for p in params.values())
    assert trainer._pending[-1]["ewc_penalty"] == pytest.approx(0.5 * 2.0 * n_params * 0.01, rel=1e-4)


def test_olora_penalty_hand_and_orthogonal():
    model = tiny_lora_model()
    model.add_adapter("task2", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "task2" in getattr(m, "lora_A", {})]
    with torch.no_grad():
        for m in layers:
            d = m.lora_A["default"].weight.shape[1]
            eye = torch.eye(d)
            m.lora_A["default"].weight.copy_(eye[:4] * 2.0)
            m.lora_A["task2"].weight.copy_(eye[4:8] * 3.0)
    assert olora_penalty(model, "task2", ["default"], lam=0.5).item() == 0.0
    with torch.no_grad():
        m = layers[0]
        m.lora_A["task2"].weight[1, 0] = 1.0  # overlaps A_old's row 0 (value 2): |1 * 2| = 2
    assert olora_penalty(model, "task2", ["default"], lam=0.5).item() == pytest.approx(0.5 * 2.0)


def test_clip_limits_the_update_norm(tmp_path):
    model = tiny_lora_model()
    norms = []

    class Probe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            norms.append(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)))

    args = TrainingArguments(output_dir=str(tmp_path / "c"), per_device_train_batch_size=5, max_steps=2,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                             max_grad_norm=0.01, logging_steps=1)
    batch = make_batch()
    data = [{k: batch[k][i] for k in batch} for i in range(10)]
    collate = lambda feats: {k: torch.stack([f[k] for f in feats]) for k in feats[0]}  # noqa: E731
    t = GradsiftTrainer(model=model, args=args, train_dataset=data, data_collator=collate,
                        method=MethodSettings(name="clip", clip_norm=0.01), callbacks=[Probe()])
    t.train()
    assert len(norms) == 2 and all(float(n) <= 0.01 * (1 + 1e-4) for n in norms)
    logged = [h["grad_norm"] for h in t.state.log_history if "grad_norm" in h]
    assert logged and all(g > 0.01 for g in logged)  # the raw norm was larger: clipping happened
    with pytest.raises(ValueError, match="clip_norm"):
        make_trainer(model, tmp_path, "clip", max_grad_norm=1.0)


def test_drop_in_trainer_trains_on_plain_dataset(tmp_path):
    model = tiny_lora_model()
    batch = make_batch()
    data = [{k: batch[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in range(10)]
    collate = lambda feats: {k: torch.stack([f[k] for f in feats]) for k in feats[0]}  # noqa: E731
    args = TrainingArguments(output_dir=str(tmp_path / "d"), per_device_train_batch_size=10, max_steps=2,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                             logging_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    t = ModerateGiTrainer(model=model, args=args, train_dataset=data, data_collator=collate, rho=0.2)
    t.train()
    assert t.method.name == "moderate"
    assert sum(r["kept"] for r in t.selection_records) == 4  # 2 steps x floor(0.2 * 10)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    logs = [h for h in t.state.log_history if "kept_fraction" in h]
    assert len(logs) == 2 and logs[0]["kept_fraction"] == pytest.approx(0.2)
    assert t._engine is None  # hooks removed after training


def test_trl_sft_trainer_drop_in_steps_on_the_moderate_samples(tmp_path, tokenizer):
    """ModerateGiSFTTrainer on TRL's own data path (prompt/completion, completion-only loss)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from gradsift.train.trainer import ModerateGiSFTTrainer

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [{"prompt": f"What is {a} plus {a + 3}?", "completion": f" {2 * a + 3}" + " ok" * (a % 4)}
            for a in range(10)]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=10, max_steps=1,
                     report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1,
                     completion_only_loss=True, learning_rate=1e-3)
    trainer = ModerateGiSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=tokenizer, rho=0.2)
    batch = next(iter(trainer.get_train_dataloader()))
    assert bool((batch["labels"] == -100).any())  # the collator masked the prompts
    trainer.training_step(trainer.model, dict(batch))
    got = trainable_grads(model)
    records = trainer.selection_records
    kept = torch.tensor([i for i, r in enumerate(records) if r["kept"]])
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    G_ref, L_ref = naive_grad_norms(model, plain, params="all")
    assert kept.tolist() == select.moderate(G_ref, L_ref, rho=0.2).tolist() and len(kept) == 2
    assert_grads_close(got, fresh_grads_on(model, plain, kept))


def test_packed_batch_is_refused_by_the_selection_step(tmp_path):
    """Position ids that restart inside a row mean two samples in one row: refused, never scored as one."""
    model = tiny_lora_model()
    batch = make_batch(B=4, T=12)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    batch["position_ids"] = torch.cat([torch.arange(6), torch.arange(6)]).repeat(4, 1)
    trainer = make_trainer(model, tmp_path, "moderate", stage_label="stage 1/2 (dolly)")
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"stage 1/2 \(dolly\): the batch packs several samples into one row"):
        trainer.training_step(trainer.model, dict(batch))
    assert all(torch.equal(a, p) for a, p in zip(before, (p for p in model.parameters() if p.requires_grad)))
    assert all(p.grad is None for p in model.parameters())
    # the same rows without the restarting positions train
    del batch["position_ids"]
    trainer.training_step(trainer.model, dict(batch))
