"""The rule interface shared by every layer type."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


class _HookState:
    suspended = False


@contextmanager
def suspend_hooks():
    """Calls made inside (a rule re-running its module) are not captured by the engine."""
    prev = _HookState.suspended
    _HookState.suspended = True
    try:
        yield
    finally:
        _HookState.suspended = prev


def hooks_suspended() -> bool:
    return _HookState.suspended


@dataclass
class Call:
    """One call of a module in the forward pass: what the rule captured, and later the output grad."""

    ctx: dict[str, Any]
    grad: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class NotCovered(Exception):
    """A call the rule cannot take exactly (the engine then sends the module to the exact fallback)."""


class Unmappable(NotCovered):
    """The rows of an activation cannot be mapped to the samples of the batch."""


class _BatchState:
    tokens: int | None = None  # T of the (B, T) batch being scored, set by the engine for each forward


def set_batch_tokens(tokens: int | None) -> None:
    _BatchState.tokens = tokens


def as_btd(x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """View an activation as (B, T, d), sample-major.

    Accepted layouts: batch-first (B, ..., d) (2-D inputs get T=1, extra middle
    dims are flattened), and tokens flattened in order from the (B, T) batch,
    (B*T, d), as OPT's MLP and MoE blocks do. Anything else (a gathered subset of
    tokens, a sequence-first layout) raises :class:`Unmappable`.
    """
    tokens = _BatchState.tokens
    if x.dim() == 2 and tokens is not None and tokens > 1 and x.shape[0] == batch_size * tokens:
        return x.reshape(batch_size, tokens, x.shape[-1])
    if x.dim() == 2:
        x = x.unsqueeze(1)
    if x.dim() < 2 or x.shape[0] != batch_size:
        expect = f"{batch_size} (the batch)" + (f" or {batch_size * tokens} (its tokens)" if tokens else "")
        raise Unmappable(f"an activation of shape {tuple(x.shape)} has {x.shape[0] if x.dim() else 0} rows, "
                         f"not {expect}: its rows cannot be mapped to samples")
    return x.reshape(batch_size, -1, x.shape[-1])


class Rule:
    """Base class. Subclasses set ``param_names`` and implement ``capture``, ``sq_norms`` and ``accumulate``.

    A rule is looked up by the exact type of a module (``register_rule(MyLayer,
    MyRule)``). A subclass of a registered type is covered only when
    ``covers_subclass`` proves it computes the same thing (by default: its
    ``forward`` is the registered class's forward function and it owns no other
    parameter). Rules that set ``traced`` capture the calls of those torch
    functions on the module's own parameters inside its forward (e.g.
    ``F.embedding(ids, self.weight)``) instead of the module's input and output:
    whatever the forward does around the call (a scale, position ids computed
    from the attention mask), the weight's gradient is exact; a forward that uses
    the parameters any other way sends them to the exact fallback.
    """

    param_names: ClassVar[tuple[str, ...]] = ()
    traced: ClassVar[tuple] = ()  # torch functions captured on the module's parameters (see above)
    provisional: ClassVar[bool] = False  # every call is checked; a failed check sends the module to the fallback

    def __init__(self, module: nn.Module):
        self.module = module

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """Older API, kept for rules registered without a type: the rule decides which modules it covers."""
        return False

    @classmethod
    def probe(cls, module: nn.Module) -> bool:
        """For a module of no registered type: may the rule try it (every call then checked)?"""
        return False

    def traced_params(self, func, args: tuple, kwargs: dict) -> set[str] | None:
        """For a traced rule: the parameter names a call of ``func`` uses in the slots the rule reads, or None."""
        return None

    @classmethod
    def owns_only_its_params(cls, module: nn.Module) -> bool:
        return set(k for k, v in module._parameters.items() if v is not None) <= set(cls.param_names)

    @classmethod
    def covers_subclass(cls, module: nn.Module, base: type) -> bool:
        """Does ``module`` (a strict subclass of the registered ``base``) compute what the rule assumes?"""
        return getattr(type(module), "forward", None) is getattr(base, "forward", None) \
            and cls.owns_only_its_params(module)

    def params(self) -> dict[str, nn.Parameter]:
        return {n: p for n in self.param_names if (p := getattr(self.module, n, None)) is not None}

    def capture(self, args: tuple, output: torch.Tensor, batch_size: int) -> tuple[dict[str, Any], torch.Tensor]:
        """Forward: return (ctx, output). The output may be replaced (e.g. expanded to the batch).

        For a traced rule, ``args`` are the arguments of the traced torch call and
        ``output`` its result. Raise :class:`Unmappable` when the call's rows
        cannot be mapped to samples.
        """
        raise NotImplementedError

    def capture_traced(self, args: tuple, kwargs: dict, output: torch.Tensor,
                       batch_size: int) -> tuple[dict[str, Any], torch.Tensor]:
        """A traced call (``func(*args, **kwargs) -> output``): return (ctx, output) as ``capture`` does."""
        return self.capture(args, output, batch_size)

    def sq_norms(self, calls: list[Call], names: set[str], batch_size: int) -> torch.Tensor:
        """Per-sample squared norm (B,) of the gradients of the parameters in ``names``."""
        raise NotImplementedError

    def accumulate(self, calls: list[Call], names: set[str], index: torch.Tensor, scale: float) -> None:
        """Add ``scale * sum_{i in index} grad_i`` into ``p.grad`` for the parameters in ``names``."""
        raise NotImplementedError


def add_grad(p: nn.Parameter, g: torch.Tensor) -> None:
    g = g.to(dtype=p.dtype, device=p.device).reshape(p.shape)
    if p.grad is None:
        p.grad = g.clone()
    else:
        p.grad.add_(g)


def cat_time(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate the calls of one module along time (no copy for the usual single call)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)
