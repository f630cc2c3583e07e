"""Selection: Algorithm 1 (Moderate-G_i) online per batch, baselines, offline dataset selection."""

from gradsift.select.rules import high, low, moderate, n_keep, prefilter_mask, random_subset, select

__all__ = ["moderate", "high", "low", "random_subset", "n_keep", "prefilter_mask", "select"]
