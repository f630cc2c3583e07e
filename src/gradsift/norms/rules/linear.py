"""nn.Linear and GPT-2's Conv1D: y = x W^T (+ b).

Per sample, with A (T x d_in) the layer input and G (T x d_out) the output gradient,
grad W = G^T A and ||G^T A||_F^2 = <A A^T, G G^T>_F. The Gram ("ghost") form costs
about 2 T^2 (d_in + d_out) flops, materializing G^T A costs 2 T d_in d_out: the
cheaper one is chosen per call, from the actual T. Bias: ||sum_t g_t||^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradsift.norms.rules.base import Call, Rule, add_grad, as_btd, cat_time

# Upper bound on the floats of per-sample gradients materialized at once.
MATERIALIZE_BUDGET = 2**26
# Upper bound on the elements of a narrower-than-fp32 factor upcast at once for its Gram: a wide
# output gradient (the logits', B x T x vocabulary) is never copied to fp32 whole.
GRAM_CHUNK_ELEMENTS = 2**24


def gram(X: torch.Tensor) -> torch.Tensor:
    """X X^T per sample, (B, T, T) in fp32, of a (B, T, d) factor in any floating dtype.

    A bf16/fp16 factor larger than ``GRAM_CHUNK_ELEMENTS`` is upcast a block of columns
    at a time (X X^T = sum over column blocks c of X_c X_c^T, accumulated in fp32).
    """
    if X.dtype == torch.float32 or X.numel() <= GRAM_CHUNK_ELEMENTS:
        Xf = X.float()
        return torch.bmm(Xf, Xf.transpose(1, 2))
    B, T, d = X.shape
    cols = max(1, GRAM_CHUNK_ELEMENTS // max(1, B * T))
    out = torch.zeros(B, T, T, dtype=torch.float32, device=X.device)
    for c in range(0, d, cols):
        Xc = X[..., c : c + cols].float()
        out.baddbmm_(Xc, Xc.transpose(1, 2))
        del Xc  # freed before the next block is formed
    return out


class GramCache:
    """Shares the input Gram A A^T between layers called on the same tensor in one pass.

    q/k/v projections read one input, so do gate/up projections and every LoRA
    ``lora_A`` with its base layer: their ghost norms need one A A^T, not three to six.
    Inputs are registered as they are captured in the forward pass (all alive until
    the backward is done, so a storage address names one tensor); an entry is dropped
    once its last registered user took it.
    """

    def __init__(self):
        self.uses: dict[tuple, int] = {}
        self.store: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def key(A: torch.Tensor) -> tuple:
        return (A.data_ptr(), tuple(A.shape), tuple(A.stride()), A.dtype, A.device)

    def register(self, A: torch.Tensor) -> None:
        k = self.key(A)
        self.uses[k] = self.uses.get(k, 0) + 1

    def gram(self, A: torch.Tensor) -> torch.Tensor:
        """(A A^T) in fp32 of a registered capture ``A`` (in its captured dtype); counts one use."""
        k = self.key(A)
        aa = self.store.get(k)
        if aa is None:
            Af = A.float()
            aa = torch.bmm(Af, Af.transpose(1, 2))
        left = self.uses.get(k, 1) - 1
        self.uses[k] = left
        if left > 0:
            self.store[k] = aa
        else:
            self.store.pop(k, None)
        return aa

    def release(self, A: torch.Tensor) -> None:
        """A registered user that will not ask for the Gram after all."""
        k = self.key(A)
        left = self.uses.get(k, 0) - 1
        self.uses[k] = left
        if left <= 0:
            self.store.pop(k, None)

    def reset(self) -> None:
        self.uses.clear()
        self.store.clear()


class SharedInputs:
    """One capture per input whatever its dtype, for one forward pass.

    PEFT keeps the adapters in fp32 and casts a bf16 layer input to fp32 before each
    ``lora_A``: captured as it comes, every LoRA layer would hold a second, twice as
    large copy of what its base layer already captured. A floating input is compared
    with the last capture of the same shape in a narrower dtype; when it is exactly that
    capture upcast, the narrower tensor is kept instead (the rules compute in fp32 from
    it, so every number is unchanged).
    """

    def __init__(self):
        self.latest: dict[tuple, torch.Tensor] = {}

    def narrowest(self, A: torch.Tensor) -> torch.Tensor:
        if not A.dtype.is_floating_point:
            return A
        k = (tuple(A.shape), A.device)
        prev = self.latest.get(k)
        if prev is not None and prev.dtype != A.dtype and prev.element_size() < A.element_size() \
                and torch.equal(prev.to(A.dtype), A):
            return prev
        self.latest[k] = A
        return A

    def reset(self) -> None:
        self.latest.clear()


def _ghost_mode(T: int, d_in: int, d_out: int, mode: str) -> str:
    if mode == "auto":
        return "ghost" if T * (d_in + d_out) < d_in * d_out else "materialize"
    return mode


def gram_or_materialize(A: torch.Tensor, G: torch.Tensor, mode: str = "auto",
                        cache: GramCache | None = None, raw: torch.Tensor | None = None) -> torch.Tensor:
    """sum over t,s of (a_t . a_s)(g_t . g_s) per sample, i.e. ||G^T A||_F^2, for (B,T,d) inputs.

    ``G`` may be in a narrower dtype than fp32 (it is upcast in blocks: see :func:`gram`).
    With ``cache``, A A^T comes from the cache under ``raw`` (the registered capture of
    which ``A`` is the fp32 view).
    """
    B, T, d_in = A.shape
    d_out = G.shape[-1]
    mode = _ghost_mode(T, d_in, d_out, mode)
    if mode == "ghost":
        aa = cache.gram(raw if raw is not None else A) if cache is not None else torch.bmm(A, A.transpose(1, 2))
        gg = gram(G)
        return torch.linalg.vecdot(aa.reshape(B, -1), gg.reshape(B, -1))  # sum_{t,s}, without a (B, T, T) product
    # ||G^T A||^2 = sum over blocks c of G's columns of ||G_c^T A||^2: per-sample gradients (and fp32 copies of a
    # narrower G) are formed a block of samples and of columns at a time, within both budgets
    out = torch.zeros(B, dtype=torch.float32, device=A.device)
    narrow = G.dtype != torch.float32
    cols = min(d_out, max(1, MATERIALIZE_BUDGET // d_in))
    step = max(1, MATERIALIZE_BUDGET // (d_in * cols))
    if narrow:
        cols = min(cols, max(1, GRAM_CHUNK_ELEMENTS // T))
        step = min(step, max(1, GRAM_CHUNK_ELEMENTS // (T * cols)))
    for s in range(0, B, step):
        As = A[s : s + step].float()
        for c in range(0, d_out, cols):
            per_sample = torch.bmm(G[s : s + step, :, c : c + cols].float().transpose(1, 2), As)
            out[s : s + step] += per_sample.pow(2).sum(dim=(1, 2))
            del per_sample
    return out


class LinearRule(Rule):
    param_names = ("weight", "bias")
    mode = "auto"  # "ghost", "materialize" or "auto" (per call, by cost)
    gram_cache: GramCache | None = None  # set by the engine to share input Grams
    shared_inputs: "SharedInputs | None" = None  # set by the engine: one capture per input, whatever its dtype

    def capture(self, args, output, batch_size):
        A = as_btd(args[0].detach(), batch_size)
        if self.shared_inputs is not None:
            A = self.shared_inputs.narrowest(A)
        ctx = {"A": A}
        if self.gram_cache is not None and _ghost_mode(A.shape[1], A.shape[-1], output.shape[-1], self.mode) == "ghost":
            self.gram_cache.register(A)  # its A A^T may serve the other layers that read the same input
            ctx["gram"] = True
        return ctx, output

    def _factors(self, calls: list[Call], batch_size: int, upcast_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The input A (fp32) and output gradient G (fp32; in its own dtype without ``upcast_grad``) of the calls."""
        A = cat_time([c.ctx["A"] for c in calls]).float()
        G = cat_time([as_btd(c.grad, batch_size) for c in calls])
        return A, (G.float() if upcast_grad else G)

    def _release_grams(self, calls: list[Call], used: Call | None = None) -> None:
        for c in calls:
            if c.ctx.pop("gram", False) and c is not used:
                self.gram_cache.release(c.ctx["A"])

    def sq_norms(self, calls, names, batch_size):
        A, G = self._factors(calls, batch_size, upcast_grad=False)
        out = torch.zeros(batch_size, dtype=torch.float32, device=A.device)
        shared = calls[0] if len(calls) == 1 and "weight" in names and calls[0].ctx.get("gram") else None
        self._release_grams(calls, used=shared)
        if "weight" in names:
            out += gram_or_materialize(A, G, self.mode, cache=self.gram_cache if shared else None,
                                       raw=calls[0].ctx["A"])
        if "bias" in names:
            out += self._bias_grads(calls, batch_size).pow(2).sum(dim=-1)
        return out

    def per_sample_grads(self, calls, names, batch_size) -> dict[str, torch.Tensor] | None:
        """Per-sample gradients (B, *shape), fp32, of the parameters in ``names``, when they take fewer
        numbers than the factors A and G they come from (LoRA factors: r x d against T x (d + r)); else None."""
        T = sum(c.ctx["A"].shape[1] for c in calls)
        d_in, d_out = calls[0].ctx["A"].shape[-1], calls[0].grad.shape[-1]
        if d_in * d_out > T * (d_in + d_out):
            return None
        A, G = self._factors(calls, batch_size)
        self._release_grams(calls)
        out = {}
        if "weight" in names:
            out["weight"] = self._per_sample_weight(A, G)
        if "bias" in names:
            out["bias"] = self._bias_grads(calls, batch_size)
        return out

    def _per_sample_weight(self, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        return torch.bmm(G.transpose(1, 2), A)  # (B, d_out, d_in)

    def _bias_grads(self, calls: list[Call], batch_size: int) -> torch.Tensor:
        """Per-sample bias gradients (B, d_out), from the calls that added the bias."""
        used = [as_btd(c.grad, batch_size).sum(dim=1, dtype=torch.float32) for c in calls if c.ctx.get("bias", True)]
        if not used:
            return torch.zeros(batch_size, calls[0].grad.shape[-1], device=calls[0].grad.device)
        return torch.stack(used).sum(dim=0)

    def _weight_grad(self, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        # (d_out, d_in) = sum over kept rows and time of g_t a_t^T
        return G.reshape(-1, G.shape[-1]).T @ A.reshape(-1, A.shape[-1])

    def accumulate(self, calls, names, index, scale):
        bsz = calls[0].ctx["A"].shape[0]
        A, G = self._factors(calls, bsz)
        A, G = A[index], G[index]
        if "weight" in names:
            add_grad(self.module.weight, scale * self._weight_grad(A, G))
        if "bias" in names:
            add_grad(self.module.bias, scale * self._bias_grads(calls, bsz)[index].sum(dim=0))


class TracedLinearRule(LinearRule):
    """A module of no registered type that owns a 2-D ``weight`` (and a 1-D ``bias``) and applies it with
    ``F.linear`` inside its forward: MoE routers (``F.linear(tokens, self.weight)`` on the (B*T, d)
    tokens, then softmax and top-k), Linear subclasses with their own forward. Each ``F.linear`` call
    on the weight is captured; any other use of the weight sends the module to the exact fallback.
    """

    traced = (F.linear,)

    @classmethod
    def probe(cls, module):
        w, b = module._parameters.get("weight"), module._parameters.get("bias")
        return isinstance(w, torch.Tensor) and w.dim() == 2 and (b is None or b.dim() == 1) \
            and cls.owns_only_its_params(module)

    def traced_params(self, func, args, kwargs):
        if func is not F.linear:
            return None
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if weight is not self.module.weight:
            return None
        return {"weight", "bias"} if bias is not None and bias is self.module._parameters.get("bias") else {"weight"}

    def capture_traced(self, args, kwargs, output, batch_size):
        ctx, output = self.capture(args, output, batch_size)
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        ctx["bias"] = bias is not None and bias is self.module._parameters.get("bias")
        return ctx, output


class Conv1DRule(LinearRule):
    """GPT-2's Conv1D: y = x W + b with W of shape (d_in, d_out)."""

    def _weight_grad(self, A, G):
        return A.reshape(-1, A.shape[-1]).T @ G.reshape(-1, G.shape[-1])

    def _per_sample_weight(self, A, G):
        return torch.bmm(A.transpose(1, 2), G)  # (B, d_in, d_out)
