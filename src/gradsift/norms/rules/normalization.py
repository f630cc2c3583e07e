"""Elementwise-affine normalization layers: LayerNorm and the RMSNorm variants.

They compute y = xhat * (c + w) (+ b), with c = 0 (LayerNorm, Llama/Qwen2/Mistral
RMSNorm) or c = 1 (Gemma's RMSNorm). Per sample, grad w = sum_t g_t * xhat_t and
grad b = sum_t g_t. xhat is taken exactly as the module computes it (dtype casts
included) by calling the module itself with w = 1 and w = 0 (and b = 0): the
difference of the two outputs is xhat for either value of c.

nn.LayerNorm and nn.RMSNorm are registered by type. A module of no registered
type that owns a 1-D weight (and bias) acting on the last dimension (the
RMSNorm/LayerNorm classes of Llama, Gemma, Qwen, Cohere..., gated RMSNorms, layer
scales) is covered only when the rule's assumption, y = y0 + xhat * w + b with y0
and xhat independent of (w, b), is proven: first on a random input when the
engine is built, then on every actual call (the output must equal y0 + xhat * w
+ b); a module that fails goes to the exact fallback.
"""

from __future__ import annotations

import torch
from torch import nn

from gradsift.norms.rules.base import NotCovered, Rule, add_grad, as_btd, cat_time, suspend_hooks


def _call_with(module: nn.Module, params: dict[str, torch.Tensor], args: tuple) -> torch.Tensor:
    """``module(*args)`` with some of its own parameters replaced by ``params`` for the call (what
    ``torch.func.functional_call`` does, without its bookkeeping: this runs on every call of a norm layer)."""
    saved = {n: module._parameters[n] for n in params}
    try:
        module._parameters.update(params)
        return module(*args)
    finally:
        module._parameters.update(saved)


def _affine_in_params(module: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                      extra: tuple = ()) -> torch.Tensor | None:
    """xhat = y(1, 0) - y(0, 0) if y(w, b) == y(0, 0) + xhat * w + b, else None.

    Checked at a random (w, b), or, given the module's actual output ``y``, at its own (w, b).
    """
    w = module.weight
    b = module._parameters.get("bias")

    def call(wv, bv):
        params = {"weight": wv} if b is None else {"weight": wv, "bias": bv}
        return _call_with(module, params, (x,) + tuple(extra)).float()

    with suspend_hooks(), torch.no_grad():
        zb = None if b is None else torch.zeros_like(b)
        y0 = call(torch.zeros_like(w), zb)
        offset = bool(y0.any())  # c != 0 (Gemma's 1 + w) or a y0 of its own
        xhat = call(torch.ones_like(w), zb)
        if offset:
            xhat = xhat.sub_(y0)
        if y is None:
            gen = torch.Generator(device="cpu").manual_seed(0)

            def rand(t):
                return (torch.randn(t.shape, generator=gen) * 0.5 + 0.3).to(dtype=t.dtype, device=t.device)

            wv, bv = rand(w), (None if b is None else rand(b))
            y = call(wv, bv)
        else:
            wv, bv = w.detach(), (None if b is None else b.detach())
        if y.shape != xhat.shape or xhat.shape[-1] != w.numel():
            return None
        eps = torch.finfo(y.dtype if y.dtype.is_floating_point else torch.float32).eps
        eps = max(eps, torch.finfo(w.dtype).eps, torch.finfo(x.dtype).eps if x.dtype.is_floating_point else 0.0)
        # |y - (y0 + xhat w + b)| <= 16 eps (|y| + |y0| + |xhat w| + 1e-6), in few full-size passes
        xw = xhat * wv.float()
        err = y.float() - xw
        if bv is not None:
            err.sub_(bv.float())
        if offset:
            err.sub_(y0)
        bound = xw.abs_().add_(y.abs())
        if offset:
            bound.add_(y0.abs())
        return xhat if bool(err.abs_().mul_(1.0 / (16 * eps)).sub_(1e-6).le_(bound).all()) else None


def _narrowed(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (fp32) kept in the module's narrower ``dtype`` when that holds every value exactly (a bf16
    model's xhat is a bf16 tensor), so the capture costs what the module's own activations cost."""
    if x.dtype == dtype or not dtype.is_floating_point or torch.finfo(dtype).bits >= torch.finfo(x.dtype).bits:
        return x
    narrow = x.to(dtype)
    return narrow if torch.equal(narrow.to(x.dtype), x) else x


class NormRule(Rule):
    param_names = ("weight", "bias")
    _zero_at_zero: bool | None = None  # y(w=0, b=0) == 0 (c = 0), learnt on the first call
    check_calls = False  # set by the engine for a module of no registered type

    @classmethod
    def probe(cls, module: nn.Module) -> bool:
        w, b = module._parameters.get("weight"), module._parameters.get("bias")
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or (b is not None and b.shape != w.shape):
            return False
        if not cls.owns_only_its_params(module) or not w.dtype.is_floating_point:
            return False
        x = torch.randn(2, 3, w.numel(), generator=torch.Generator().manual_seed(1)).to(w.dtype).to(w.device)
        try:
            return _affine_in_params(module, x) is not None
        except Exception:  # noqa: BLE001 - a forward that needs other arguments: not proven
            return False

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
        if self.check_calls:
            try:
                xhat = _affine_in_params(self.module, x, output.detach().float(), tuple(args[1:]))
            except Exception as e:  # noqa: BLE001
                raise NotCovered(f"re-running the layer failed: {type(e).__name__}: {e}") from e
            if xhat is None:
                raise NotCovered("its output is not y0 + xhat * weight + bias on this call")
            return {"xhat": as_btd(_narrowed(xhat, output.dtype), batch_size)}, output
        with suspend_hooks(), torch.no_grad():
            one = _call_with(self.module, params, (x,) + tuple(args[1:]))
            if self._zero_at_zero:  # y(w=0, b=0) was exactly 0 on a first call: c = 0, skip it
                xhat = one  # in the module's dtype: exactly what it multiplies by w
            else:
                zero = _call_with(self.module, zeros, (x,) + tuple(args[1:]))
                if self._zero_at_zero is None:
                    self._zero_at_zero = bool(torch.isfinite(one).all()) and not bool(zero.any())
                xhat = _narrowed(one.float() - zero.float(), one.dtype)
        return {"xhat": as_btd(xhat, batch_size)}, output

    def _factors(self, calls, batch_size):
        xhat = cat_time([c.ctx["xhat"] for c in calls]).float()
        g = cat_time([as_btd(c.grad, batch_size) for c in calls]).float()
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
