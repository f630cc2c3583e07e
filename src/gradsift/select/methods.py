"""The training methods, one registry: each method is an object that says what it needs.

A selection method chooses the samples of each optimizer batch that the update
uses. It says whether it needs the per-sample gradient norms G_i to choose
(``needs_scores``) and how it picks the kept set from the pooled L and G
(:meth:`SelectionMethod.choose`). The baselines that train on every sample
(``standard``, ``kl``, ``ewc``, ``olora``, ``clip``) are registered here too, with
``selects=False``, so that the config and the trainer read every method name from
this one place.

>>> get_method("moderate").needs_scores, get_method("random").needs_scores
(True, False)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradsift.select.rules import Prefilter, high, low, moderate, n_keep, prefilter_mask, random_subset

__all__ = [
    "Method",
    "SelectionMethod",
    "RuleMethod",
    "RandomMethod",
    "register_method",
    "get_method",
    "method_names",
    "selection_method_names",
    "select",
]


@dataclass(frozen=True)
class Method:
    """A training method. ``selects``: it trains on a chosen subset of each optimizer batch."""

    name: str
    description: str = ""

    selects = False
    needs_scores = False


@dataclass(frozen=True)
class SelectionMethod(Method):
    """A method that keeps floor(rho * |batch|) samples of each optimizer batch."""

    selects = True

    def choose(self, n: int, G: torch.Tensor | None, L: torch.Tensor, rho: float, prefilter: Prefilter = "mean_std",
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kept, scored)``: the kept positions (sorted) and the mask of samples whose G_i counts."""
        raise NotImplementedError

    def to_score(self, L: torch.Tensor, rho: float, prefilter: Prefilter = "mean_std",
                 generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Methods that choose without scores: the kept positions, decided from L alone."""
        return None


@dataclass(frozen=True)
class RuleMethod(SelectionMethod):
    """A rule on G_i (and the loss pre-filter): Algorithm 1 (``moderate``), ``high``, ``low``."""

    rule: Callable[..., torch.Tensor] | None = None
    needs_scores = True

    def choose(self, n, G, L, rho, prefilter="mean_std", generator=None):
        pre = None if prefilter in (None, "none") else prefilter
        kept = self.rule(G, L, rho=rho, prefilter=pre)
        scored = prefilter_mask(L, pre).to(L.device) if pre is not None else torch.ones(n, dtype=torch.bool,
                                                                                       device=L.device)
        return kept.to(L.device), scored


@dataclass(frozen=True)
class RandomMethod(SelectionMethod):
    """floor(rho * |batch|) samples uniformly at random: no score is needed to choose."""

    def to_score(self, L, rho, prefilter="mean_std", generator=None):
        n = L.numel()
        return random_subset(n, n_keep(n, rho), generator).to(L.device)

    def choose(self, n, G, L, rho, prefilter="mean_std", generator=None):
        kept = self.to_score(L, rho, prefilter, generator)
        scored = torch.zeros(n, dtype=torch.bool, device=L.device)
        scored[kept] = True
        return kept, scored


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the registry (its ``name`` must be new)."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; a one-line ValueError for an unknown one."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    """Every registered method name, in registration order."""
    return tuple(_REGISTRY)


def selection_method_names() -> tuple[str, ...]:
    """The names of the methods that select samples."""
    return tuple(n for n, m in _REGISTRY.items() if m.selects)


register_method(Method("standard", "every sample, mean of the per-sample losses"))
register_method(RuleMethod("moderate", "Algorithm 1: the samples whose G_i is closest to the median", rule=moderate))
register_method(RandomMethod("random", "the same number of samples, chosen at random"))
register_method(RuleMethod("high", "the samples with the largest G_i", rule=high))
register_method(RuleMethod("low", "the samples with the smallest G_i", rule=low))
register_method(Method("kl", "every sample, plus a token-level KL to the reference model"))
register_method(Method("ewc", "every sample, plus the EWC penalty"))
register_method(Method("olora", "every sample, one adapter per task, orthogonality penalty"))
register_method(Method("clip", "every sample, gradient norm clipped"))


def select(method: str, G, L=None, rho: float = 0.2, prefilter: Prefilter = "mean_std",
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The kept positions of a batch (or a whole score table) under a selection method, by name."""
    m = get_method(method)
    if not m.selects:
        raise ValueError(f"method {method!r} does not select samples; choose one of "
                         f"{', '.join(selection_method_names())}")
    n = len(G) if G is not None else len(L)
    if L is None:
        L = torch.zeros(n, dtype=torch.float64)
        prefilter = "none"
    G = torch.as_tensor(G, dtype=torch.float64) if G is not None else None
    return m.choose(n, G, torch.as_tensor(L, dtype=torch.float64), rho, prefilter, generator)[0]
