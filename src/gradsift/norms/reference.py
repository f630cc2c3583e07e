"""The reference: one batch-size-1 backward pass per sample, summing p.grad^2.

Slow and obviously right; the tests compare the ghost engine against it, and the
engine's first-batch self-check (``gradsift.norms.verify``) runs it on two samples.
"""

from __future__ import annotations

import torch
from torch import nn

from gradsift.losses import causal_lm_losses, response_losses


def _unwrap(model: nn.Module) -> nn.Module:
    from gradsift.norms.engine import _unwrap as unwrap

    return unwrap(model)


def _target(model: nn.Module, params: str) -> list[nn.Parameter]:
    named = list(model.named_parameters())
    if params == "all":
        return [p for _, p in named]
    if params == "trainable":
        return [p for _, p in named if p.requires_grad]
    raise ValueError(f"params must be 'all' or 'trainable', got {params!r}")


def per_sample_grads(model: nn.Module, batch: dict[str, torch.Tensor], i: int, params: list[nn.Parameter],
                     trim: bool = False, loss_scale: float = 1.0
                     ) -> tuple[list[torch.Tensor | None], torch.Tensor, float]:
    """Gradients of ``S * L_i`` with respect to ``params`` (None where unused), L_i and S, from sample i alone.

    Sample i is cut to its real tokens (right padding) and run with batch size 1,
    the model in eval mode and in its own dtype. With fp16 weights or activations,
    pass ``loss_scale`` (a power of two): the backward is of S * L_i so that no
    gradient underflows in fp16, and the gradients come back scaled by the S
    returned (a scale that overflowed is divided by 8 until it does not; S = 1
    otherwise). They are in the parameters' dtype: divide by S in float32 or
    float64. ``p.grad`` and ``requires_grad`` are left as they were.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    n = int(mask[i].sum()) if mask is not None else ids.shape[1]
    sub = {"input_ids": ids[i : i + 1, :n], "attention_mask": (mask[i : i + 1, :n] if mask is not None
                                                               else torch.ones_like(ids[i : i + 1, :n])),
           "labels": labels[i : i + 1, :n]}
    extra = {}
    if batch.get("position_ids") is not None:
        extra["position_ids"] = batch["position_ids"][i : i + 1, :n]
    flags = [(p, p.requires_grad) for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        while True:
            with torch.enable_grad():
                if trim:
                    L, _ = causal_lm_losses(model, sub, trim=True, use_cache=False, **extra)
                else:
                    out = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"], use_cache=False, **extra)
                    logits = out.logits if hasattr(out, "logits") else out[0]
                    L = response_losses(logits, sub["labels"].to(logits.device))
                grads = torch.autograd.grad(L[0] * loss_scale if loss_scale != 1.0 else L[0], params, allow_unused=True)
            finite = all(g is None or bool(torch.isfinite(g).all()) for g in grads)
            if finite or loss_scale <= 1.0 or not bool(torch.isfinite(L).all()):
                break
            loss_scale = max(1.0, loss_scale / 8)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return list(grads), L[0].detach(), loss_scale


def naive_grad_norms(
    model: nn.Module, batch: dict[str, torch.Tensor], params: str = "all"
) -> tuple[torch.Tensor, torch.Tensor]:
    """G (B,) and L (B,) from B separate backward passes over the unpadded samples."""
    model = _unwrap(model)
    target = _target(model, params)
    G, L = [], []
    for i in range(batch["input_ids"].shape[0]):
        grads, loss, _ = per_sample_grads(model, batch, i, target)
        sq = sum((g.double().pow(2).sum() for g in grads if g is not None), torch.zeros((), dtype=torch.float64))
        G.append(sq.sqrt())
        L.append(loss.double())
    return torch.stack(G), torch.stack(L)
