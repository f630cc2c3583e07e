"""The first-batch self-check: the engine's norms, group by group, against the per-sample loop.

Tests cover the layer types and model families that were foreseen; a model a user
brings may hold a layer whose forward does something no rule assumes. With
``GhostNormEngine(..., verify=True)`` (on by default in ``gradsift score`` and in
training runs with a selection method) the first backward pass is checked: for
two samples of the batch (the longest and the shortest scored one), the squared
gradient norm of every parameter group of the engine (each rule and module class:
the embedding, every layer type, the tied head, the per-sample fallback) is
compared with the same sum of squares from a batch-size-1 backward of that sample
over the same parameters, in the model's own dtype (fp16 with the same loss
scale). For an engine that keeps gradients, the summed gradient it would
accumulate for both samples is compared with theirs as well. A mismatch beyond
the dtype's tolerance raises :class:`NormCheckError` naming the group, the module
class and the relative error, before any score or training step is written.

Cost: two batch-size-1 forward and backward passes with weight gradients, once.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from gradsift.norms.reference import per_sample_grads

# Relative tolerance on a group's squared norm, and the fraction of the sample's
# total squared norm under which a group's own error is not judged on its own
# (a group that holds 1e-7 of the norm carries rounding noise of its own size).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-8, 1e-12),
    torch.float32: (1e-4, 1e-7),
    torch.float16: (2e-2, 1e-3),
    torch.bfloat16: (3e-2, 1e-3),
}

FALLBACK = "parameters without a rule (per-sample fallback)"

# The kept gradient (keep_grads engines) is checked when the trainable parameters hold
# at most this many elements (LoRA, or full fine-tuning of a small model): the check
# keeps one float32 copy of their gradient.
KEPT_CHECK_MAX_NUMEL = 2**28


class NormCheckError(ValueError):
    """The engine's per-sample norms disagree with the per-sample loop on the first batch."""


@dataclass
class _Kind:
    label: str  # e.g. "LinearRule on Linear"
    module_class: str
    modules: list[str]  # module names
    param_ids: set[int]


def _group_parameters(group, named: dict[nn.Module, str]) -> tuple[list[nn.Module], set[int]]:
    own = getattr(group, "parameters", None)
    mods = list(getattr(group, "modules", []))
    if callable(own):
        return mods, {id(p) for p in own()}
    names = getattr(group, "names", set())
    ids = set()
    for m in mods:
        for n in names:
            p = m._parameters.get(n)
            if p is not None:
                ids.add(id(p))
    return mods, ids


def _kind_label(group, mods: list[nn.Module]) -> tuple[str, str]:
    classes = " + ".join(dict.fromkeys(type(m).__name__ for m in mods)) or "?"
    rule = getattr(group, "rule", None)
    if rule is None:  # a group of several rules (the tied head and embedding)
        parts = [type(r).__name__ for r in (getattr(group, "head", None), getattr(group, "emb", None)) if r is not None]
        name = type(group).__name__.lstrip("_")
        if name == "TiedGroup":
            name = "tied head and input embedding"
        return f"{name} ({' + '.join(parts) or classes})", classes
    return type(rule).__name__, classes


@contextmanager
def recording(engine):
    """Record every group's squared norms (B,) as the engine adds them up, keyed by group."""
    record: dict[int, torch.Tensor] = defaultdict(lambda: 0)
    wrapped = []
    for g in engine.groups:
        orig = g.sq_norms

        def rec(batch_size, *args, _orig=orig, _g=g, **kwargs):
            out = _orig(batch_size, *args, **kwargs)
            record[id(_g)] = record[id(_g)] + out.detach().double().cpu()
            return out

        g.sq_norms = rec  # instance attribute: shadows the method while checking
        wrapped.append(g)
    try:
        yield record
    finally:
        for g in wrapped:
            g.__dict__.pop("sq_norms", None)


def pick_samples(batch: dict[str, torch.Tensor], mask: torch.Tensor, n: int = 2) -> list[int]:
    """The longest and the shortest scored samples (padding and length both exercised)."""
    idx = mask.nonzero().flatten().cpu()
    if idx.numel() == 0:
        return []
    am = batch.get("attention_mask")
    lengths = am.sum(1).cpu()[idx] if am is not None else torch.full((idx.numel(),), batch["input_ids"].shape[1])
    order = torch.argsort(lengths, stable=True)
    picked = [int(idx[order[-1]])]
    if n > 1 and idx.numel() > 1:
        picked.append(int(idx[order[0]]))
    return picked


def compute_dtype(engine) -> torch.dtype:
    roots = getattr(engine, "_roots", None)
    for p in engine.model.parameters():
        if p.is_floating_point():
            return p.dtype
    return roots[0].dtype if roots else torch.float32


def check_first_batch(engine, batch: dict[str, torch.Tensor], mask: torch.Tensor, group_sq: dict[int, torch.Tensor],
                      total_sq: torch.Tensor, dtype: torch.dtype, loss_scale: float = 1.0) -> float:
    """Compare the engine's last backward with the per-sample loop; raise NormCheckError on a mismatch.

    ``group_sq`` holds each group's squared norms (B,) of that backward (unscaled),
    keyed by ``id(group)``, and the fallback's under ``"fallback"``; ``total_sq`` the
    engine's total (B,). Returns the seconds the check took.
    """
    t0 = time.perf_counter()
    samples = pick_samples(batch, mask)
    if not samples:
        return 0.0
    model = engine.model
    named_modules = {m: n for n, m in model.named_modules()}
    named_params = dict(model.named_parameters())
    target = [p for p in named_params.values() if id(p) in engine.target]
    kinds: dict[str, _Kind] = {}
    kind_of_group: dict[int, str] = {}
    covered: set[int] = set()
    module_of_group: dict[int, str] = {}
    for g in engine.groups:
        mods, pids = _group_parameters(g, named_modules)
        pids &= engine.target
        if not pids:
            continue
        label, cls = _kind_label(g, mods)
        key = f"{label} on {cls}"
        k = kinds.setdefault(key, _Kind(label, cls, [], set()))
        k.modules.append(named_modules.get(mods[0], "?") if mods else "?")
        k.param_ids |= pids
        kind_of_group[id(g)] = key
        module_of_group[id(g)] = named_modules.get(mods[0], "?") if mods else "?"
        covered |= pids
    rest = {id(p) for p in target} - covered
    if rest:
        names = [n for n, p in named_params.items() if id(p) in rest]
        kinds[FALLBACK] = _Kind(FALLBACK, "parameters", names, rest)
    tol, floor = TOLERANCES.get(dtype, TOLERANCES[torch.float32])

    trainable = [p for p in target if id(p) in engine.trainable_ids] if engine.keep_grads else []
    if sum(p.numel() for p in trainable) > KEPT_CHECK_MAX_NUMEL:
        trainable = []  # full fine-tuning of a large model: the kept-gradient check would cost a gradient copy
    ref_sum = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in trainable}
    from gradsift.norms.engine import _eager

    for i in samples:
        with _eager(model):  # as the engine ran it (compiled submodules eagerly)
            grads, _, s = per_sample_grads(model, batch, i, target, trim=False, loss_scale=loss_scale)
        ref_sq = {id(p): (g.double().pow(2).sum() / s**2 if g is not None else torch.zeros((), dtype=torch.float64))
                  for p, g in zip(target, grads)}
        for p, g in zip(target, grads):
            if id(p) in ref_sum and g is not None:
                ref_sum[id(p)] += g.float() / s
        del grads
        ref_total = float(sum(v.cpu() for v in ref_sq.values()))
        eng_total = float(total_sq[i])
        if not (torch.isfinite(torch.tensor(ref_total)) and torch.isfinite(torch.tensor(eng_total))):
            if torch.isfinite(torch.tensor(ref_total)) != torch.isfinite(torch.tensor(eng_total)):
                raise NormCheckError(
                    f"per-sample norm self-check failed: sample {i} of the first batch has squared gradient norm "
                    f"{eng_total:.4g} from the engine and {ref_total:.4g} from the per-sample loop"
                )
            continue
        # per kind: the engine's groups of that kind vs the same parameters in the loop
        eng_kind: dict[str, float] = defaultdict(float)
        worst_module: dict[str, tuple[float, str]] = {}
        for g in engine.groups:
            key = kind_of_group.get(id(g))
            if key is None:
                continue
            e = float(group_sq[id(g)][i]) if id(g) in group_sq else 0.0
            eng_kind[key] += e
            _, pids = _group_parameters(g, named_modules)
            r = float(sum(ref_sq[p].cpu() for p in pids & engine.target if p in ref_sq))
            err = abs(e - r) / max(abs(r), floor * ref_total, 1e-30)
            if key not in worst_module or err > worst_module[key][0]:
                worst_module[key] = (err, module_of_group[id(g)])
        if FALLBACK in kinds:
            eng_kind[FALLBACK] = float(group_sq["fallback"][i]) if "fallback" in group_sq else 0.0
        for key, k in kinds.items():
            r = float(sum(ref_sq[p].cpu() for p in k.param_ids if p in ref_sq))
            e = eng_kind.get(key, 0.0)
            err = abs(e - r) / max(abs(r), floor * ref_total, 1e-30)
            if not err <= tol:
                where = k.modules[0] if k.modules else "?"
                if key in worst_module:
                    where = worst_module[key][1]
                more = f" and {len(k.modules) - 1} more" if len(k.modules) > 1 else ""
                raise NormCheckError(
                    f"per-sample norm self-check failed on the first batch: parameter group '{k.label}' "
                    f"(module class {k.module_class}: {where}{more}) gives sample {i} a squared gradient norm of "
                    f"{e:.6g} where the per-sample loop gives {r:.6g} (relative error {err:.1e} > {tol:.0e} for "
                    f"{str(dtype).replace('torch.', '')}); stopped before any score or training step"
                )
    if trainable:
        _check_accumulated(engine, samples, trainable, ref_sum, kinds, named_params, tol, dtype)
    return time.perf_counter() - t0


def _check_accumulated(engine, samples, trainable, ref_sum, kinds, named_params, tol, dtype) -> None:
    """engine.accumulate_grad(samples) against the sum of their per-sample gradients, per group."""
    saved = [(p, p.grad) for p in trainable]
    try:
        for p in trainable:
            p.grad = None
        engine.accumulate_grad(torch.tensor(samples), scale=1.0)
        names = {id(p): n for n, p in named_params.items()}
        for key, k in kinds.items():
            ps = [p for p in trainable if id(p) in k.param_ids]
            if not ps:
                continue
            diff = sum(float(((p.grad.float() if p.grad is not None else 0) - ref_sum[id(p)]).double().pow(2).sum())
                       for p in ps)
            ref = sum(float(ref_sum[id(p)].double().pow(2).sum()) for p in ps)
            total = sum(float(v.double().pow(2).sum()) for v in ref_sum.values())
            err = (diff / max(ref, 1e-3 * total, 1e-30)) ** 0.5
            if not err <= tol:
                worst = max(ps, key=lambda p: float(((p.grad.float() if p.grad is not None else 0)
                                                     - ref_sum[id(p)]).double().pow(2).sum()))
                raise NormCheckError(
                    f"per-sample norm self-check failed on the first batch: the kept gradient of parameter group "
                    f"'{k.label}' (module class {k.module_class}: {names.get(id(worst), '?')}) is {err:.1e} "
                    f"(relative) away from the per-sample loop's (tolerance {tol:.0e} for "
                    f"{str(dtype).replace('torch.', '')}); stopped before any training step"
                )
    finally:
        for p, g in saved:
            p.grad = g
