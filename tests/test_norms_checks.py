"""The engine's guards: the first-batch self-check, packed batches, fp16/bf16, compiled and wrapped models.

Every expected value comes from an independent computation: the batch-size-1 loop,
a float64 copy of the model, or a backward through the packed row itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import gradsift.norms.engine as engine_mod
from gradsift.losses import response_losses
from gradsift.norms import GhostNormEngine, NormCheckError, naive_grad_norms, per_sample_grad_norms
from gradsift.norms import reference as reference_mod
from gradsift.norms.rules import LinearRule, NormRule

V = 96


def llama(tied: bool = True, vocab: int = V, **kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tied, pad_token_id=2, **kw)
    return LlamaForCausalLM(cfg)


def lora(model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.05)
    return model


def batch(seed: int = 0, B: int = 4, T: int = 16, vocab: int = V, lengths=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    lengths = lengths or [T, T - 5, 7, T - 2][:B]
    am = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for i, n in enumerate(lengths):
        am[i, :n] = 1
        labels[i, 3:n] = ids[i, 3:n]
    ids[am == 0] = 2
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())


# ---------------------------------------------------------------------------- the self-check


@pytest.mark.parametrize("keep", [False, True])
def test_verify_passes_on_exact_models_and_runs_once(keep, monkeypatch):
    calls = []
    real = reference_mod.per_sample_grads

    def spy(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr("gradsift.norms.verify.per_sample_grads", spy)
    model = lora(llama(tied=True))
    b = batch()
    with GhostNormEngine(model, params="all", keep_grads=keep, verify=True) as eng:
        eng.forward(b)
        G = eng.backward()
        assert eng.verify_seconds is not None
        assert sorted(calls) == [0, 2]  # the longest (0) and the shortest (2) sample
        eng.forward(b)
        eng.backward()
    assert len(calls) == 2  # the first batch only
    G_ref, _ = naive_grad_norms(model, b)
    assert rel_err(G, G_ref) < 1e-4
    assert all(p.grad is None for p in model.parameters())  # the check left no gradient behind


def test_verify_names_a_broken_rule(monkeypatch):
    real = NormRule.sq_norms
    monkeypatch.setattr(NormRule, "sq_norms", lambda self, *a: real(self, *a) * 1.05)
    model = llama()
    b = batch()
    with GhostNormEngine(model, verify=False) as eng:  # unchecked, the wrong number goes through
        eng.forward(b)
        eng.backward()
    with pytest.raises(NormCheckError, match=r"'NormRule' \(module class LlamaRMSNorm") as info:
        with GhostNormEngine(model, verify=True) as eng:
            eng.forward(b)
            eng.backward()
    msg = str(info.value)
    assert "\n" not in msg and "relative error 5.0e-02" in msg
    assert isinstance(info.value, ValueError)


def test_verify_catches_a_wrong_registered_rule():
    from gradsift.norms import RULES, register_rule
    from gradsift.norms.rules import find_rule

    class SloppyLinear(LinearRule):  # a rule that forgets the bias of q/k/v
        @classmethod
        def matches(cls, module):
            return type(module) is nn.Linear and module.bias is not None

        def sq_norms(self, calls, names, batch_size):
            return super().sq_norms(calls, names - {"bias"}, batch_size)

    torch.manual_seed(0)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                         pad_token_id=2))
    register_rule(SloppyLinear)
    try:
        if find_rule(model.model.layers[0].self_attn.q_proj) is not SloppyLinear:
            pytest.skip("registered rules are not looked up for this module type")
        with pytest.raises(NormCheckError, match=r"'SloppyLinear' \(module class Linear: model\.layers\.\d\.self_attn"):
            with GhostNormEngine(model, verify=True) as eng:
                eng.forward(batch(1))
                eng.backward()
    finally:
        RULES.remove(SloppyLinear)


def test_verify_checks_the_tied_head_and_the_kept_gradient(monkeypatch):
    tied = getattr(engine_mod, "_TiedGroup", None)
    if tied is not None:
        real_sq = tied.sq_norms
        monkeypatch.setattr(tied, "sq_norms", lambda self, B, keep=False: real_sq(self, B, keep) * 1.05)
        with pytest.raises(NormCheckError, match="tied head and input embedding"):
            with GhostNormEngine(llama(tied=True), verify=True) as eng:
                eng.forward(batch())
                eng.backward()
        monkeypatch.setattr(tied, "sq_norms", real_sq)
    # the LoRA factors' kept gradient comes from the per-sample rows the backward formed (the group's
    # accumulate), not from the rule's captures
    real_acc = engine_mod._Group.accumulate
    monkeypatch.setattr(engine_mod._Group, "accumulate", lambda self, index, scale: real_acc(self, index, 1.05 * scale))
    model = lora(llama(tied=False))
    with pytest.raises(NormCheckError, match=r"kept gradient of parameter group 'LinearRule' \(module class Linear: "
                                             r".*lora_[AB]"):
        with GhostNormEngine(model, params="trainable", keep_grads=True, verify=True) as eng:
            eng.forward(batch())
            eng.backward()
    assert all(p.grad is None for p in model.parameters())


def test_verify_covers_the_fallback(monkeypatch):
    class Gain(nn.Module):  # no rule: the per-sample fallback
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.randn(32, 32) * 0.1)

        def forward(self, x):
            return x + x @ self.gain

    model = llama()
    model.model.layers[0].mlp.down_proj = nn.Sequential(model.model.layers[0].mlp.down_proj, Gain())
    b = batch()
    with pytest.warns(UserWarning, match="no per-sample norm rule"):
        eng = GhostNormEngine(model, verify=True)
    eng.forward(b)
    eng.backward()  # exact: passes
    eng.close()
    real = GhostNormEngine._fallback_pass

    def off(self, L, mask):
        real(self, L * 1.1, mask)  # the fallback's share 21% too large

    monkeypatch.setattr(GhostNormEngine, "_fallback_pass", off)
    with pytest.warns(UserWarning):
        eng = GhostNormEngine(model, verify=True)
    with pytest.raises(NormCheckError, match="without a rule"):
        eng.forward(b)
        eng.backward()
    eng.close()


# ---------------------------------------------------------------------------- bf16 / fp16


def test_bf16_within_1e2_of_float64_reference():
    model = lora(llama(tied=True)).to(torch.bfloat16)
    b = batch(seed=3)
    ref64 = copy.deepcopy(model).double()
    for params in ("all", "trainable"):
        with GhostNormEngine(model, params=params, verify=True) as eng:
            eng.forward(b)
            G = eng.backward()
        G_ref, _ = naive_grad_norms(ref64, b, params=params)
        assert rel_err(G, G_ref) < 1e-2, params


def _small_grad_model():
    """A model whose activation gradients are ~1e-7 (an output layer of tiny weights): subnormal in fp16."""
    model = llama(tied=False, vocab=512)
    nn.init.normal_(model.lm_head.weight, std=5e-6)
    return lora(model).to(torch.float16)


def test_fp16_scoring_backward_is_loss_scaled(monkeypatch):
    model = _small_grad_model()
    b = batch(seed=4, T=48, vocab=512, lengths=[48, 40, 30, 45])
    G_ref, _ = naive_grad_norms(copy.deepcopy(model).double(), b, params="trainable")
    with GhostNormEngine(model, params="trainable", verify=True) as eng:
        eng.forward(b)
        G = eng.backward()
        assert eng._grad_scale > 1
    assert rel_err(G, G_ref) < 1e-2
    # without the scale the same pass underflows: the test can see the difference
    monkeypatch.setattr(engine_mod, "INIT_LOSS_SCALE", 1.0)
    with GhostNormEngine(model, params="trainable") as eng:
        eng.forward(b)
        G_unscaled = eng.backward()
    assert rel_err(G_unscaled, G_ref) > 3e-2


def test_fp16_overflow_retries_with_a_smaller_scale_and_unscales_the_kept_gradient(monkeypatch):
    monkeypatch.setattr(engine_mod, "INIT_LOSS_SCALE", 2.0**40)  # every activation gradient overflows fp16
    model = _small_grad_model()
    b = batch(seed=5, T=40, vocab=512, lengths=[40, 33, 25, 38])
    ref = copy.deepcopy(model).double()
    G_ref, _ = naive_grad_norms(ref, b, params="trainable")
    kept = torch.tensor([0, 2])
    with GhostNormEngine(model, params="trainable", keep_grads=True) as eng:
        eng.forward(b)
        G = eng.backward()
        assert 1 < eng._grad_scale < 2.0**40
        eng.accumulate_grad(kept, scale=0.5 * 1024)  # x1024: the trainer's own GradScaler scale (fp16 p.grad)
    assert torch.isfinite(G).all() and rel_err(G, G_ref) < 1e-2
    sub = {k: v[kept] for k, v in b.items()}
    ref.eval()
    out = ref(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"], use_cache=False)
    response_losses(out.logits, sub["labels"]).mean().backward()
    num = den = 0.0
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            num += float((p.grad.double() / 1024 - q.grad).pow(2).sum())
            den += float(q.grad.pow(2).sum())
    assert (num / den) ** 0.5 < 1e-2


# ---------------------------------------------------------------------------- packed batches


def _packed_reference(model, b, spans):
    """G_i and L_i of each packed sample by a backward of its own loss through the packed row."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)  # params="all": the frozen weights count too
    model.eval()
    inputs = {k: v for k, v in b.items() if k in ("input_ids", "position_ids", "attention_mask")}
    out_G, out_L = [], []
    for row, start, stop in spans:
        lab = torch.full_like(b["labels"], -100)
        lab[row, start + 1 : stop] = b["labels"][row, start + 1 : stop]
        logits = model(**inputs, use_cache=False).logits
        L = response_losses(logits[row : row + 1], lab[row : row + 1])[0]
        grads = torch.autograd.grad(L, params)
        out_G.append(torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt())
        out_L.append(L.detach().double())
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    return torch.stack(out_G), torch.stack(out_L)


def _examples(lengths, seed=0, prompt=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, V, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_trl_padding_free_batch_is_scored_per_packed_sample():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    lengths = [9, 6, 12]
    b = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True, pad_to_multiple_of=32)(_examples(lengths))
    assert b["input_ids"].shape == (1, 32) and "attention_mask" not in b  # padding-free, 5 pad tokens
    model = lora(llama(tied=True))
    with GhostNormEngine(model, params="all", verify=True) as eng:
        L = eng.forward(b)
        G = eng.backward()
        spans = [(s.row, s.start, s.stop) for s in eng.segments]
    assert spans == [(0, 0, 9), (0, 9, 15), (0, 15, 27)]  # one entry per sample, the padding left out
    G_ref, L_ref = _packed_reference(model, b, spans)
    assert rel_err(L, L_ref) < 1e-5
    assert rel_err(G, G_ref) < 1e-4
    # the row as ONE sample would be another number altogether
    whole = {"input_ids": b["input_ids"][:, :27], "labels": b["labels"][:, :27],
             "attention_mask": torch.ones(1, 27, dtype=torch.long)}
    G_one, _ = per_sample_grad_norms(model, whole)
    assert all(abs(float(G_one[0]) - float(g)) > 1e-2 * float(g) for g in G)


def test_rows_with_restarting_position_ids_and_the_kept_gradient():
    """Two rows, each packed with two samples by position_ids only, right padded."""
    ex = _examples([7, 5, 6, 8], seed=1)
    T = 14
    ids = torch.full((2, T), 2)
    labels = torch.full((2, T), -100)
    pos = torch.zeros((2, T), dtype=torch.long)
    spans = [(0, 0, 7), (0, 7, 12), (1, 0, 6), (1, 6, 14)]
    for (r, s, e), x in zip(spans, ex):
        ids[r, s:e] = torch.tensor(x["input_ids"])
        labels[r, s:e] = torch.tensor(x["labels"])
        pos[r, s:e] = torch.arange(e - s)
    b = {"input_ids": ids, "labels": labels, "position_ids": pos}
    model = llama(tied=True)
    with GhostNormEngine(model, params="all", keep_grads=True, verify=True) as eng:
        eng.forward(b)
        G = eng.backward()
        assert [(s.row, s.start, s.stop) for s in eng.segments] == spans
        eng.accumulate_grad([1, 3])
        fast = [p.grad.clone() for p in model.parameters()]
    G_ref, _ = _packed_reference(model, b, spans)
    assert rel_err(G, G_ref) < 1e-4
    for p in model.parameters():
        p.grad = None
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    # sum_{i in kept} L_i, each L_i the mean over its own response tokens
    total = 0
    for r, s, e in (spans[1], spans[3]):
        one = torch.full_like(labels, -100)
        one[r, s + 1 : e] = labels[r, s + 1 : e]
        total = total + response_losses(logits[r : r + 1], one[r : r + 1])[0]
    total.backward()
    for f, p in zip(fast, model.parameters()):
        torch.testing.assert_close(f, p.grad, rtol=1e-4, atol=1e-7)


def test_packed_rows_that_attend_across_samples_are_refused():
    """An all-ones attention mask with restarting position ids: the samples see each other."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ex = _examples([9, 6, 12])
    b = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True)(ex)
    b["attention_mask"] = torch.ones_like(b["input_ids"])
    with GhostNormEngine(llama()) as eng:
        with pytest.raises(ValueError, match="not independent"):
            eng.forward(b)
    b = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True)(ex)
    b["cu_seq_lens_q"] = torch.tensor([0, 9, 27], dtype=torch.int32)  # disagrees with position_ids
    with GhostNormEngine(llama()) as eng:
        with pytest.raises(ValueError, match="disagree"):
            eng.forward(b)


# ---------------------------------------------------------------------------- compiled and wrapped models


class _Counter:
    """A torch.compile backend that counts compilations and runs the graph eagerly."""

    def __init__(self):
        self.n = 0

    def __call__(self, gm, example_inputs):
        self.n += 1
        return gm.forward


def test_compiled_and_wrapped_models_are_unwrapped():
    torch._dynamo.reset()
    model = lora(llama(tied=True))
    b = batch(seed=6)
    G_ref, _ = naive_grad_norms(model, b)
    counter = _Counter()
    for wrapped in (torch.compile(model, backend=counter), nn.DataParallel(model)):
        with GhostNormEngine(wrapped, verify=True) as eng:
            assert eng.model is model
            eng.forward(b)
            G = eng.backward()
        assert rel_err(G, G_ref) < 1e-4
    # a compiled submodule and an in-place compiled module run eagerly under the hooks
    layers = model.base_model.model.model.layers
    layer0 = layers[0]
    layers[0] = torch.compile(layer0, backend=counter)
    layers[1].compile(backend=counter)
    try:
        with GhostNormEngine(model, verify=True) as eng:
            eng.forward(b)
            G = eng.backward()
        assert rel_err(G, G_ref) < 1e-4
        assert layers[0] is not layer0  # restored after the pass
    finally:
        layers[0] = layer0
        layers[1]._compiled_call_impl = None
    assert counter.n == 0  # the engine never ran a compiled graph
    torch._dynamo.reset()
