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

Dispatch cannot be fooled by a subclass (:func:`find_rule`): rules are looked
up by the exact type of a module, as Opacus does. A subclass of a registered
type is covered only when the rule proves that it computes the same thing
(``Rule.covers_subclass``: by default its ``forward`` is the registered class's
forward function). A module of no registered type is covered only by a rule
that checks every call (the elementwise-affine rule of normalization layers,
the traced ``F.linear`` rule of routers). Everything else goes to the engine's
exact per-sample fallback.

A class of no registered type whose ``forward`` is the same code as a registered
class's (the RMSNorm that Hugging Face copies into Qwen2, Mistral, Phi-3... as
``# Copied from transformers.models.llama...``) computes the same thing and is
covered as that class (:func:`same_forward`).
"""

from __future__ import annotations

from torch import nn

from gradsift.norms.rules.base import Call, Rule, Unmappable
from gradsift.norms.rules.embedding import EmbeddingRule
from gradsift.norms.rules.linear import Conv1DRule, LinearRule, TracedLinearRule
from gradsift.norms.rules.normalization import NormRule

# exact module type -> rule (None: always the exact per-sample fallback)
REGISTRY: dict[type, type[Rule] | None] = {
    nn.Linear: LinearRule,
    nn.Embedding: EmbeddingRule,
    nn.LayerNorm: NormRule,
}
if hasattr(nn, "RMSNorm"):
    REGISTRY[nn.RMSNorm] = NormRule
try:
    from transformers.pytorch_utils import Conv1D

    REGISTRY[Conv1D] = Conv1DRule
except ImportError:  # pragma: no cover
    pass
try:  # y = weight * (x / rms(x)): elementwise affine in its weight, zero at zero
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    REGISTRY[LlamaRMSNorm] = NormRule
except ImportError:  # pragma: no cover
    pass

# rules registered without a type (older API): their ``matches`` decides, tried first
RULES: list[type[Rule]] = []

# for modules of no registered type: rules that check every call
PROBED: list[type[Rule]] = [NormRule, TracedLinearRule]

_UNSET = object()


def register_rule(module_type, rule=_UNSET, first: bool = True) -> None:
    """Register a rule.

    * ``register_rule(MyLayer, MyRule)``: modules of exactly type ``MyLayer`` use
      ``MyRule`` (subclasses only through ``MyRule.covers_subclass``).
    * ``register_rule(MyLayer, None)``: modules of that type always go to the exact
      per-sample fallback (e.g. a subclass whose forward the built-in rule would
      accept but that you know differs).
    * ``register_rule(MyRule)`` (older form): ``MyRule.matches(module)`` decides, tried
      before the registry (``first=False``: after the built-in registry).
    """
    if rule is _UNSET:
        if not (isinstance(module_type, type) and issubclass(module_type, Rule)):
            raise TypeError("register_rule(module_type, rule) or register_rule(rule_class_with_matches)")
        if first:
            RULES.insert(0, module_type)
        else:
            RULES.append(module_type)
        return
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_rule: {module_type!r} is not an nn.Module class")
    if rule is not None and not (isinstance(rule, type) and issubclass(rule, Rule)):
        raise TypeError(f"register_rule: {rule!r} is not a Rule class (or None)")
    REGISTRY[module_type] = rule


# co_flags below this bit describe the code itself; the __future__ flags above it (annotations) do not
_CODE_FLAGS = 0xFFFF


def _code_key(code) -> tuple:
    return (code.co_code, code.co_consts, code.co_names, code.co_varnames, code.co_argcount,
            code.co_kwonlyargcount, code.co_flags & _CODE_FLAGS, code.co_freevars)


def same_forward(cls: type, base: type, param_names: tuple[str, ...] = ()) -> bool:
    """Does ``cls`` run ``base``'s forward: the same bytecode, constants and names, the same objects behind
    the global names it reads, no closure, the default ``__call__``, and no class attribute shadowing the
    parameters the forward reads?"""
    f, g = getattr(cls, "forward", None), getattr(base, "forward", None)
    code_f, code_g = getattr(f, "__code__", None), getattr(g, "__code__", None)
    if code_f is None or code_g is None or f.__closure__ or g.__closure__ or _code_key(code_f) != _code_key(code_g):
        return False
    if cls.__call__ is not nn.Module.__call__ or any(hasattr(cls, n) for n in param_names):
        return False
    missing = object()
    return all(f.__globals__.get(n, missing) is g.__globals__.get(n, missing) for n in code_f.co_names
               if n in f.__globals__ or n in g.__globals__)


def dispatch(module: nn.Module) -> tuple[type[Rule] | None, bool]:
    """(rule, provisional): the rule that covers ``module``'s own parameters (None: the exact fallback).

    ``provisional``: every call is checked (a traced rule, or a rule proven by a
    probe for a module of no registered type); a call that fails the check sends
    the module's parameters to the fallback.
    """
    for rule in RULES:
        if rule.matches(module):
            return rule, bool(rule.traced)
    cls = type(module)
    if cls in REGISTRY:
        rule = REGISTRY[cls]
        ok = rule is not None and rule.owns_only_its_params(module)
        return (rule, bool(rule.traced)) if ok else (None, False)
    for base in cls.__mro__[1:]:
        if base in REGISTRY:  # the nearest registered base decides
            rule = REGISTRY[base]
            if rule is not None and rule.covers_subclass(module, base):
                return rule, bool(rule.traced)
            break
    for base, rule in REGISTRY.items():  # a copy of a registered class's forward
        if rule is not None and same_forward(cls, base, rule.param_names) and rule.owns_only_its_params(module):
            return rule, bool(rule.traced)
    for rule in PROBED:
        if rule.probe(module):
            return rule, True
    return None, False


def find_rule(module: nn.Module) -> type[Rule] | None:
    """The rule that covers ``module``'s own parameters, or None (the exact fallback)."""
    return dispatch(module)[0]


def rule_names() -> dict[str, str]:
    """Registered module type -> rule name, for the docs."""
    return {f"{t.__module__}.{t.__qualname__}": (r.__name__ if r else "fallback") for t, r in REGISTRY.items()}


__all__ = ["Call", "Rule", "RULES", "REGISTRY", "PROBED", "register_rule", "find_rule", "dispatch", "same_forward", "LinearRule", "Conv1DRule",
           "TracedLinearRule", "EmbeddingRule", "NormRule", "Unmappable"]
