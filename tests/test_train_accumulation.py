"""Selection over the optimizer batch: micro-batches x accumulation select and step like one batch."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from gradsift import select
from gradsift.norms import naive_grad_norms
from gradsift.train.baselines import per_sample_loss
from gradsift.train.trainer import GradsiftTrainer

from test_train_step import VOCAB, assert_grads_close, make_batch, tiny_lora_model, trainable_grads


def dataset(n: int = 16, T: int = 14, seed: int = 1):
    """Samples of varied lengths; the collate below trims each micro-batch to its own longest row."""
    batch = make_batch(B=n, T=T, seed=seed)
    for i in range(n):  # extra variety: some rows much shorter
        if i % 5 == 0:
            batch["input_ids"][i, 8:] = 0
            batch["attention_mask"][i, 8:] = 0
            batch["labels"][i, 8:] = -100
    return [{k: batch[k][i] for k in batch} for i in range(n)], batch


def trim_collate(feats):
    out = {k: torch.stack([f[k] for f in feats]) for k in feats[0]}
    T = int(out["attention_mask"].sum(1).max())
    return {k: (v[:, :T] if v.dim() == 2 else v) for k, v in out.items()}


class GradProbe(TrainerCallback):
    """The gradients the optimizer is about to apply, at every optimizer step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append({n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                           for n, p in model.named_parameters() if p.requires_grad})


def run_step(tmp_path, method, micro, accum, data, trainer_cls=GradsiftTrainer, steps=1, **kw):
    model = tiny_lora_model()
    probe = GradProbe()
    args = TrainingArguments(output_dir=str(tmp_path / f"{method}-{micro}x{accum}"), per_device_train_batch_size=micro,
                             gradient_accumulation_steps=accum, max_steps=steps, report_to="none", use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_steps=1, learning_rate=1e-3,
                             max_grad_norm=0.0, seed=7, data_seed=7, remove_unused_columns=False)
    extra = {"method": method, **kw} if trainer_cls is GradsiftTrainer else {}
    trainer = trainer_cls(model=model, args=args, train_dataset=data, data_collator=trim_collate, callbacks=[probe],
                          **extra)
    trainer.train()
    return trainer, probe.grads


def kept_rows(trainer, step=0):
    return sorted(r["row"] for r in trainer.selection_records if r["kept"] and r["step"] == step)


def fresh_grads(rows, batch, weights=None):
    """A plain backward of sum_i w_i L_i over the given rows (default weights 1/|rows|), dropout off."""
    model = tiny_lora_model()
    model.eval()
    idx = torch.tensor([int(r) - 100 for r in rows])
    sub = {k: v[idx] for k, v in batch.items() if k != "row"}
    L = per_sample_loss(model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits, sub["labels"])
    w = torch.full((len(rows),), 1.0 / len(rows)) if weights is None else weights
    (L * w).sum().backward()
    return trainable_grads(model)


@pytest.mark.parametrize("method, strategy", [("moderate", "reuse"), ("moderate", "recompute"), ("high", "reuse"),
                                              ("random", "auto")])
def test_micro_4_x_accumulation_4_equals_one_batch_of_16(tmp_path, method, strategy):
    data, batch = dataset(16)
    one, g_one = run_step(tmp_path, method, 16, 1, data, rho=0.2, selection_seed=3, selection_backward=strategy)
    acc, g_acc = run_step(tmp_path, method, 4, 4, data, rho=0.2, selection_seed=3, selection_backward=strategy)
    assert one._strategy == ("recompute" if strategy == "recompute" else "captures")
    if method != "random":
        assert acc._strategy == ("recompute" if strategy == "recompute" else "per_sample")
    # every sample of the optimizer batch was pooled: 16 records, floor(0.2 * 16) = 3 kept
    assert len(acc.selection_records) == 16 and sorted(r["row"] for r in acc.selection_records) == list(range(100, 116))
    assert kept_rows(acc) == kept_rows(one) and len(kept_rows(acc)) == select.n_keep(16, 0.2) == 3
    if method != "random":  # the kept set is the rule on naive per-sample norms of the whole optimizer batch
        plain = {k: v for k, v in batch.items() if k != "row"}
        G_ref, L_ref = naive_grad_norms(tiny_lora_model(), plain, params="all")
        rule = {"moderate": select.moderate, "high": select.high}[method]
        assert kept_rows(acc) == [100 + i for i in rule(G_ref, L_ref, rho=0.2, prefilter="mean_std").tolist()]
    assert len(g_acc) == len(g_one) == 1
    assert_grads_close(g_acc[0], g_one[0])
    assert_grads_close(g_acc[0], fresh_grads(kept_rows(acc), batch))


@pytest.mark.parametrize("micro, accum, n", [(4, 4, 16), (2, 5, 10), (8, 1, 8), (3, 3, 9)])
def test_kept_fraction_is_floor_rho_of_the_optimizer_batch(tmp_path, micro, accum, n):
    data, _ = dataset(2 * n)
    trainer, _ = run_step(tmp_path, "moderate", micro, accum, data, rho=0.25, steps=2, prefilter="none")
    for step in (0, 1):
        recs = [r for r in trainer.selection_records if r["step"] == step]
        assert len(recs) == n
        assert sum(r["kept"] for r in recs) == select.n_keep(n, 0.25)
    logged = [h["kept_fraction"] for h in trainer.state.log_history if "kept_fraction" in h]
    assert logged == [pytest.approx(select.n_keep(n, 0.25) / n)] * 2


def test_token_mean_loss_is_transformers_own_loss(tmp_path):
    model = tiny_lora_model()
    model.eval()
    batch = make_batch(B=6)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = GradsiftTrainer(model=model, args=args, method="standard", loss_reduction="token_mean")
    ours = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    sample_mean = GradsiftTrainer(model=model, args=args, method="standard").compute_loss(model, dict(batch))
    assert abs(float(sample_mean) - float(ref)) > 1e-4  # the two reductions differ on rows of unequal length


def test_token_mean_over_accumulation_matches_the_transformers_trainer(tmp_path):
    """standard + token_mean with accumulation: the very update the plain transformers.Trainer makes."""
    data, _ = dataset(12)
    _, g_ours = run_step(tmp_path, "standard", 3, 4, data, loss_reduction="token_mean")
    _, g_hf = run_step(tmp_path, "hf", 3, 4, data, trainer_cls=Trainer)
    assert_grads_close(g_ours[0], g_hf[0])


def test_token_mean_selection_update_weighs_kept_rows_by_tokens(tmp_path):
    data, batch = dataset(16)
    acc, g_acc = run_step(tmp_path, "moderate", 4, 4, data, rho=0.25, loss_reduction="token_mean")
    rows = kept_rows(acc)
    idx = torch.tensor([r - 100 for r in rows])
    tokens = (batch["labels"][idx, 1:] != -100).sum(1).double()
    assert_grads_close(g_acc[0], fresh_grads(rows, batch, (tokens / tokens.sum()).float()))


def test_adapter_dropout_updates_with_a_second_pass(tmp_path):
    """dropout > 0: the scores are dropout-free, the update comes from a dropout-on pass of the kept rows."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path / "d"), report_to="none", use_cpu=True, disable_tqdm=True,
                             per_device_train_batch_size=10)
    trainer = GradsiftTrainer(model=model, args=args, method="moderate", rho=0.3)
    batch = make_batch()
    torch.manual_seed(1)
    trainer.training_step(trainer.model, dict(batch))
    assert trainer._strategy == "recompute"
    got = trainable_grads(model)
    kept = torch.tensor([i for i, r in enumerate(trainer.selection_records) if r["kept"]])
    model.zero_grad(set_to_none=True)
    model.eval()
    sub = {k: v[kept] for k, v in batch.items() if k != "row"}
    L = per_sample_loss(model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits, sub["labels"])
    L.mean().backward()
    no_dropout = trainable_grads(model)
    name = next(n for n in got if "lora_B" in n)
    assert not torch.allclose(got[name], no_dropout[name], rtol=1e-3)  # dropout really acted on the update


def test_auto_keeps_per_sample_rows_when_they_fit_and_recomputes_otherwise(tmp_path):
    """selection_backward auto over 4 micro-batches: per-sample LoRA rows when the optimizer batch's rows fit in
    reuse_memory_fraction of the device's memory, a second pass when they do not; the same kept rows and update."""
    from gradsift.train.config import MethodSettings

    data, batch = dataset(16)
    fits, g_fits = run_step(tmp_path / "a", MethodSettings(name="moderate", rho=0.2), 4, 4, data)
    tight, g_tight = run_step(tmp_path / "b", MethodSettings(name="moderate", rho=0.2, reuse_memory_fraction=1e-12),
                              4, 4, data)
    assert fits._strategy == "per_sample" and tight._strategy == "recompute"
    assert kept_rows(fits) == kept_rows(tight)
    assert_grads_close(g_fits[0], g_tight[0])
    assert_grads_close(g_fits[0], fresh_grads(kept_rows(fits), batch))
