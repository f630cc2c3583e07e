"""The reference: one batch-size-1 backward pass per sample, summing p.grad^2.

Slow and obviously right; the tests compare the ghost engine against it.
"""

from __future__ import annotations

import torch
from torch import nn

from gradsift.losses import response_losses
from gradsift.norms.engine import _unwrap


def naive_grad_norms(
    model: nn.Module, batch: dict[str, torch.Tensor], params: str = "all"
) -> tuple[torch.Tensor, torch.Tensor]:
    """G (B,) and L (B,) from B separate backward passes over the unpadded samples."""
    model = _unwrap(model)
    named = list(model.named_parameters())
    if params == "all":
        target = [p for _, p in named]
    elif params == "trainable":
        target = [p for _, p in named if p.requires_grad]
    else:
        raise ValueError(f"params must be 'all' or 'trainable', got {params!r}")
    saved_flags = [(p, p.requires_grad, p.grad) for _, p in named]
    was_training = model.training
    model.eval()
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    G, L = [], []
    try:
        for p in target:
            p.requires_grad_(True)
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            for p, _, _ in saved_flags:
                p.grad = None
            out = model(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n], use_cache=False)
            loss = response_losses(out.logits, labels[i : i + 1, :n])[0]
            loss.backward()
            sq = sum((p.grad.double().pow(2).sum() for p in target if p.grad is not None), torch.zeros((), dtype=torch.float64))
            G.append(sq.sqrt())
            L.append(loss.detach().double())
    finally:
        for p, flag, grad in saved_flags:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    return torch.stack(G), torch.stack(L)
