"""nn.Embedding and its subclasses: the lookup e_t = W[x_t], whatever the forward does around it.

Per sample, the gradient of row v is the sum of the output gradients b_t at the
positions where x_t = v, so ||grad W||^2 = sum_v ||sum_{t: x_t=v} b_t||^2, computed
by summing rows per distinct (sample, token) pair: O(T d), no T^2 term. The row of
``padding_idx`` receives no gradient (nn.Embedding's semantics) and is left out.

The rule is traced: it captures the ``F.embedding(ids, W)`` calls on the module's
own weight inside its forward, with the ids really looked up and the gradient of
the lookup itself. So a forward that scales the lookup (Gemma's, BART's and
XGLM's scaled word embeddings: y = W[x] * s, the scale is then in the gradient
of W, in the tied head's cross term and in the accumulated gradient), that
computes position ids from the attention mask (OPT's learned positions), or
that normalizes the lookup, is exact; one that uses W any other way (a
normalized weight, a second product) sends W to the exact fallback.

Position ids of batch size 1, (1, T) (GPT-2's wpe), are expanded to the batch in
the forward pass so that each sample's gradient stays separate (the model adds the
(1, T, d) lookup to its (B, T, d) states); 1-D positions shared by the batch go to
the fallback.
"""

from __future__ import annotations

import torch

import torch.nn.functional as F

from gradsift.norms.rules.base import Rule, Unmappable, add_grad, as_btd, cat_time


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


class EmbeddingRule(Rule):
    param_names = ("weight",)
    traced = (F.embedding,)

    @classmethod
    def covers_subclass(cls, module, base):
        # traced: every F.embedding call on the weight is captured, any other use of it is detected
        return cls.owns_only_its_params(module)

    def traced_params(self, func, args, kwargs):
        if func is not F.embedding or _arg(args, kwargs, 1, "weight") is not self.module.weight:
            return None
        if _arg(args, kwargs, 5, "scale_grad_by_freq", False) or _arg(args, kwargs, 6, "sparse", False):
            return None  # frequency-scaled gradients couple the samples of the batch
        return {"weight"}

    def capture_traced(self, args, kwargs, output, batch_size):
        ids = _arg(args, kwargs, 0, "input").detach()
        pad = _arg(args, kwargs, 2, "padding_idx")
        if ids.dim() == 1 and ids.shape[0] != batch_size:
            # one sequence of positions shared by the whole batch, (T, d): expanding it to (B, T, d) would
            # change the shape the model goes on with (RoFormer indexes it as pos[None, None])
            raise Unmappable(f"ids of shape {tuple(ids.shape)} are shared by the {batch_size} samples of the batch")
        if ids.dim() >= 1 and ids.shape[0] == 1 and batch_size > 1:
            ids = ids.expand(batch_size, *ids.shape[1:])
            output = output.expand(batch_size, *output.shape[1:])
        if ids.dim() == 0 or ids.shape[0] != batch_size:
            raise Unmappable(f"embedding ids of shape {tuple(ids.shape)} do not match batch size {batch_size}")
        if pad is not None and pad < 0:
            pad += self.module.weight.shape[0]
        return {"ids": ids.reshape(batch_size, -1), "pad": pad}, output

    def _valid(self, ids: torch.Tensor, pad=None) -> torch.Tensor:
        return torch.ones_like(ids, dtype=torch.bool) if pad is None else ids != pad

    def valid(self, calls) -> torch.Tensor:
        """The looked-up rows that receive a gradient (not the call's padding_idx), concatenated like ``factors``."""
        return cat_time([self._valid(c.ctx["ids"], c.ctx.get("pad", self.module.padding_idx)) for c in calls])

    def factors(self, calls, batch_size):
        ids = cat_time([c.ctx["ids"] for c in calls])
        grads = cat_time([as_btd(c.grad.reshape(batch_size, -1, c.grad.shape[-1]), batch_size) for c in calls])
        return ids, grads.float()

    def sq_norms(self, calls, names, batch_size):
        ids, b = self.factors(calls, batch_size)
        return embedding_sq_norms(ids, b, self.valid(calls), self.module.weight.shape[0])

    def accumulate(self, calls, names, index, scale):
        bsz = calls[0].ctx["ids"].shape[0]
        ids, b = self.factors(calls, bsz)
        valid = self.valid(calls)[index]
        ids, b = ids[index], b[index]
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
