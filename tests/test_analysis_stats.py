"""gradsift.analysis.stats against values computed by hand (or by an independent formula)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from gradsift.analysis.stats import bootstrap_ci, compare, kruskal, mcnemar, mean_sd, paired_bootstrap, partial_spearman, smd, spearman


def _table(n11: int, n10: int, n01: int, n00: int) -> tuple[list[int], list[int]]:
    a = [1] * n11 + [1] * n10 + [0] * n01 + [0] * n00
    b = [1] * n11 + [0] * n10 + [1] * n01 + [0] * n00
    return a, b


def test_mean_sd_by_hand():
    m, sd, n = mean_sd([1.0, 2.0, 3.0, 4.0])
    assert (m, n) == (2.5, 4)
    assert sd == pytest.approx(math.sqrt(5.0 / 3.0))  # sum of squares 5, ddof 1
    m, sd, n = mean_sd([7.0, float("nan")])
    assert m == 7.0 and math.isnan(sd) and n == 1


def test_mcnemar_matches_the_binomial_formula_by_hand():
    # 2x2 table: both 5, A only 8, B only 2, neither 5 (n = 20)
    a, b = _table(5, 8, 2, 5)
    r = mcnemar(a, b)
    assert (r["n10"], r["n01"], r["n11"], r["n00"], r["n"]) == (8, 2, 5, 5, 20)
    # exact two-sided: 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert r["p"] == pytest.approx(112 / 1024)
    assert r["diff"] == pytest.approx((8 - 2) / 20)
    # Agresti-Min: cells + 1/2 -> d = 6/22, se = sqrt(11 - 6^2/22) / 22
    d, se = 6 / 22, math.sqrt(11 - 36 / 22) / 22
    assert r["lo"] == pytest.approx(d - 1.959963985 * se, abs=1e-6)
    assert r["hi"] == pytest.approx(d + 1.959963985 * se, abs=1e-6)
    assert r["rate_a"] == pytest.approx(13 / 20) and r["rate_b"] == pytest.approx(7 / 20)


def test_mcnemar_no_discordant_pair_and_bad_input():
    a, b = _table(3, 0, 0, 4)
    r = mcnemar(a, b)
    assert r["p"] == 1.0 and r["diff"] == 0.0 and r["lo"] < 0 < r["hi"]
    with pytest.raises(ValueError, match="binary"):
        mcnemar([0, 1, 2], [0, 1, 1])
    with pytest.raises(ValueError, match="same length"):
        mcnemar([0, 1], [0, 1, 1])


def test_bootstrap_ci_agrees_with_the_analytic_mean_ci_on_a_large_normal_sample():
    x = np.random.default_rng(3).normal(5.0, 2.0, size=2000)
    half = st.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    lo, hi = bootstrap_ci(x, n_resamples=4000)
    assert lo == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_bootstrap_ci_degenerate_inputs():
    assert bootstrap_ci([0.0] * 30) == (0.0, 0.0)
    assert bootstrap_ci([4.0]) == (4.0, 4.0)
    lo, hi = bootstrap_ci([])
    assert math.isnan(lo) and math.isnan(hi)
    # a rare binary outcome: BCa is undefined on many resamples, an interval still comes back
    lo, hi = bootstrap_ci([1] + [0] * 59, n_resamples=2000)
    assert 0.0 <= lo <= 1 / 60 <= hi <= 0.2
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0, 2.0], level=95)


def test_paired_bootstrap_against_the_paired_t_test():
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 1.0, size=400)
    a = base + rng.normal(0.12, 1.0, size=400)
    r = paired_bootstrap(a, base, n_resamples=5000)
    d = a - base
    assert r["diff"] == pytest.approx(d.mean()) and r["n"] == 400
    half = st.t.ppf(0.975, 399) * d.std(ddof=1) / 20.0
    assert r["lo"] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert r["hi"] == pytest.approx(d.mean() + half, abs=0.15 * half)
    assert r["p"] == pytest.approx(st.ttest_rel(a, base).pvalue, abs=0.02)
    same = paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["diff"] == 0.0 and same["p"] == 1.0


def test_compare_dispatches():
    a, b = _table(5, 8, 2, 5)
    assert compare(a, b, kind="binary")["test"] == "mcnemar"
    r = compare([1.0, 2.0, 4.0], [0.0, 2.0, 1.0], kind="continuous", n_resamples=500)
    assert r["test"] == "paired_bootstrap" and r["diff"] == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="kind"):
        compare(a, b, kind="ordinal")


def test_spearman_hand_ranked():
    # ranks differ by d = (-1, 1, -1, 1, 0): rho = 1 - 6 * 4 / (5 * 24) = 0.8
    r = spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert r["rho"] == pytest.approx(0.8) and r["n"] == 5
    assert 0 < r["p"] < 1
    assert math.isnan(spearman([1, 2, 3], [1, 1, 1])["rho"])


def test_smd_by_hand():
    # means 2 and 4, variances 1 and 4: -2 / sqrt(2.5)
    assert smd([1, 2, 3], [2, 4, 6]) == pytest.approx(-2 / math.sqrt(2.5))
    assert smd([1, 1], [1, 1]) == 0.0
    assert smd([2, 2], [1, 1]) == math.inf
    assert math.isnan(smd([1], [1, 2]))


def test_kruskal_by_hand():
    # no ties: ranks 1..6; groups {1,2,3} and {4,5,6}: rank sums 6 and 15, n = 6
    # H = 12 / (6 * 7) * (6^2/3 + 15^2/3) - 3 * 7 = (12/42) * 87 - 21 = 3.857142...
    r = kruskal({"a": [1.0, 2.0, 3.0], "b": [10.0, 20.0, 30.0], "empty": []})
    assert r["H"] == pytest.approx(12 / 42 * 87 - 21) and (r["k"], r["n"]) == (2, 6)
    assert r["p"] == pytest.approx(math.erfc(math.sqrt(r["H"] / 2)))  # chi-square survival, 1 df
    assert math.isnan(kruskal([[1.0, 2.0]])["p"])


def test_partial_spearman_by_hand():
    # ranks: x = 1..5, z = (2, 1, 4, 3, 5), y = (1, 3, 2, 5, 4)
    # r_xz = 0.8 (see above); r_xy: d = (0,-1,1,-1,1), sum d^2 = 4 -> 0.8;
    # r_yz: d = (1,-2,2,-2,1), sum d^2 = 14 -> 1 - 84/120 = 0.3
    x, y, z = [1, 2, 3, 4, 5], [1, 3, 2, 5, 4], [2, 1, 4, 3, 5]
    r = partial_spearman(x, y, z)
    expected = (0.8 - 0.8 * 0.3) / math.sqrt((1 - 0.64) * (1 - 0.09))
    assert r["rho"] == pytest.approx(expected) and r["n"] == 5
    t = expected * math.sqrt(2 / (1 - expected**2))
    assert r["p"] == pytest.approx(2 * st.t.sf(t, 2))
    assert math.isnan(partial_spearman([1, 2, 3, 4], [1, 2, 3, 4], [1, 1, 1, 1])["rho"])
