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


def as_btd(x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """View an activation as (B, T, d): 2-D inputs get T=1, extra middle dims are flattened."""
    if x.dim() == 2:
        x = x.unsqueeze(1)
    if x.shape[0] != batch_size:
        raise RuntimeError(
            f"per-sample norms need batch-first activations: got shape {tuple(x.shape)} for batch size {batch_size}"
        )
    return x.reshape(batch_size, -1, x.shape[-1])


class Rule:
    """Base class. Subclasses set ``param_names`` and implement the four methods."""

    param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, module: nn.Module):
        self.module = module

    @classmethod
    def matches(cls, module: nn.Module) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def params(self) -> dict[str, nn.Parameter]:
        return {n: p for n in self.param_names if (p := getattr(self.module, n, None)) is not None}

    def capture(self, args: tuple, output: torch.Tensor, batch_size: int) -> tuple[dict[str, Any], torch.Tensor]:
        """Forward: return (ctx, output). The output may be replaced (e.g. expanded to the batch)."""
        raise NotImplementedError

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
