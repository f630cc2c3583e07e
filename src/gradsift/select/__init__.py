"""Selection: the method registry, Algorithm 1 (Moderate-G_i) and the baseline rules, offline dataset selection."""

from gradsift.select.methods import (
    Method,
    SelectionMethod,
    get_method,
    method_names,
    register_method,
    select,
    selection_method_names,
)
from gradsift.select.rules import high, low, moderate, n_keep, prefilter_mask, random_subset

__all__ = ["moderate", "high", "low", "random_subset", "n_keep", "prefilter_mask", "select", "Method",
           "SelectionMethod", "get_method", "method_names", "register_method", "selection_method_names"]
