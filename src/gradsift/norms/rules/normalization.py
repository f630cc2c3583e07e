"""Elementwise-affine normalization layers: LayerNorm and the RMSNorm variants.

They compute y = xhat * (c + w) (+ b), with c = 0 (LayerNorm, Llama/Qwen2/Mistral
RMSNorm) or c = 1 (Gemma's RMSNorm). Per sample, grad w = sum_t g_t * xhat_t and
grad b = sum_t g_t. xhat is taken exactly as the module computes it (dtype casts
included) by calling the module itself with w = 1 and w = 0 (and b = 0): the
difference of the two outputs is xhat for either value of c.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from gradsift.norms.rules.base import Rule, add_grad, cat_time, suspend_hooks

_NORM_TYPES = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class NormRule(Rule):
    param_names = ("weight", "bias")
    _zero_at_zero: bool | None = None  # y(w=0, b=0) == 0 (c = 0), learnt on the first call

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if not set(module._parameters) <= {"weight", "bias"}:
            return False
        w = module._parameters.get("weight")
        if w is None or w.dim() != 1:
            return False
        return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()

    def capture(self, args, output, batch_size):
        x = args[0].detach()
        w = self.module.weight
        if x.shape[-1] != w.numel():
            raise RuntimeError(
                f"{type(self.module).__name__}: weight of size {w.numel()} does not act on the last "
                f"dimension {x.shape[-1]}; no exact per-sample rule for this layer"
            )
        params = {"weight": torch.ones_like(w)}
        zeros = {"weight": torch.zeros_like(w)}
        if self.module._parameters.get("bias") is not None:
            params["bias"] = torch.zeros_like(self.module.bias)
            zeros["bias"] = params["bias"]
        with suspend_hooks(), torch.no_grad():
            one = functional_call(self.module, params, (x,) + tuple(args[1:]))
            if self._zero_at_zero:  # y(w=0, b=0) was exactly 0 on a first call: c = 0, skip it
                xhat = one.float()
            else:
                zero = functional_call(self.module, zeros, (x,) + tuple(args[1:]))
                if self._zero_at_zero is None:
                    self._zero_at_zero = bool(torch.isfinite(one).all()) and not bool(zero.any())
                xhat = one.float() - zero.float()
        return {"xhat": xhat.reshape(batch_size, -1, w.numel())}, output

    def _factors(self, calls, batch_size):
        xhat = cat_time([c.ctx["xhat"] for c in calls])
        g = cat_time([c.grad.reshape(batch_size, -1, c.grad.shape[-1]) for c in calls]).float()
        return xhat, g

    def sq_norms(self, calls, names, batch_size):
        xhat, g = self._factors(calls, batch_size)
        out = torch.zeros(batch_size, dtype=torch.float32, device=g.device)
        if "weight" in names:
            out += (g * xhat).sum(dim=1).pow(2).sum(-1)
        if "bias" in names:
            out += g.sum(dim=1).pow(2).sum(-1)
        return out

    def accumulate(self, calls, names, index, scale):
        bsz = calls[0].ctx["xhat"].shape[0]
        xhat, g = self._factors(calls, bsz)
        xhat, g = xhat[index], g[index]
        if "weight" in names:
            add_grad(self.module.weight, scale * (g * xhat).sum(dim=(0, 1)))
        if "bias" in names:
            add_grad(self.module.bias, scale * g.sum(dim=(0, 1)))
