"""L_i, the per-sample response loss: defined once, used by scoring, selection, training and evaluation.

For a right-padded batch whose ``labels`` hold -100 on every token that is not
part of the response, L_i is the mean token cross-entropy over sample i's
response tokens, with the usual causal shift (the logit at position t predicts
token t+1).

The cross-entropy runs in fp32 over chunks of rows (:class:`TokenCrossEntropy`): the
(tokens x vocabulary) logits are never copied to fp32 whole, and what the backward
keeps is the logits themselves plus one log-normalizer a row, not an fp32 log-softmax.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["causal_lm_losses", "loss_positions", "response_losses", "token_cross_entropy"]

# the most logits one chunk of the cross-entropy holds in fp32 at once (64 MiB)
LOSS_CHUNK_ELEMENTS = 2**24


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class TokenCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of (N, V) logits in any dtype, in fp32 (fp64 logits: fp64), a chunk of rows at a time.

    Forward: loss_n = logsumexp(x_n) - x_n[y_n] (0 where y_n = -100), the log-normalizer
    in fp32 from an fp32 copy of one chunk. Backward: d loss_n / d x_n = g_n (softmax(x_n)
    - onehot(y_n)), recomputed chunk by chunk from the saved logits and log-normalizers and
    written in the logits' dtype. The same numbers as ``F.cross_entropy(x.float(), y,
    reduction="none")`` and its gradient cast back to x's dtype, to fp32 rounding; the
    peak is one fp32 chunk instead of an fp32 copy, an fp32 log-softmax and an fp32
    gradient of all N x V logits.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        N = logits.shape[0]
        valid = target != -100
        safe = torch.where(valid, target, 0)
        acc = _accumulation_dtype(logits)
        lse = torch.empty(N, dtype=acc, device=logits.device)
        for s in range(0, N, chunk_rows):
            lse[s : s + chunk_rows] = torch.logsumexp(logits[s : s + chunk_rows].to(acc), dim=-1)
        picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1).to(acc)
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.chunk_rows = chunk_rows
        return torch.where(valid, lse - picked, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        w = torch.where(valid, grad_loss.to(lse.dtype), 0.0)
        grad = torch.empty_like(logits)
        step = ctx.chunk_rows
        for s in range(0, logits.shape[0], step):
            # x - lse promotes the chunk to lse's dtype: one fp32 block, then exp, scale and the target's -1 in place
            p = (logits[s : s + step] - lse[s : s + step, None]).exp_().mul_(w[s : s + step, None])
            p.scatter_add_(1, safe[s : s + step, None], -w[s : s + step, None])
            grad[s : s + step] = p
            del p  # freed before the next block is formed
        return grad, None, None


def token_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 (fp64 for fp64 logits) cross-entropy of (N, V) logits against (N,) targets, -100 ignored (loss 0); see
    :class:`TokenCrossEntropy`."""
    rows = max(1, LOSS_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    return TokenCrossEntropy.apply(logits, target, rows)


def response_losses(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean token cross-entropy over response tokens (labels != -100), shifted by one.

    The logits are used whole, as a (B*T, V) view with the labels shifted left instead
    (no copy of the logits; the cross-entropy is :func:`token_cross_entropy`). With
    ``positions`` (from :func:`loss_positions`), ``logits`` holds only those
    positions, (B, K, V), as a forward with ``logits_to_keep=positions`` returns them.
    """
    B, T, V = logits.shape
    if positions is None:
        target = torch.full_like(labels, -100)
        target[:, :-1] = labels[:, 1:]
    else:
        target = labels[:, positions.to(labels.device) + 1]
    ce = token_cross_entropy(logits.reshape(B * T, V), target.reshape(B * T)).view(B, T)
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
