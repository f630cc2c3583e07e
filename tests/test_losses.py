"""The per-sample loss L_i and its chunked cross-entropy: the same numbers as torch's, without fp32 copies of the logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM

import gradsift.losses as losses
import gradsift.norms.rules.linear as linear
from gradsift.losses import TokenCrossEntropy, response_losses
from gradsift.norms import GhostNormEngine, naive_grad_norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
def test_token_cross_entropy_matches_torch(dtype, chunk_rows):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(37, 500, generator=g)).to(dtype).requires_grad_()
    y = torch.randint(0, 500, (37,), generator=g)
    y[::4] = -100
    w = torch.randn(37, generator=g)
    ref = F.cross_entropy(x.float(), y, ignore_index=-100, reduction="none")
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    out = TokenCrossEntropy.apply(x, y, chunk_rows)
    (g_out,) = torch.autograd.grad((out * w).sum(), x)
    assert out.dtype == torch.float32 and g_out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    assert (out[::4] == 0).all() and (g_out[::4] == 0).all()
    # the gradient is torch's fp32 gradient cast to the logits' dtype: equal up to one rounding step
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(g_out.float(), g_ref.float(), rtol=tol, atol=1e-6)


def test_response_losses_saves_the_logits_not_an_fp32_log_softmax():
    """What the backward keeps: the bf16 logits and a few numbers a row (torch's path: an fp32 N x V log-softmax)."""
    B, T, V = 3, 20, 4000
    logits = torch.randn(B, T, V).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (B, T))
    labels[:, :5] = -100

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            if t.data_ptr() != logits.data_ptr():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    ours = saved_bytes(lambda: response_losses(logits, labels))
    theirs = saved_bytes(lambda: F.cross_entropy(logits.float().reshape(-1, V), labels.roll(-1, 1).reshape(-1),
                                                 reduction="none"))
    assert ours <= 64 * B * T, ours  # per-row vectors only, beyond the logits themselves
    assert theirs >= 4 * B * T * V  # the measurement sees a saved fp32 (N, V) tensor


class _LargestFloat32(TorchDispatchMode):
    """The most elements of any fp32 tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("tied,mode", [(False, "auto"), (True, "auto"), (False, "materialize")])
def test_bf16_scoring_never_upcasts_the_logits_whole(tied, mode, monkeypatch):
    """The loss and the head's rule (Gram form, or per-sample gradients formed) take the (B, T, V) logits and their
    gradient in fp32 blocks only; G_i is exact."""
    monkeypatch.setattr(linear.LinearRule, "mode", mode)
    V = 2048
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                         tie_word_embeddings=tied, pad_token_id=2)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    B, T = 4, 24
    ids = torch.randint(3, V, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100  # nearly every position is scored: the logits are (B, T - 2, V)
    labels[1, 20:] = -100
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 20:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    logits_numel = B * (T - 2) * V

    def score():
        probe = _LargestFloat32()
        with GhostNormEngine(model, params="all") as eng, probe:
            eng.forward(batch)
            G = eng.backward()
        return G, probe.largest

    G_whole, largest_whole = score()
    assert largest_whole >= logits_numel  # unchunked, the measurement sees the fp32 copies
    monkeypatch.setattr(losses, "LOSS_CHUNK_ELEMENTS", 8 * V)
    monkeypatch.setattr(linear, "GRAM_CHUNK_ELEMENTS", logits_numel // 16)
    G, largest = score()
    assert largest < logits_numel // 4, (largest, logits_numel)
    ref, _ = naive_grad_norms(copy.deepcopy(model).double(), batch, params="all")
    assert ((G.double() - ref).abs() / ref).max() < 1e-2
    torch.testing.assert_close(G, G_whole, rtol=1e-5, atol=0)  # blocks change the summation order only
