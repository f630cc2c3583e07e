"""L_i, the per-sample response loss: defined once, used by scoring, selection, training and evaluation.

For a right-padded batch whose ``labels`` hold -100 on every token that is not
part of the response, L_i is the mean token cross-entropy over sample i's
response tokens, with the usual causal shift (the logit at position t predicts
token t+1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["causal_lm_losses", "loss_positions", "response_losses"]


def response_losses(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean token cross-entropy over response tokens (labels != -100), shifted by one.

    The logits are used whole, as a contiguous (B*T, V) view with the labels shifted
    left instead (no copy of the logits, and the fast cross-entropy kernel). With
    ``positions`` (from :func:`loss_positions`), ``logits`` holds only those
    positions, (B, K, V), as a forward with ``logits_to_keep=positions`` returns them.
    """
    B, T, V = logits.shape
    if positions is None:
        target = torch.full_like(labels, -100)
        target[:, :-1] = labels[:, 1:]
    else:
        target = labels[:, positions.to(labels.device) + 1]
    ce = F.cross_entropy(logits.float().reshape(B * T, V), target.reshape(B * T), ignore_index=-100,
                         reduction="none").view(B, T)
    n = (target != -100).sum(dim=1)
    if bool((n == 0).any()):
        bad = (n == 0).nonzero().flatten().tolist()
        raise ValueError(f"samples {bad} of the batch have no response token to score (all labels are -100)")
    return ce.sum(dim=1) / n


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions t whose logits predict a response token (labels[:, t+1] != -100) in some sample."""
    return (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()


_TRIM_SUPPORT: dict[type, bool] = {}


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    base = model
    while hasattr(base, "get_base_model") and base.get_base_model() is not base:  # PEFT wrappers pass kwargs on
        base = base.get_base_model()
    cls = type(base)
    if cls not in _TRIM_SUPPORT:
        try:
            _TRIM_SUPPORT[cls] = "logits_to_keep" in inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            _TRIM_SUPPORT[cls] = False
    return _TRIM_SUPPORT[cls]


def causal_lm_losses(model: nn.Module, batch: dict[str, torch.Tensor], trim: bool = True,
                     **kwargs) -> tuple[torch.Tensor, object]:
    """Per-sample losses L (B,) of ``model`` on a right-padded batch, and the model's output.

    With ``trim`` (and a model whose forward takes ``logits_to_keep``), the output
    projection and the softmax run only at the positions that predict a response
    token in some sample of the batch: the prompt's logits, which the loss never
    reads, are not computed (on short-answer tasks most of them). The losses and
    every gradient are the same as with full logits.
    """
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if batch.get(k) is not None}
    positions = None
    if trim and _accepts_logits_to_keep(model):
        positions = loss_positions(labels).to(batch["input_ids"].device)
        if positions.numel() >= labels.shape[1] - 1:
            positions = None  # nothing to trim
    if positions is not None:
        kwargs["logits_to_keep"] = positions
    out = model(**inputs, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return response_losses(logits, labels.to(logits.device), positions), out
