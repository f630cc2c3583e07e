"""Every causal-LM family of the installed transformers: exact, or refused with a message naming a module.

Each family is built from its config class with tiny sizes (``gradsift.testing.families``)
and checked against independent references: G_i against the batch-size-1 loop
(``naive_grad_norms``) and the gradient kept by the engine (``accumulate_grad`` on two
of three samples) against a fresh backward on those samples alone, both to 1e-4,
for params "all" and "trainable" (the embeddings and the first block frozen), with
and without LoRA. A wrong number fails; a family that cannot be built from a config
on a CPU is skipped with the reason (docs/models.md lists them all).
"""

from __future__ import annotations

import re
import warnings

import pytest

from gradsift.testing.families import causal_lm_types, check_family

# a representative fast subset (dense, tied and untied, Conv1D, scaled embeddings, learned positions
# fed by the attention mask, (B*T, d)-flattened MLPs, MoE routers and fused experts, parallel blocks,
# a Linear subclass with its own forward, in-place scaled embeddings, a state-space model)
FAST = {"llama", "qwen2", "gpt2", "gemma", "gemma2", "opt", "mixtral", "qwen2_moe", "olmoe", "phi", "falcon",
        "ctrl", "falcon_mamba"}
VARIANTS = [("all", False), ("trainable", True), ("trainable", False), ("all", True)]
FULL = {"llama", "gemma2", "opt", "mixtral"}  # every variant by default; the others: full fine-tuning and LoRA

_TYPES = sorted(causal_lm_types())


def _cases():
    for t in _TYPES:
        marks = [] if t in FAST else [pytest.mark.slow]
        yield pytest.param(t, marks=marks, id=t)


def _check(model_type: str, params: str, lora: bool, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = check_family(model_type, params=params, lora=lora, **kw)
    if out.status == "unbuildable":
        pytest.skip(f"{model_type}: {out.detail}")
    if out.status == "refused":
        # a refusal must say which module (its path and class) it refuses
        assert re.search(r"[\w.]+ \(\w+\)", out.detail), f"{model_type}: refusal names no module: {out.detail}"
        return out
    assert out.status in ("exact", "exact (fallback)"), (
        f"{model_type} params={params} lora={lora}: {out.status}: {out.detail}")
    assert out.norm_err <= 1e-4 and out.grad_err <= 1e-4
    return out


@pytest.mark.parametrize("model_type", list(_cases()))
def test_family_exact_or_refused(model_type):
    variants = VARIANTS if model_type in FULL or model_type not in FAST else VARIANTS[:2]
    for params, lora in variants:
        _check(model_type, params, lora)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma"])
def test_tied_and_untied_heads(model_type):
    for tied in (True, False):
        _check(model_type, "all", False, tied=tied)


def test_scaled_embedding_is_exact_where_the_old_rule_was_wrong():
    """Gemma2's embedding multiplies the lookup by sqrt(d) inside its forward; tied to the head."""
    out = _check("gemma2", "all", False, tied=True)
    assert out.status == "exact"  # by the traced embedding rule, not the fallback


def test_every_family_is_enumerated():
    assert len(_TYPES) >= 40 and {"llama", "gpt2", "opt", "gemma2"} <= set(_TYPES)
