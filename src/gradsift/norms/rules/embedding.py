"""nn.Embedding: y_t = W[x_t].

Per sample, the gradient of row v is the sum of the output gradients b_t at the
positions where x_t = v, so ||grad W||^2 = sum_v ||sum_{t: x_t=v} b_t||^2, computed
by summing rows per distinct (sample, token) pair: O(T d), no T^2 term. The row of
``padding_idx`` receives no gradient (nn.Embedding's semantics) and is left out.

Position embeddings called with ids of batch size 1 (GPT-2's wpe) are expanded to
the batch in the forward pass so that each sample's gradient stays separate.
"""

from __future__ import annotations

import torch
from torch import nn

from gradsift.norms.rules.base import Rule, add_grad, cat_time


class EmbeddingRule(Rule):
    param_names = ("weight",)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding) and set(module._parameters) <= {"weight"}

    def capture(self, args, output, batch_size):
        ids = args[0].detach()
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.shape[0] == 1 and batch_size > 1:
            ids = ids.expand(batch_size, *ids.shape[1:])
            output = output.expand(batch_size, *output.shape[1:])
        if ids.shape[0] != batch_size:
            raise RuntimeError(f"embedding ids of shape {tuple(ids.shape)} do not match batch size {batch_size}")
        return {"ids": ids.reshape(batch_size, -1)}, output

    def _valid(self, ids: torch.Tensor) -> torch.Tensor:
        pad = self.module.padding_idx
        return torch.ones_like(ids, dtype=torch.bool) if pad is None else ids != pad

    def factors(self, calls, batch_size):
        ids = cat_time([c.ctx["ids"] for c in calls])
        grads = cat_time([c.grad.reshape(batch_size, -1, c.grad.shape[-1]) for c in calls]).float()
        return ids, grads

    def sq_norms(self, calls, names, batch_size):
        ids, b = self.factors(calls, batch_size)
        return embedding_sq_norms(ids, b, self._valid(ids), self.module.num_embeddings)

    def accumulate(self, calls, names, index, scale):
        bsz = calls[0].ctx["ids"].shape[0]
        ids, b = self.factors(calls, bsz)
        ids, b = ids[index], b[index]
        valid = self._valid(ids)
        g = torch.zeros(self.module.weight.shape, dtype=torch.float32, device=b.device)
        g.index_add_(0, ids[valid], b[valid])
        add_grad(self.module.weight, scale * g)


def embedding_sq_norms(ids: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    """sum over distinct tokens v of ||sum_{t: ids_t = v} b_t||^2 for each sample."""
    B, T, d = b.shape
    sample = torch.arange(B, device=ids.device).unsqueeze(1).expand(B, T)
    key = (sample * vocab + ids)[valid]
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = torch.zeros(uniq.numel(), d, dtype=b.dtype, device=b.device)
    rows.index_add_(0, inverse, b[valid])
    out = torch.zeros(B, dtype=b.dtype, device=b.device)
    out.index_add_(0, torch.div(uniq, vocab, rounding_mode="floor"), rows.pow(2).sum(-1))
    return out
