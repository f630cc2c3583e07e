"""The confounder-matched ablation: High-G_i against Moderate-G_i samples alike in everything but G_i.

A Moderate-G_i subset differs from a High-G_i one in more than the gradient norm:
on instruction data G_i falls steeply with the response length, and it moves with
the loss. To ask whether the gradient itself matters, both subsets are drawn so
that their covariates (response length, the aligned model's per-token loss, a
reference model's log-perplexity of the response) agree, and only G_i differs.

Method (stated in the report):

1. **Pools.** The High pool is the ``pool`` fraction of rows with the largest G_i;
   the Moderate pool the ``pool`` fraction closest to the median G_i, without the
   High pool's rows. With ``pool = 1/3`` they are the top and the middle third of
   the G_i ranking.
2. **Distance.** Each covariate is standardized by its standard deviation over the
   two pools together; the distance of a pair is the Euclidean distance of the
   standardized covariates (Mahalanobis distance with a diagonal covariance).
3. **Matching.** Optimal 1:1 matching without replacement
   (``scipy.optimize.linear_sum_assignment``, the assignment of least total
   distance); a pair whose standardized difference exceeds ``caliper`` on any
   covariate is not allowed. Of the allowed pairs, the ``k`` closest are kept
   (``k`` = the size of the study's other subsets, floor(rho * N)); fewer when fewer
   pairs are allowed.
4. **Balance.** The standardized mean difference (:func:`gradsift.analysis.stats.smd`)
   of every covariate, before matching (the plain High and Moderate subsets of the
   study) and after. A covariate with ``|SMD| > 0.1`` after matching is not
   balanced; the study then reports no matched effect, only the diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from gradsift.analysis.stats import smd

__all__ = ["BALANCE_THRESHOLD", "COVARIATES", "MatchResult", "balance_table", "match_high_moderate", "pools"]

BALANCE_THRESHOLD = 0.1
"""|SMD| above this after matching: the covariate is not balanced."""

COVARIATES = {
    "n_response_tokens": "response length (tokens)",
    "L": "loss at the aligned weights (log-perplexity of the response)",
    "ref_L": "log-perplexity of the response under the reference model",
}


@dataclass
class MatchResult:
    """Matched High-G_i and Moderate-G_i rows, pair by pair, and the balance diagnostics."""

    high_rows: list[int]
    moderate_rows: list[int]
    covariates: list[str]
    balance: pd.DataFrame  # one row per covariate (and G): smd_before, smd_pools, smd_after, balanced
    pool_sizes: tuple[int, int]
    k_wanted: int
    caliper: float
    method: str = ("optimal 1:1 matching without replacement (scipy linear_sum_assignment) on the standardized "
                   "Euclidean distance of the covariates, caliper {caliper} SD on every covariate; the {k} closest "
                   "pairs kept")
    notes: list[str] = field(default_factory=list)

    @property
    def n_pairs(self) -> int:
        return len(self.high_rows)

    @property
    def balanced(self) -> bool:
        """Every covariate within the threshold after matching (and at least two pairs)."""
        cov = self.balance[self.balance["covariate"].isin(self.covariates)]
        return self.n_pairs >= 2 and bool((cov["smd_after"].abs() <= BALANCE_THRESHOLD).all())

    @property
    def unbalanced(self) -> list[str]:
        cov = self.balance[self.balance["covariate"].isin(self.covariates)]
        return [str(c) for c, v in zip(cov["covariate"], cov["smd_after"]) if not abs(v) <= BALANCE_THRESHOLD]

    def describe(self) -> str:
        return self.method.format(caliper=self.caliper, k=self.k_wanted)

    def to_dict(self) -> dict:
        return {"high_rows": self.high_rows, "moderate_rows": self.moderate_rows, "covariates": self.covariates,
                "balance": self.balance.to_dict("records"), "pool_sizes": list(self.pool_sizes),
                "k_wanted": self.k_wanted, "n_pairs": self.n_pairs, "caliper": self.caliper,
                "balanced": self.balanced, "unbalanced": self.unbalanced, "method": self.describe(),
                "notes": self.notes}


def _order(keys: np.ndarray) -> np.ndarray:
    return np.argsort(keys, kind="stable")


def pools(G: Sequence[float], pool: float = 1 / 3) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the High pool (largest G) and the Moderate pool (closest to the median, High pool excluded)."""
    G = np.asarray(G, dtype=float)
    if not 0.0 < pool <= 0.5:
        raise ValueError(f"match pool must be in (0, 0.5], got {pool}")
    n = G.size
    size = max(1, math.floor(pool * n + 1e-9))
    high = _order(-G)[:size]
    rest = np.setdiff1d(np.arange(n), high)
    med = float(np.median(G))
    moderate = rest[_order(np.abs(G[rest] - med))][:size]
    return np.sort(high), np.sort(moderate)


def balance_table(scores: pd.DataFrame, covariates: Sequence[str], before: tuple[Sequence[int], Sequence[int]],
                  after: tuple[Sequence[int], Sequence[int]],
                  pooled: tuple[Sequence[int], Sequence[int]] | None = None) -> pd.DataFrame:
    """SMD (High minus Moderate) of each covariate and of G for three pairs of row sets."""
    by_row = scores.set_index("row")

    def s(cols: str, rows: tuple[Sequence[int], Sequence[int]] | None) -> float:
        if rows is None:
            return math.nan
        return smd(by_row.loc[list(rows[0]), cols].to_numpy(float), by_row.loc[list(rows[1]), cols].to_numpy(float))

    out = []
    for c in [*covariates, "G"]:
        row = {"covariate": c, "smd_before": s(c, before), "smd_pools": s(c, pooled), "smd_after": s(c, after),
               "mean_high_after": float(by_row.loc[list(after[0]), c].mean()) if len(after[0]) else math.nan,
               "mean_moderate_after": float(by_row.loc[list(after[1]), c].mean()) if len(after[1]) else math.nan}
        row["balanced"] = bool(abs(row["smd_after"]) <= BALANCE_THRESHOLD) if c != "G" else None
        out.append(row)
    return pd.DataFrame(out)


def match_high_moderate(scores: pd.DataFrame, k: int, covariates: Sequence[str] = ("n_response_tokens", "L"),
                        pool: float = 1 / 3, caliper: float = 0.2,
                        before: tuple[Sequence[int], Sequence[int]] | None = None) -> MatchResult:
    """Match High-G_i rows to Moderate-G_i rows on ``covariates`` (see the module docstring).

    ``scores``: a score table (``row``, ``G`` and the covariate columns). ``before``:
    the plain High and Moderate subsets (row ids) whose SMDs are reported as
    "before matching"; default: the two pools.
    """
    from scipy.optimize import linear_sum_assignment

    covariates = list(covariates)
    missing = {"row", "G", *covariates} - set(scores.columns)
    if missing:
        raise ValueError(f"score table lacks column(s) {sorted(missing)} needed for matching")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if caliper <= 0:
        raise ValueError(f"caliper must be > 0, got {caliper}")
    table = scores.reset_index(drop=True)
    hi_pos, mod_pos = pools(table["G"].to_numpy(float), pool)
    X = table[covariates].to_numpy(float)
    both = np.concatenate([hi_pos, mod_pos])
    sd = X[both].std(axis=0, ddof=1) if both.size > 1 else np.ones(len(covariates))
    sd = np.where(sd > 0, sd, 1.0)
    Z = X / sd
    diff = np.abs(Z[hi_pos][:, None, :] - Z[mod_pos][None, :, :])  # (H, M, C)
    dist = np.sqrt((diff ** 2).sum(axis=2))
    allowed = (diff <= caliper).all(axis=2)
    big = 1e6 + float(dist.max(initial=0.0)) * 10
    cost = np.where(allowed, dist, big)
    r, c = linear_sum_assignment(cost)
    ok = allowed[r, c]
    r, c = r[ok], c[ok]
    keep = np.argsort(dist[r, c], kind="stable")[:k]
    r, c = r[keep], c[keep]
    rows = table["row"].to_numpy()
    high_rows = [int(x) for x in rows[hi_pos[r]]]
    moderate_rows = [int(x) for x in rows[mod_pos[c]]]
    pooled = ([int(x) for x in rows[hi_pos]], [int(x) for x in rows[mod_pos]])
    before = before if before is not None else pooled
    balance = balance_table(table, covariates, before, (high_rows, moderate_rows), pooled)
    result = MatchResult(high_rows=sorted(high_rows), moderate_rows=sorted(moderate_rows), covariates=covariates,
                         balance=balance, pool_sizes=(len(hi_pos), len(mod_pos)), k_wanted=k, caliper=caliper)
    if result.n_pairs < k:
        result.notes.append(f"only {result.n_pairs} of the {k} wanted pairs are within the caliper")
    return result
