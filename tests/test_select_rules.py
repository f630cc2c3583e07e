"""Algorithm 1 and the baseline rules on hand-made G and L vectors."""

import pytest
import torch

from gradsift.select import high, low, moderate, n_keep, prefilter_mask, random_subset, select


def test_n_keep():
    assert n_keep(32, 0.2) == 6
    assert n_keep(10, 0.2) == 2
    assert n_keep(4, 0.2) == 1  # floor(0.8) = 0 -> at least one
    assert n_keep(10, 0.3) == 3  # 0.3 * 10 is 2.9999999999999996 in floating point
    with pytest.raises(ValueError):
        n_keep(10, 0.0)


def test_prefilter_mean_std_by_hand():
    # mean 3, population std sqrt(((-2)^2+(-1)^2+0+1+2^2... ) ) computed by hand:
    L = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 10.0])
    # mean = 25/6 = 4.1667; deviations^2: 10.03, 4.69, 1.36, 0.028, 0.69, 34.03 -> var 8.47, std 2.91
    # band [1.26, 7.08] -> keeps 2, 3, 4, 5
    assert prefilter_mask(L, "mean_std").tolist() == [False, True, True, True, True, False]
    assert prefilter_mask(L, "none").all()


def test_prefilter_percentile_by_hand():
    L = torch.arange(11, dtype=torch.float32)  # 16th pct = 1.6, 84th = 8.4
    assert prefilter_mask(L, "percentile").nonzero().flatten().tolist() == list(range(2, 9))


def test_moderate_by_hand():
    # 10 samples, rho=0.2 -> keep 2 closest to the median of the survivors
    L = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0, 5.0, 1.02])  # sample 8 fails the pre-filter
    G = torch.tensor([0.5, 3.0, 1.0, 9.0, 2.0, 1.6, 1.9, 0.1, 2.05, 7.0])
    # survivors: all but 8 -> G sorted: 0.1 0.5 1.0 1.6 1.9 2.0 3.0 7.0 9.0 -> median 1.9
    # |G - 1.9|: 1.4 1.1 .9 7.1 .1 .3 0 1.8 - 5.1 -> closest: 6 (0), 4 (0.1)
    assert moderate(G, L, rho=0.2).tolist() == [4, 6]
    # without the pre-filter sample 8 (G 2.05) joins: median of 10 values = (1.9+2.0)/2 = 1.95
    # distances: 6 -> .05, 4 -> .05, 8 -> .1 ; tie between 4 and 6 broken by index -> [4, 6]
    assert moderate(G, L, rho=0.2, prefilter="none").tolist() == [4, 6]
    assert moderate(G, L, rho=0.3, prefilter="none").tolist() == [4, 6, 8]


def test_moderate_fewer_survivors_than_k():
    L = torch.tensor([0.0, 10.0, 10.0, 10.0, 0.0])  # mean 6, std 4.9 -> survivors 1, 2, 3
    G = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert moderate(G, L, rho=1.0).tolist() == [1, 2, 3]


def test_high_low_and_ties():
    G = torch.tensor([3.0, 1.0, 3.0, 2.0, 0.5])
    assert high(G, None, rho=0.4).tolist() == [0, 2]
    assert low(G, None, rho=0.4).tolist() == [1, 4]
    assert high(G, None, rho=0.2).tolist() == [0]  # tie 0 vs 2 -> lower index


def test_random_and_dispatch():
    g = torch.Generator().manual_seed(0)
    idx = random_subset(32, 6, g)
    assert idx.numel() == 6 and len(set(idx.tolist())) == 6
    assert select("random", torch.zeros(32), rho=0.2, generator=torch.Generator().manual_seed(1)).numel() == 6
    with pytest.raises(ValueError, match="moderate"):
        select("median", torch.zeros(3))


def test_non_finite_is_an_error():
    with pytest.raises(ValueError, match="non-finite G"):
        moderate(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 1.0]))


def test_registry_methods_say_what_they_need():
    from gradsift.select import get_method, method_names, selection_method_names

    assert get_method("moderate").needs_scores and get_method("high").needs_scores
    assert get_method("random").selects and not get_method("random").needs_scores
    assert not get_method("standard").selects and "standard" in method_names()
    assert selection_method_names() == ("moderate", "random", "high", "low")
    with pytest.raises(ValueError, match="unknown method 'foo'; choose one of standard, moderate"):
        get_method("foo")
    G = torch.tensor([1.0, 5.0, 2.0, 9.0, 3.0])
    L = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05])
    kept, scored = get_method("moderate").choose(5, G, L, rho=0.4, prefilter="none")
    assert kept.tolist() == [2, 4] and scored.all()  # median 3: |2-3| = |3-3|+1 ... the two closest
    kept, scored = get_method("random").choose(5, None, L, rho=0.4, generator=torch.Generator().manual_seed(0))
    assert scored.tolist() == [i in kept.tolist() for i in range(5)] and len(kept) == 2
    with pytest.raises(ValueError, match="does not select"):
        select("standard", G, L)
