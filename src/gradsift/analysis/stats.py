"""Statistics of every comparison gradsift makes: spread over seeds, confidence intervals, paired tests.

Array-likes in, plain floats and dicts out; scipy does the work. The conventions,
used the same way by the report and by every study:

* **Spread over seeds**: :func:`mean_sd`, the sample standard deviation (``ddof=1``).
* **Confidence intervals over prompts**: :func:`bootstrap_ci`, ``scipy.stats.bootstrap``
  with the bias-corrected and accelerated (BCa) interval; where BCa is undefined
  (a resample distribution with no spread on one side, tiny samples) the percentile
  interval is used instead. Constant input gives the degenerate interval ``(v, v)``.
* **Two methods on the same prompts**:
  binary outcomes (refused / attacked: yes or no per prompt) go to :func:`mcnemar`,
  the exact McNemar test (a two-sided binomial test on the discordant pairs,
  ``scipy.stats.binomtest``) with the Agresti-Min interval of the difference of the
  two paired proportions; continuous outcomes (task scores per prompt) go to
  :func:`paired_bootstrap`, a bootstrap of the mean paired difference with a
  two-sided bootstrap p-value. :func:`compare` picks one of the two.
* **Association**: :func:`spearman` (``scipy.stats.spearmanr``), :func:`partial_spearman` (the rank
  correlation of x and y with a third variable z held fixed); one value across several groups
  (G_i across task categories): :func:`kruskal` (``scipy.stats.kruskal``).
* **Balance of matched subsets**: :func:`smd`, the standardized mean difference with
  the pooled standard deviation ``sqrt((s_t^2 + s_c^2) / 2)`` (Austin 2009); the usual
  reading is that ``|SMD| < 0.1`` is balanced.

NaN values are dropped (a seed or prompt without a value); for paired functions a
pair is dropped when either side is NaN. Every function is deterministic for a given
``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import stats as _st

__all__ = ["mean_sd", "bootstrap_ci", "paired_bootstrap", "mcnemar", "compare", "spearman", "partial_spearman", "kruskal",
           "smd"]


def _vec(values) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    return x[~np.isnan(x)]


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=float).ravel()
    y = np.asarray(b, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same length: {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie in (0, 1), got {level}")


def mean_sd(values) -> tuple[float, float, int]:
    """``(mean, sample sd with ddof=1, n)`` of the non-NaN values; sd is NaN for n < 2, mean NaN for n = 0."""
    x = _vec(values)
    n = int(x.size)
    if n == 0:
        return float("nan"), float("nan"), 0
    sd = float(np.std(x, ddof=1)) if n >= 2 else float("nan")
    return float(np.mean(x)), sd, n


def bootstrap_ci(values, statistic: Callable = np.mean, level: float = 0.95, n_resamples: int = 10000,
                 seed: int = 0) -> tuple[float, float]:
    """Bootstrap confidence interval ``(lo, hi)`` of ``statistic`` over the values.

    BCa interval of ``scipy.stats.bootstrap`` (percentile where BCa is undefined).
    ``statistic`` must accept an ``axis`` keyword (numpy reductions do). Constant
    input (including a single value) gives ``(v, v)``; no values give ``(nan, nan)``.
    """
    _check_level(level)
    x = _vec(values)
    if x.size == 0:
        return float("nan"), float("nan")
    if np.all(x == x[0]):
        v = float(statistic(x))
        return v, v
    lo, hi, _ = _bootstrap((x,), statistic, level, n_resamples, seed, paired=False)
    return lo, hi


def _bootstrap(data: tuple, statistic: Callable, level: float, n_resamples: int, seed: int, paired: bool):
    """(lo, hi, bootstrap distribution) by scipy, BCa first, percentile where BCa gives no finite bound."""
    kw = dict(confidence_level=level, n_resamples=n_resamples, vectorized=True, paired=paired,
              random_state=np.random.default_rng(seed))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about degenerate BCa; the fallback below handles it
        res = _st.bootstrap(data, statistic, method="BCa", **kw)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            kw["random_state"] = np.random.default_rng(seed)
            res = _st.bootstrap(data, statistic, method="percentile", **kw)
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return lo, hi, np.asarray(res.bootstrap_distribution)


def paired_bootstrap(a, b, level: float = 0.95, n_resamples: int = 10000, seed: int = 0) -> dict:
    """Paired bootstrap of the mean difference ``mean(a - b)`` (the same prompts under two methods).

    Returns ``{"diff", "lo", "hi", "p", "n"}``: the observed mean difference, its
    bootstrap interval (as :func:`bootstrap_ci`), and the two-sided bootstrap p-value
    ``(1 + #{|d* - d| >= |d|}) / (B + 1)`` from the resampled mean differences ``d*``
    shifted to the null of no difference. All differences zero gives ``p = 1``.
    """
    _check_level(level)
    x, y = _pair(a, b)
    d = x - y
    n = int(d.size)
    if n == 0:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "p": float("nan"), "n": 0}
    obs = float(d.mean())
    if np.all(d == d[0]):
        return {"diff": obs, "lo": obs, "hi": obs, "p": 1.0 if obs == 0.0 else 1.0 / (n_resamples + 1), "n": n}
    lo, hi, dist = _bootstrap((d,), np.mean, level, n_resamples, seed, paired=False)
    extreme = int(np.sum(np.abs(dist - obs) >= abs(obs) - 1e-12 * max(1.0, abs(obs))))
    p = (1 + extreme) / (dist.size + 1)
    return {"diff": obs, "lo": lo, "hi": hi, "p": float(min(1.0, p)), "n": n}


def mcnemar(a, b, level: float = 0.95) -> dict:
    """Exact McNemar test of paired binary outcomes (per prompt: yes/no under method A and under B).

    ``n10`` counts prompts with A = 1 and B = 0, ``n01`` the reverse. ``p`` is the exact
    two-sided binomial test of ``n10`` out of ``n10 + n01`` at 1/2 (``scipy.stats.binomtest``;
    1.0 when there is no discordant pair). ``diff = mean(a) - mean(b) = (n10 - n01) / n``;
    ``lo``, ``hi`` is the Agresti-Min (2005) interval of that difference (the Wald interval
    after adding 1/2 to every cell of the 2x2 table). Also returns ``n``, ``n11``, ``n00``,
    ``rate_a`` and ``rate_b``.
    """
    _check_level(level)
    x, y = _pair(a, b)
    vals = set(np.unique(np.concatenate([x, y])).tolist())
    if not vals <= {0.0, 1.0}:
        raise ValueError("mcnemar needs binary outcomes (0/1 or booleans)")
    n = int(x.size)
    if n == 0:
        nan = float("nan")
        return {"n01": 0, "n10": 0, "n11": 0, "n00": 0, "n": 0, "p": nan, "diff": nan, "lo": nan, "hi": nan,
                "rate_a": nan, "rate_b": nan}
    xa, yb = x.astype(bool), y.astype(bool)
    n10 = int(np.sum(xa & ~yb))
    n01 = int(np.sum(~xa & yb))
    n11 = int(np.sum(xa & yb))
    n00 = n - n10 - n01 - n11
    p = float(_st.binomtest(n10, n10 + n01, 0.5).pvalue) if n10 + n01 > 0 else 1.0
    diff = (n10 - n01) / n
    # Agresti-Min: 1/2 added to each of the four cells
    a10, a01, na = n10 + 0.5, n01 + 0.5, n + 2.0
    d_adj = (a10 - a01) / na
    se = math.sqrt(max(0.0, (a10 + a01) - (a10 - a01) ** 2 / na)) / na
    z = float(_st.norm.ppf(0.5 + level / 2))
    lo, hi = max(-1.0, d_adj - z * se), min(1.0, d_adj + z * se)
    return {"n01": n01, "n10": n10, "n11": n11, "n00": n00, "n": n, "p": p, "diff": float(diff),
            "lo": float(lo), "hi": float(hi), "rate_a": float(xa.mean()), "rate_b": float(yb.mean())}


def compare(a, b, kind: str = "binary", level: float = 0.95, n_resamples: int = 10000, seed: int = 0) -> dict:
    """Paired comparison of methods A and B on the same prompts: ``{"test", "diff", "lo", "hi", "p", "n", ...}``.

    ``kind="binary"``: :func:`mcnemar`; ``kind="continuous"``: :func:`paired_bootstrap`.
    ``diff`` is always A minus B.
    """
    if kind == "binary":
        out = mcnemar(a, b, level=level)
        out["test"] = "mcnemar"
    elif kind == "continuous":
        out = paired_bootstrap(a, b, level=level, n_resamples=n_resamples, seed=seed)
        out["test"] = "paired_bootstrap"
    else:
        raise ValueError(f"unknown comparison kind {kind!r}: binary | continuous")
    return out


def spearman(x, y) -> dict:
    """Spearman rank correlation ``{"rho", "p", "n"}`` over the pairs without NaN (scipy.stats.spearmanr).

    ``rho`` and ``p`` are NaN for fewer than 3 pairs or a constant side.
    """
    a, b = _pair(x, y)
    n = int(a.size)
    if n < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return {"rho": float("nan"), "p": float("nan"), "n": n}
    res = _st.spearmanr(a, b)
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": n}


def partial_spearman(x, y, z) -> dict:
    """Partial Spearman correlation of x and y given z: ``{"rho", "p", "n"}``.

    ``(r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2))`` from the three Spearman
    correlations (triples with a NaN dropped); ``p`` from Student's t with n - 3 degrees of
    freedom. NaN for fewer than 4 triples, a constant variable or ``|r_xz|`` or ``|r_yz|`` = 1.
    """
    a = np.asarray(x, dtype=float).ravel()
    b = np.asarray(y, dtype=float).ravel()
    c = np.asarray(z, dtype=float).ravel()
    if not a.shape == b.shape == c.shape:
        raise ValueError(f"partial_spearman needs three equal lengths: {a.size}, {b.size}, {c.size}")
    keep = ~(np.isnan(a) | np.isnan(b) | np.isnan(c))
    a, b, c = a[keep], b[keep], c[keep]
    n = int(a.size)
    nan = {"rho": float("nan"), "p": float("nan"), "n": n}
    if n < 4 or any(np.all(v == v[0]) for v in (a, b, c)):
        return nan
    r = _st.spearmanr(np.column_stack([a, b, c])).statistic
    rxy, rxz, ryz = float(r[0, 1]), float(r[0, 2]), float(r[1, 2])
    den = (1 - rxz**2) * (1 - ryz**2)
    if den <= 1e-12:  # z fixes the order of x or y completely
        return nan
    rho = max(-1.0, min(1.0, (rxy - rxz * ryz) / math.sqrt(den)))
    if abs(rho) == 1.0:
        return {"rho": rho, "p": 0.0, "n": n}
    t = rho * math.sqrt((n - 3) / (1 - rho**2))
    return {"rho": rho, "p": float(2 * _st.t.sf(abs(t), n - 3)), "n": n}


def kruskal(groups) -> dict:
    """Kruskal-Wallis H test that several groups share one distribution: ``{"H", "p", "k", "n"}``.

    ``groups`` is a sequence of array-likes (or a mapping name -> values); groups with no
    value are left out. ``H`` and ``p`` are NaN with fewer than two groups or all values equal.
    """
    items = list(groups.values()) if isinstance(groups, dict) else list(groups)
    kept = [g for g in (_vec(x) for x in items) if g.size]
    n = int(sum(g.size for g in kept))
    if len(kept) < 2 or np.all(np.concatenate(kept) == kept[0][0]):
        return {"H": float("nan"), "p": float("nan"), "k": len(kept), "n": n}
    res = _st.kruskal(*kept)
    return {"H": float(res.statistic), "p": float(res.pvalue), "k": len(kept), "n": n}


def smd(x_treated, x_control) -> float:
    """Standardized mean difference ``(mean_t - mean_c) / sqrt((s_t^2 + s_c^2) / 2)`` (ddof=1 variances).

    Zero pooled sd: 0.0 when the means agree, else ``+-inf``. NaN when a side has fewer than 2 values.
    """
    t, c = _vec(x_treated), _vec(x_control)
    if t.size < 2 or c.size < 2:
        return float("nan")
    diff = float(t.mean() - c.mean())
    pooled = math.sqrt((float(np.var(t, ddof=1)) + float(np.var(c, ddof=1))) / 2.0)
    if pooled == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / pooled
