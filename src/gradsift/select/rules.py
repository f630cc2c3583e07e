"""Selection rules on per-sample gradient norms G and losses L (pure functions).

``moderate`` is Algorithm 1 of "Continual Safety Alignment via Gradient-Based
Sample Selection": a loss pre-filter, then the floor(rho*|B|) samples whose G_i is
closest to the median of the survivors' G_i.

Conventions, written down because the paper leaves them open:
* |B| in floor(rho*|B|) is the size of the whole batch, not of the survivors, and
  at least one sample is kept.
* When fewer samples survive the pre-filter than that, all survivors are kept
  (the step then uses fewer samples); if none survive (possible only with
  degenerate losses), the pre-filter is skipped for that batch.
* The median of an even number of values is the mean of the two middle ones.
* Ties in |G_i - median| (and in G for high/low) are broken by the lower index,
  so the result is deterministic.
* Non-finite G or L are an error: they mean the model or the data is broken.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Prefilter = Literal["mean_std", "percentile", "none"] | None


def n_keep(batch_size: int, rho: float) -> int:
    """floor(rho * batch_size), at least 1."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    return max(1, math.floor(rho * batch_size + 1e-9))


def _check(G: torch.Tensor | None, L: torch.Tensor | None) -> None:
    for name, t in (("G", G), ("L", L)):
        if t is not None and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
            raise ValueError(f"non-finite {name} at batch positions {bad}")


def prefilter_mask(L: torch.Tensor, mode: Prefilter = "mean_std") -> torch.Tensor:
    """Samples kept by the loss pre-filter.

    ``mean_std``: L_i in [mean - std, mean + std] (population std over the batch);
    ``percentile``: L_i between the 16th and 84th percentiles (linear interpolation);
    ``none``/None: every sample.
    """
    L = torch.as_tensor(L, dtype=torch.float64)
    _check(None, L)
    if mode in (None, "none") or L.numel() <= 2:
        return torch.ones_like(L, dtype=torch.bool)
    if mode == "mean_std":
        mu, sd = L.mean(), L.std(unbiased=False)
        lo, hi = mu - sd, mu + sd
    elif mode == "percentile":
        lo, hi = torch.quantile(L, 0.16), torch.quantile(L, 0.84)
    else:
        raise ValueError(f"unknown prefilter {mode!r}; choose mean_std, percentile or none")
    eps = 1e-12 * max(1.0, float(L.abs().max()))
    mask = (L >= lo - eps) & (L <= hi + eps)
    if not bool(mask.any()):
        return torch.ones_like(L, dtype=torch.bool)
    return mask


def _order(keys: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Candidates sorted by key ascending, ties by index (stable sort on index order)."""
    sub = keys[candidates]
    order = torch.sort(sub, stable=True).indices
    return candidates[order]


def moderate(
    G: torch.Tensor,
    L: torch.Tensor | None = None,
    rho: float = 0.2,
    prefilter: Prefilter = "mean_std",
    batch_size: int | None = None,
) -> torch.Tensor:
    """Algorithm 1 (Moderate-G_i): indices of the kept samples, in increasing order."""
    G = torch.as_tensor(G, dtype=torch.float64).flatten()
    _check(G, L)
    B = batch_size or G.numel()
    mask = prefilter_mask(L, prefilter) if L is not None else torch.ones_like(G, dtype=torch.bool)
    survivors = mask.nonzero().flatten()
    k = min(n_keep(B, rho), survivors.numel())
    g = G[survivors]
    med = g.median() if g.numel() % 2 == 1 else torch.sort(g).values[g.numel() // 2 - 1 : g.numel() // 2 + 1].mean()
    kept = _order((G - med).abs(), survivors)[:k]
    return torch.sort(kept).values


def high(G, L=None, rho: float = 0.2, prefilter: Prefilter = "mean_std", batch_size: int | None = None) -> torch.Tensor:
    """The floor(rho*|B|) pre-filter survivors with the largest G_i (ties: lower index first)."""
    G = torch.as_tensor(G, dtype=torch.float64).flatten()
    _check(G, L)
    mask = prefilter_mask(L, prefilter) if L is not None else torch.ones_like(G, dtype=torch.bool)
    survivors = mask.nonzero().flatten()
    k = min(n_keep(batch_size or G.numel(), rho), survivors.numel())
    return torch.sort(_order(-G, survivors)[:k]).values


def low(G, L=None, rho: float = 0.2, prefilter: Prefilter = "mean_std", batch_size: int | None = None) -> torch.Tensor:
    """The floor(rho*|B|) pre-filter survivors with the smallest G_i (ties: lower index first)."""
    G = torch.as_tensor(G, dtype=torch.float64).flatten()
    _check(G, L)
    mask = prefilter_mask(L, prefilter) if L is not None else torch.ones_like(G, dtype=torch.bool)
    survivors = mask.nonzero().flatten()
    k = min(n_keep(batch_size or G.numel(), rho), survivors.numel())
    return torch.sort(_order(G, survivors)[:k]).values


def random_subset(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k of n indices uniformly at random (sorted)."""
    k = min(k, n)
    return torch.sort(torch.randperm(n, generator=generator)[:k]).values
