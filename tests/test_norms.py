"""Exact per-sample gradient norms against the naive loop (one batch-size-1 backward per sample)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from gradsift.norms import GhostNormEngine, naive_grad_norms, per_sample_grad_norms
from gradsift.norms.rules import LinearRule

V = 96
RTOL = 1e-4


def _llama(tied: bool):
    return LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=V, tie_word_embeddings=tied, pad_token_id=2)
    )


def _qwen2():
    return Qwen2ForCausalLM(
        Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=V, tie_word_embeddings=False, pad_token_id=2)
    )


def _mistral():
    return MistralForCausalLM(
        MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, sliding_window=None, pad_token_id=2)
    )


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64,
                                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))


FAMILIES = {"llama-tied": lambda: _llama(True), "llama-untied": lambda: _llama(False), "qwen2": _qwen2,
            "mistral": _mistral, "gpt2": _gpt2}


def make_batch(seed: int = 0, B: int = 5, T: int = 14, pad_id: int = 2) -> dict[str, torch.Tensor]:
    """Samples of different lengths, right padding, repeated tokens, and the pad id inside a response."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    lengths = [T, T - 3, T - 7, 6, T - 1][:B]
    am = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for i, n in enumerate(lengths):
        am[i, :n] = 1
        labels[i, 3:n] = ids[i, 3:n]
    ids[0, 5] = ids[0, 8] = ids[0, 11] = ids[0, 2]  # the same token several times in one sample
    ids[1, 6] = pad_id  # the padding id used as a real (response) token, like SmolLM2's <|im_end|>
    labels[1, 6] = pad_id
    ids[am == 0] = pad_id
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def add_lora(model, modules_to_save=None):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                     modules_to_save=modules_to_save)
    model = get_peft_model(model, cfg)
    # random B so that the adapters are not a no-op
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.05)
    return model


def assert_close(G, ref, rtol=RTOL):
    ref = ref.to(G.dtype)
    err = ((G - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()
    assert err <= rtol, f"max relative error {err:.2e}\nghost={G}\nnaive={ref}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("params", ["all", "trainable"])
def test_matches_naive_loop(family, lora, params):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    if lora:
        model = add_lora(model)
    batch = make_batch(seed=1)
    G, L = per_sample_grad_norms(model, batch, params=params)
    G_ref, L_ref = naive_grad_norms(model, batch, params=params)
    assert_close(G, G_ref)
    assert_close(L, L_ref, rtol=1e-5)
    assert (G > 0).all()


def test_lora_modules_to_save():
    torch.manual_seed(0)
    model = add_lora(_llama(tied=False), modules_to_save=["lm_head"])
    batch = make_batch(seed=2)
    for params in ("all", "trainable"):
        G, _ = per_sample_grad_norms(model, batch, params=params)
        G_ref, _ = naive_grad_norms(model, batch, params=params)
        assert_close(G, G_ref)


def test_tied_cross_term_matters():
    """Dropping the cross term of the tied head/embedding would be visibly wrong."""
    import copy

    torch.manual_seed(0)
    model = _llama(tied=True)
    batch = make_batch(seed=3)
    G, _ = per_sample_grad_norms(model, batch)
    G_ref, _ = naive_grad_norms(model, batch)
    assert_close(G, G_ref)
    # an untied copy with equal weights: its norm is ||D^T H||^2 + ||E||^2, the tied norm without the cross term
    untied = copy.deepcopy(model)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    G_no_cross, _ = naive_grad_norms(untied, batch)
    assert ((G_no_cross - G_ref).abs() / G_ref).max() > 1e-3


def test_independent_of_batch_mates_and_deterministic():
    torch.manual_seed(0)
    model = _llama(tied=True)
    batch = make_batch(seed=4, B=5)
    G, L = per_sample_grad_norms(model, batch)
    G2, L2 = per_sample_grad_norms(model, batch)
    assert torch.equal(G, G2) and torch.equal(L, L2)
    # the same sample 1, alone (trimmed) and in another batch, gets the same G
    sub = {k: v[1:2, : int(batch["attention_mask"][1].sum())] for k, v in batch.items()}
    G_alone, _ = per_sample_grad_norms(model, sub)
    other = make_batch(seed=9, B=5)
    mixed = {k: torch.cat([other[k][:2], batch[k][1:2], other[k][3:]]) for k in batch}
    G_mixed, _ = per_sample_grad_norms(model, mixed)
    assert torch.allclose(G_alone[0], G[1], rtol=1e-5)
    assert torch.allclose(G_mixed[2], G[1], rtol=1e-5)


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_both_linear_strategies_exact(mode, monkeypatch):
    monkeypatch.setattr(LinearRule, "mode", mode)
    torch.manual_seed(0)
    model = add_lora(_qwen2())
    batch = make_batch(seed=5)
    G, _ = per_sample_grad_norms(model, batch, params="all")
    G_ref, _ = naive_grad_norms(model, batch, params="all")
    assert_close(G, G_ref)


@pytest.mark.parametrize("mode", ["ghost", "materialize", "auto"])
def test_backward_on_part_of_the_batch(mode, monkeypatch):
    """backward(mask) (the loss pre-filter's survivors): naive norms on the mask, 0 elsewhere."""
    monkeypatch.setattr(LinearRule, "mode", mode)
    torch.manual_seed(0)
    model = add_lora(_llama(tied=True))
    batch = make_batch(seed=3)
    mask = torch.tensor([True, False, True, True, False])
    with GhostNormEngine(model, params="all", keep_grads=True) as engine:
        engine.forward(batch)
        G = engine.backward(mask)
    G_ref, _ = naive_grad_norms(model, batch, params="all")
    assert_close(G[mask], G_ref[mask])
    assert (G[~mask] == 0).all()


def test_gemma_style_rmsnorm_and_layernorm():
    """Norm layers computing xhat * (1 + w) and LayerNorm with bias, in a custom model."""

    class GemmaRMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d) * 0.1)

        def forward(self, x):
            xf = x.float()
            out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
            return (out * (1.0 + self.weight.float())).type_as(x)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, 16, padding_idx=2)
            self.n1 = GemmaRMSNorm(16)
            self.fc = nn.Linear(16, 16)
            self.n2 = nn.LayerNorm(16)
            self.head = nn.Linear(16, V, bias=False)

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = self.emb(input_ids)
            h = h + torch.tanh(self.fc(self.n1(h))).cumsum(1) / 4  # mixes positions causally
            h = self.n2(h)
            h = h + self.n1(h)  # a module used twice
            return type("Out", (), {"logits": self.head(h)})()

    torch.manual_seed(0)
    model = Tiny()
    nn.init.normal_(model.n2.weight, 1.0, 0.2)
    nn.init.normal_(model.n2.bias, 0.0, 0.2)
    batch = make_batch(seed=6)
    G, _ = per_sample_grad_norms(model, batch)
    G_ref, _ = naive_grad_norms(model, batch)
    assert_close(G, G_ref)


def test_uncovered_parameter_falls_back_exactly():
    class Scale(nn.Module):  # a layer type without a rule
        def __init__(self, d):
            super().__init__()
            self.gain = nn.Parameter(torch.randn(d, d) * 0.1)

        def forward(self, x):
            return x + x @ self.gain

    torch.manual_seed(0)
    model = _llama(tied=True)
    model.model.layers[0].mlp.down_proj = nn.Sequential(model.model.layers[0].mlp.down_proj, Scale(32))
    batch = make_batch(seed=7)
    with pytest.warns(UserWarning, match="no per-sample norm rule"):
        G, _ = per_sample_grad_norms(model, batch)
    G_ref, _ = naive_grad_norms(model, batch)
    assert_close(G, G_ref)
    with pytest.raises(NotImplementedError, match="gain"):
        per_sample_grad_norms(model, batch, strict=True)


@pytest.mark.parametrize("family", ["llama-tied", "gpt2"])
@pytest.mark.parametrize("lora", [False, True])
def test_accumulated_gradient_equals_fresh_backward(family, lora):
    """The summed gradient of a subset, built from the scoring pass, equals a fresh backward."""
    torch.manual_seed(0)
    model = FAMILIES[family]()
    if lora:
        model = add_lora(model)
    batch = make_batch(seed=8)
    kept = torch.tensor([0, 2, 3])
    trainable = [p for p in model.parameters() if p.requires_grad]
    with GhostNormEngine(model, params="all", keep_grads=True) as eng:
        eng.forward(batch)
        eng.backward()
        for p in trainable:
            p.grad = None
        eng.accumulate_grad(kept, scale=1.0 / len(kept))
        fast = [p.grad.clone() for p in trainable]
    # reference: a fresh backward of mean_{i in kept} L_i on the kept samples only
    from gradsift.norms import response_losses

    for p in trainable:
        p.grad = None
    model.eval()
    sub = {k: v[kept] for k, v in batch.items()}
    out = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"], use_cache=False)
    response_losses(out.logits, sub["labels"]).mean().backward()
    for p, f in zip(trainable, fast):
        assert torch.allclose(f, p.grad, rtol=1e-4, atol=1e-6), (p.shape, (f - p.grad).abs().max())


def test_model_left_untouched():
    torch.manual_seed(0)
    model = add_lora(_llama(tied=False))
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    per_sample_grad_norms(model, make_batch())
    assert model.training
    assert flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())


def test_input_gram_computed_once_per_shared_input(monkeypatch):
    """q/k/v (and gate/up) read one tensor, and so does every lora_A with its base layer: one A A^T each."""
    from gradsift.norms.rules.linear import GramCache

    monkeypatch.setattr(LinearRule, "mode", "ghost")
    model = add_lora(_llama(tied=False))
    batch = make_batch()
    fresh = []
    orig = GramCache.gram

    def spy(self, A, *rest):
        fresh.append(self.key(A) not in self.store)
        return orig(self, A, *rest)

    monkeypatch.setattr(GramCache, "gram", spy)
    G, _ = per_sample_grad_norms(model, batch)
    G_ref, _ = naive_grad_norms(model, batch)
    torch.testing.assert_close(G.double(), G_ref.double(), rtol=RTOL, atol=1e-6)
    layers = model.config.num_hidden_layers
    # per layer 7 projections, each a base layer + lora_A + lora_B: 21 ghost Linear norms
    assert len(fresh) == 21 * layers + 1  # + the untied lm_head
    # distinct inputs per layer: attention input, o_proj input, MLP input, down_proj input, 7 lora_B inputs
    assert sum(fresh) == 11 * layers + 1


def test_cpu_allocator_tuning_is_opt_out():
    import os
    import platform
    import subprocess
    import sys

    code = "from gradsift.runtime import tune_cpu_allocator as t; print(t(), t())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    env = {**os.environ, "GRADSIFT_MALLOC": "default"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert off == ["False", "False"]
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert on == ["True", "True"]  # glibc accepted both thresholds; a second call is a no-op


def test_trimmed_logits_give_the_same_losses_and_gradients():
    """Logits only at positions that predict a response token: same L_i and same gradients as full logits."""
    from gradsift.norms import causal_lm_losses, response_losses

    model = add_lora(_llama(tied=True))
    model.eval()
    batch = make_batch()
    batch["labels"][:, :5] = -100  # a prompt of 5 tokens at least: positions 0..3 predict no response token
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    L_full = response_losses(full, batch["labels"])
    grads_full = torch.autograd.grad(L_full.sum(), [p for p in model.parameters() if p.requires_grad])
    L_trim, out = causal_lm_losses(model, batch)
    assert out.logits.shape[1] < full.shape[1]  # the prompt's logits were not computed
    grads_trim = torch.autograd.grad(L_trim.sum(), [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(L_trim, L_full, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_trim, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_model_with_input_require_grads_hook():
    """PEFT/TRL call enable_input_require_grads(): the embedding output is then already a leaf that requires grad."""
    model = add_lora(_llama(tied=True))
    model.enable_input_require_grads()
    batch = make_batch()
    G, _ = per_sample_grad_norms(model, batch)
    G_ref, _ = naive_grad_norms(model, batch)
    torch.testing.assert_close(G.double(), G_ref.double(), rtol=RTOL, atol=1e-6)


# ---------------------------------------------------------------------- dispatch that cannot be fooled
class _Tiny(nn.Module):
    """emb -> layer -> head, with the layers under test swapped in."""

    def __init__(self, emb=None, mid=None, norm=None):
        super().__init__()
        self.emb = emb or nn.Embedding(V, 16, padding_idx=2)
        self.mid = mid or nn.Linear(16, 16)
        self.norm = norm or nn.LayerNorm(16)
        self.head = nn.Linear(16, V, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.emb(input_ids)
        h = h + torch.tanh(self.mid(h)).cumsum(1) / 4
        return type("Out", (), {"logits": self.head(self.norm(h))})()


def _exact(model, batch=None, expect_fallback=None, **kw):
    batch = batch or make_batch(seed=11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GhostNormEngine(model, params="all", **kw) as eng:
            eng.forward(batch)
            G = eng.backward()
            fallback = [eng.param_names[id(p)] for p in eng.fallback]
    G_ref, _ = naive_grad_norms(model, batch)
    assert_close(G, G_ref)
    if expect_fallback is not None:
        assert sorted(fallback) == sorted(expect_fallback), fallback
    return fallback, [str(w.message) for w in caught]


import warnings  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from gradsift.norms.rules import NormRule, TracedLinearRule, find_rule, register_rule  # noqa: E402


class DoubledLinear(nn.Linear):  # a subclass that changes the math but still calls F.linear
    def forward(self, x):
        return 2.0 * F.linear(x, self.weight, self.bias)


class MatmulLinear(nn.Linear):  # a subclass that does not call F.linear at all
    def forward(self, x):
        return x @ self.weight.T + self.bias


class ScaledEmbedding(nn.Embedding):  # Gemma-style: the lookup times a scale, inside forward
    def forward(self, ids):
        return super().forward(ids) * 4.0


class NormalizedWeightEmbedding(nn.Embedding):  # looks up rows of a function of the weight
    def forward(self, ids):
        return F.embedding(ids, F.normalize(self.weight, dim=-1), self.padding_idx)


class OnePlusLayerNorm(nn.LayerNorm):  # a LayerNorm subclass with (1 + w), like Gemma's norms
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, 1.0 + self.weight, self.bias, self.eps)


class SquaredRMSNorm(nn.Module):  # "a norm" by name, but not affine in its weight
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.5 + 1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight.pow(2)


def test_subclass_dispatch_by_exact_type():
    assert find_rule(DoubledLinear(4, 4)) is TracedLinearRule  # proven on every F.linear call
    assert find_rule(OnePlusLayerNorm(4)) is NormRule  # proven by the affine probe
    assert find_rule(SquaredRMSNorm(4)) is None
    assert find_rule(MatmulLinear(4, 4)) is TracedLinearRule  # tried, then sent to the fallback at its call
    torch.manual_seed(0)
    _exact(_Tiny(mid=DoubledLinear(16, 16)), expect_fallback=[])
    fb, msgs = _exact(_Tiny(mid=MatmulLinear(16, 16)), expect_fallback=["mid.weight", "mid.bias"])
    assert any("mid (MatmulLinear)" in m for m in msgs), msgs


def test_scaled_and_reparametrized_embeddings():
    torch.manual_seed(0)
    _exact(_Tiny(emb=ScaledEmbedding(V, 16, padding_idx=2)), expect_fallback=[])
    _exact(_Tiny(emb=NormalizedWeightEmbedding(V, 16, padding_idx=2)), expect_fallback=["emb.weight"])
    # tied to the head: the scale is in the cross term too
    m = _Tiny(emb=ScaledEmbedding(V, 16, padding_idx=2))
    m.head.weight = m.emb.weight
    _exact(m, expect_fallback=[])


def test_norm_layers_proven_or_fallback():
    torch.manual_seed(0)
    m = _Tiny(norm=OnePlusLayerNorm(16))
    nn.init.normal_(m.norm.weight, 0.0, 0.3)
    _exact(m, expect_fallback=[])
    _exact(_Tiny(norm=SquaredRMSNorm(16)), expect_fallback=["norm.weight"])


def test_register_rule_by_type(monkeypatch):
    from gradsift.norms import rules

    monkeypatch.setattr(rules, "REGISTRY", dict(rules.REGISTRY))
    register_rule(DoubledLinear, None)  # always the exact fallback
    assert find_rule(DoubledLinear(4, 4)) is None
    register_rule(ScaledEmbedding, rules.EmbeddingRule)
    assert find_rule(ScaledEmbedding(4, 4)) is rules.EmbeddingRule
    with pytest.raises(TypeError):
        register_rule(DoubledLinear, object)


def test_parameter_used_outside_its_module_goes_to_the_fallback():
    """Mamba's mixer reads dt_proj.weight itself: the Linear rule would never see that use."""

    class Reader(_Tiny):
        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = self.emb(input_ids)
            h = h + torch.tanh(self.mid(h) + F.linear(h.flip(-1), self.mid.weight)).cumsum(1) / 4
            return type("Out", (), {"logits": self.head(self.norm(h))})()

    torch.manual_seed(0)
    fb, msgs = _exact(Reader(), expect_fallback=["mid.weight", "mid.bias"])
    assert any("used outside its forward" in m for m in msgs)


def test_token_flattened_and_gathered_rows():
    """(B*T, d) rows flattened in order are mapped back to samples; a gathered subset goes to the fallback."""

    class Flat(_Tiny):
        def __init__(self, gather):
            super().__init__()
            self.gather = gather

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = self.emb(input_ids)
            B, T, d = h.shape
            flat = h.reshape(B * T, d)
            if self.gather:  # an expert called on the tokens routed to it
                idx = (input_ids.reshape(-1) % 3 == 0).nonzero().flatten()
                out = torch.zeros_like(flat).index_add(0, idx, torch.tanh(self.mid(flat[idx])))
            else:
                out = torch.tanh(self.mid(flat))
            h = h + out.reshape(B, T, d).cumsum(1) / 4
            return type("Out", (), {"logits": self.head(self.norm(h))})()

    torch.manual_seed(0)
    _exact(Flat(gather=False), expect_fallback=[])
    fb, msgs = _exact(Flat(gather=True), expect_fallback=["mid.weight", "mid.bias"])
    assert any("mid (Linear)" in m and "rows" in m for m in msgs), msgs
    with pytest.raises(NotImplementedError, match=r"mid \(Linear\)"):
        per_sample_grad_norms(Flat(gather=True), make_batch(seed=11), strict=True)


def test_fallback_kept_gradient_without_per_sample_buffers(monkeypatch):
    """The fallback's kept gradient is exact and no (B, *param) buffer is allocated; huge parameters are refused."""
    from gradsift.norms import engine as engine_mod
    from gradsift.norms import response_losses

    torch.manual_seed(0)
    model = _Tiny(mid=MatmulLinear(16, 16))
    batch = make_batch(seed=12)
    kept = torch.tensor([1, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GhostNormEngine(model, params="all", keep_grads=True) as eng:
            eng.forward(batch)
            eng.backward()
            assert not eng._fallback_grads
            for p in model.parameters():
                p.grad = None
            eng.accumulate_grad(kept, scale=0.5)
            fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    sub = {k: v[kept] for k, v in batch.items()}
    out = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"])
    response_losses(out.logits, sub["labels"]).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-7)
    monkeypatch.setattr(engine_mod, "FALLBACK_MAX_NUMEL", 100)
    with pytest.raises(ValueError, match=r"mid\.weight .*params='trainable'"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_sample_grad_norms(model, batch)


# ---------------------------------------------------------------------- what the engine keeps
def _naive_per_sample(model, batch, params):
    """Reference per-sample gradients: one batch-size-1 backward per sample, unpadded."""
    from gradsift.norms import response_losses

    model.eval()
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        for p in params:
            p.grad = None
        out = model(input_ids=batch["input_ids"][i : i + 1, :n], attention_mask=batch["attention_mask"][i : i + 1, :n],
                    use_cache=False)
        response_losses(out.logits, batch["labels"][i : i + 1, :n]).sum().backward()
        rows.append([p.grad.clone() for p in params])
    for p in params:
        p.grad = None
    return rows


def test_per_sample_grads_of_lora_and_of_other_trainable_layers():
    """LoRA factors get their per-sample rows formed in the backward (no A or G kept for them); a trainable norm
    (no such row) is built from its captures; both equal the batch-size-1 loop."""
    torch.manual_seed(0)
    model = add_lora(_llama(tied=False))
    norm = model.base_model.model.model.norm
    norm.weight.requires_grad_(True)
    nn.init.normal_(norm.weight, 1.0, 0.2)
    batch = make_batch(seed=4)
    params = [p for p in model.parameters() if p.requires_grad]
    with GhostNormEngine(model, params="all", keep_grads=True) as eng:
        eng.forward(batch)
        G = eng.backward()
        lora_groups = [g for g in eng.groups if "lora_" in eng.module_names[g.modules[0]]]
        assert lora_groups and all(g.per_sample is not None and not g.calls for g in lora_groups)
        assert not eng._gram_cache.store  # no input Gram outlives the backward
        rows = eng.per_sample_grads(params)
    ref = _naive_per_sample(model, batch, params)
    assert set(rows) == {id(p) for p in params}
    for j, p in enumerate(params):
        for i in range(len(ref)):
            torch.testing.assert_close(rows[id(p)][i], ref[i][j], rtol=1e-4, atol=1e-6)
    G_ref, _ = naive_grad_norms(model, batch)
    assert_close(G, G_ref)


def test_lora_factors_share_their_base_layers_bf16_input():
    """PEFT keeps the adapters in fp32 and casts each bf16 input up for lora_A: the engine keeps the bf16 capture of
    the base layer once, not a second fp32 copy per adapter; G stays within bf16 tolerance of float64."""
    import copy

    torch.manual_seed(0)
    model = add_lora(_llama(tied=False).to(torch.bfloat16))
    assert any(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_A" in n)
    batch = make_batch(seed=6)
    with GhostNormEngine(model, params="all") as eng:
        eng.forward(batch)
        names = eng.module_names
        shared = 0
        for g in eng.groups:
            name = names[g.modules[0]]
            if name.endswith("lora_A.default"):
                base = eng.group_of[eng.model.get_submodule(name.rsplit(".lora_A", 1)[0] + ".base_layer")]
                A, A_base = g.calls[0].ctx["A"], base.calls[0].ctx["A"]
                assert A.dtype == torch.bfloat16 and A.data_ptr() == A_base.data_ptr(), name
                shared += 1
        assert shared == 7 * model.config.num_hidden_layers
        G = eng.backward()
    ref64 = copy.deepcopy(model).double()
    G_ref, _ = naive_grad_norms(ref64, batch)
    assert ((G.double() - G_ref).abs() / G_ref).max() < 1e-2


class FlakyNorm(nn.LayerNorm):
    """Affine in its weight (proven when the engine is built) until ``broken`` is set: then it squares it."""

    broken = False

    def forward(self, x):
        w = self.weight.pow(2) if self.broken else self.weight
        return F.layer_norm(x, self.normalized_shape, w, self.bias, self.eps)


def test_a_proven_rule_that_fails_on_a_later_batch_is_scored_exactly():
    """Only the fallback's parameters require grad in a scoring forward: a proven norm that fails its call check on
    the second batch goes to the fallback, and that batch is run again with its parameters requiring grad."""
    torch.manual_seed(0)
    model = _Tiny(norm=FlakyNorm(16))
    nn.init.normal_(model.norm.weight, 0.5, 0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GhostNormEngine(model, params="all") as eng:
            b1 = make_batch(seed=1)
            eng.forward(b1)
            assert_close(eng.backward(), naive_grad_norms(model, b1)[0])
            assert not eng.fallback
            FlakyNorm.broken = True
            try:
                b2 = make_batch(seed=2)
                eng.forward(b2)
                G2 = eng.backward()
                fallback = [eng.param_names[id(p)] for p in eng.fallback]
                G2_ref, _ = naive_grad_norms(model, b2)
            finally:
                FlakyNorm.broken = False
    assert sorted(fallback) == ["norm.bias", "norm.weight"]
    assert any("norm (FlakyNorm)" in str(w.message) for w in caught)
    assert_close(G2, G2_ref)


class _CopiedRMSNorm(nn.Module):
    """Hugging Face's RMSNorm forward, copied into another class (as "# Copied from" does across models)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class _ShiftedRMSNorm(_CopiedRMSNorm):
    """The same forward text, but ``weight`` is a property that adds 1 (Gemma's 1 + w): not the registered layer."""

    forward = _CopiedRMSNorm.forward

    def __init__(self, hidden_size):
        super().__init__(hidden_size)
        self.raw = self._parameters.pop("weight")

    @property
    def weight(self):
        return self.raw + 1


def test_a_copied_forward_is_covered_as_the_registered_class_and_nothing_else():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from gradsift.norms.rules import NormRule, dispatch, same_forward

    assert dispatch(LlamaRMSNorm(8)) == (NormRule, False)
    assert same_forward(Qwen2RMSNorm, LlamaRMSNorm) and dispatch(Qwen2RMSNorm(8)) == (NormRule, False)
    assert dispatch(_CopiedRMSNorm(8)) == (NormRule, False)  # the same bytecode, names and globals

    class Scaled(_CopiedRMSNorm):  # one constant differs
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            input_dtype = hidden_states.dtype
            hidden_states = hidden_states.to(torch.float32)
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
            return self.weight * hidden_states.to(input_dtype) * 2

    assert not same_forward(Scaled, LlamaRMSNorm)
    assert dispatch(Scaled(8)) == (NormRule, True)  # proven on a probe, then checked on every call
    assert not same_forward(_ShiftedRMSNorm, LlamaRMSNorm, NormRule.param_names)
    assert dispatch(_ShiftedRMSNorm(8))[0] is None  # owns "raw", not "weight": the exact fallback

    # scored through the registered path, the copy is exact against the per-sample loop
    torch.manual_seed(0)
    model = _Tiny(norm=_CopiedRMSNorm(16))
    nn.init.normal_(model.norm.weight, 0.5, 0.3)
    b = make_batch(seed=3)
    with GhostNormEngine(model, params="all") as eng:
        eng.forward(b)
        G = eng.backward()
        norm_rules = [g.rule for g in eng.groups if isinstance(getattr(g, "rule", None), NormRule)]
        assert norm_rules and not any(r.check_calls for r in norm_rules) and not eng.fallback
    assert_close(G, naive_grad_norms(model, b)[0])
