"""Per-layer rules for exact per-sample gradient norms (one small module per layer type).

A rule covers the parameters a module owns directly. During the forward pass it
captures what the layer's per-sample weight gradient is made of (its input, the
token ids, the normalized activations); during the backward pass it receives the
gradient of the layer's output. From both it computes, for every sample i,

* ``sq_norms``: ||grad_i W||^2 (+ ||grad_i b||^2), without ever forming the
  per-sample gradient when that would cost more (ghost norms), and
* ``accumulate``: the summed gradient of a subset of samples, written into
  ``p.grad`` (used by the training step, which reuses the scoring pass).

A module called several times in one forward pass contributes the sum of its
calls' gradients: rules receive every call of the module at once and
concatenate them along the time axis, which keeps the norm exact.
"""

from gradsift.norms.rules.base import Call, Rule
from gradsift.norms.rules.embedding import EmbeddingRule
from gradsift.norms.rules.linear import Conv1DRule, LinearRule
from gradsift.norms.rules.normalization import NormRule

RULES: list[type[Rule]] = [LinearRule, Conv1DRule, EmbeddingRule, NormRule]


def register_rule(rule: type[Rule], first: bool = True) -> None:
    """Add a rule for a custom layer type (tried before the built-in ones by default)."""
    if first:
        RULES.insert(0, rule)
    else:
        RULES.append(rule)


def find_rule(module) -> type[Rule] | None:
    for rule in RULES:
        if rule.matches(module):
            return rule
    return None


__all__ = ["Call", "Rule", "RULES", "register_rule", "find_rule", "LinearRule", "Conv1DRule", "EmbeddingRule", "NormRule"]
