"""Exact per-sample gradient norms (the performance core of gradsift).

* :func:`per_sample_grad_norms` - G_i and L_i for one batch, one backward pass.
* :class:`GhostNormEngine` - the same, with reuse of the pass for a training step.
* :func:`naive_grad_norms` - the per-sample-loop reference used by the tests.
* :class:`NormCheckError` - the first-batch self-check (``verify=True``) found a mismatch.
"""

from gradsift.losses import causal_lm_losses, response_losses
from gradsift.norms.engine import GhostNormEngine, per_sample_grad_norms
from gradsift.norms.reference import naive_grad_norms
from gradsift.norms.rules import RULES, Rule, register_rule
from gradsift.norms.verify import NormCheckError

__all__ = [
    "GhostNormEngine",
    "per_sample_grad_norms",
    "response_losses",
    "causal_lm_losses",
    "naive_grad_norms",
    "NormCheckError",
    "RULES",
    "Rule",
    "register_rule",
]
