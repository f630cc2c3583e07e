"""The update's direction: cosine between a stage's weight update and the alignment direction.

For a run's checkpoints theta_0 (aligned), theta_1, ..., theta_K, the update of
stage k is ``u_k = theta_k - theta_{k-1}`` (with LoRA and merged adapters: stage k's
merged delta ``scale * B @ A`` in each adapted matrix, zero elsewhere; with full
fine-tuning the whole change). The alignment direction is
``a = theta_pretrained - theta_aligned``, the way back to the model before
alignment; for a shipped organism it is minus its merged alignment adapter. A
positive cosine means the update moves the weights back toward the pretrained
model (elastic reversion); zero, an unrelated direction.

Measured per checkpoint (every stage k >= 1 of every method and seed):

* ``whole``: cos(u, a) over every parameter of the model;
* per tensor and per block (``model.layers.<i>``; the embeddings and the final
  norm are blocks of their own): cos(u_L, a_L) over the block's parameters;
* ``topk_layers``: cos over the concatenation of the k parameter tensors whose
  update is largest (Frobenius norm of u), default k = 10;
* ``topk_coords``: cos over the k coordinates with the largest |u|, default 1%
  of all coordinates (the "top-k" of the paper, whose exact choice is not
  published: both are offered);
* ``cumulative``: the same whole-model cosine for theta_k - theta_0.

A scale for "unrelated": two independent random directions in D dimensions have
a cosine of about N(0, 1/D); the update and ``a`` are both concentrated in the
adapted matrices, so the smaller of their supports is the relevant D.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["alignment_direction", "block_name", "cosine", "direction_rows", "direction_study", "state_delta",
           "topk_coordinate_cosine", "topk_layer_cosine"]

DIRECTION_FILE = "direction.csv"
LAYERS_FILE = "direction_layers.csv"
_BLOCK = re.compile(r"^(.*?layers\.\d+)\.")


def state_delta(after: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``after - before`` for every floating-point tensor the two share (float32)."""
    missing = [k for k in before if k not in after]
    if missing:
        raise KeyError(f"the two states do not match: {len(missing)} parameters missing, e.g. {missing[0]!r}")
    out = {}
    for name, b in before.items():
        a = after[name]
        if not torch.is_floating_point(b):
            continue
        if a.shape != b.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} after, {tuple(b.shape)} before")
        out[name] = a.detach().float() - b.detach().float()
    return out


def _dedup_state(model) -> dict[str, torch.Tensor]:
    """The model's parameters once each (tied weights under their first name), detached, on the CPU."""
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters(remove_duplicate=True)}


def alignment_direction(pretrained, aligned) -> dict[str, torch.Tensor]:
    """``theta_pretrained - theta_aligned`` per parameter (models or state dicts)."""
    pre = pretrained if isinstance(pretrained, Mapping) else _dedup_state(pretrained)
    ali = aligned if isinstance(aligned, Mapping) else _dedup_state(aligned)
    return state_delta(pre, {k: v for k, v in ali.items() if k in pre})


def cosine(u: Sequence[torch.Tensor] | torch.Tensor, a: Sequence[torch.Tensor] | torch.Tensor) -> float:
    """cos(u, a) of two vectors given as one tensor or as matching lists of tensors (NaN for a zero side)."""
    us = [u] if isinstance(u, torch.Tensor) else list(u)
    as_ = [a] if isinstance(a, torch.Tensor) else list(a)
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(us, as_, strict=True))
    nu = math.sqrt(sum(float(x.double().pow(2).sum()) for x in us))
    na = math.sqrt(sum(float(y.double().pow(2).sum()) for y in as_))
    if nu == 0 or na == 0:
        return math.nan
    return dot / (nu * na)


def block_name(param: str) -> str:
    """The block a parameter belongs to: ``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``."""
    m = _BLOCK.match(param)
    return m.group(1) if m else param.rsplit(".", 1)[0]


def topk_layer_cosine(u: Mapping[str, torch.Tensor], a: Mapping[str, torch.Tensor], k: int) -> float:
    """cos(u, a) over the ``k`` parameter tensors with the largest update norm ||u_p||."""
    names = sorted(u, key=lambda n: -float(u[n].norm()))[:max(1, k)]
    return cosine([u[n] for n in names], [a[n] for n in names])


def topk_coordinate_cosine(u: Mapping[str, torch.Tensor], a: Mapping[str, torch.Tensor], k: int) -> float:
    """cos(u, a) over the ``k`` coordinates with the largest |u| (ties: any of them)."""
    names = list(u)
    uf = torch.cat([u[n].flatten() for n in names])
    af = torch.cat([a[n].flatten() for n in names])
    k = max(1, min(int(k), uf.numel()))
    idx = torch.topk(uf.abs(), k, sorted=False).indices
    return cosine(uf[idx], af[idx])


def direction_rows(u: Mapping[str, torch.Tensor], a: Mapping[str, torch.Tensor], top_k_layers: int = 10,
                   top_frac: float = 0.01) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The summary cosines of one update and its per-block rows (see the module docstring)."""
    names = [n for n in u if n in a]
    if not names:
        raise ValueError("the update and the alignment direction share no parameter")
    u = {n: u[n] for n in names}
    a = {n: a[n] for n in names}
    n_coords = sum(t.numel() for t in u.values())
    summary = {
        "whole": cosine(list(u.values()), list(a.values())),
        "topk_layers": topk_layer_cosine(u, a, top_k_layers),
        "topk_coords": topk_coordinate_cosine(u, a, max(1, round(top_frac * n_coords))),
        "update_norm": math.sqrt(sum(float(t.double().pow(2).sum()) for t in u.values())),
        "alignment_norm": math.sqrt(sum(float(t.double().pow(2).sum()) for t in a.values())),
    }
    blocks: dict[str, list[str]] = {}
    for n in names:
        blocks.setdefault(block_name(n), []).append(n)
    rows = []
    for b, members in blocks.items():
        un = math.sqrt(sum(float(u[n].double().pow(2).sum()) for n in members))
        rows.append({"block": b, "cosine": cosine([u[n] for n in members], [a[n] for n in members]),
                     "update_norm": un})
    return summary, rows


def direction_study(run_dir: str | Path, *, pretrained: str | None = None, top_k_layers: int = 10,
                    top_frac: float = 0.01, runs: Sequence[str] | None = None, progress: bool = True, models=None):
    """Update-vs-alignment cosines of every stage of ``run_dir``.

    Writes ``analysis/mechanism/direction.csv`` (one row per run and stage k >= 1:
    ``whole``, ``topk_layers``, ``topk_coords``, ``cumulative``, norms) and
    ``direction_layers.csv`` (one row per run, stage and block). Returns both DataFrames.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from gradsift.analysis.drift import RunModels, _update_meta, mechanism_dir

    t0 = time.time()
    rm = models or RunModels(run_dir, pretrained)
    aligned = _dedup_state(rm.aligned())
    a = alignment_direction(rm.pretrained(), aligned)
    if all(float(t.abs().max()) == 0 for t in a.values()):
        raise ValueError(f"the pretrained model {rm.pretrained_name()!r} equals the aligned one: no alignment direction")
    out_dir = mechanism_dir(rm.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_rows, layer_rows = [], []
    ckpts = [c for c in rm.checkpoints(runs) if c.stage >= 1]
    if not ckpts:
        raise FileNotFoundError(f"{rm.path}: no finished training stage (stage_k/DONE, k >= 1)")
    prev: dict[str, torch.Tensor] | None = None
    prev_key: tuple[str, int] | None = None
    for ck in tqdm(ckpts, desc="direction", disable=not progress):
        state = _dedup_state(rm.load(ck))
        before = prev if prev_key == (ck.run, ck.stage - 1) else (
            aligned if ck.stage == 1 else _dedup_state(rm.load(type(ck)(ck.run, ck.method, ck.seed, ck.stage - 1))))
        u = state_delta(state, before)
        summary, blocks = direction_rows(u, a, top_k_layers, top_frac)
        summary["cumulative"] = cosine(*zip(*[(state[n] - aligned[n], a[n]) for n in a]))
        key = {"run": ck.run, "method": ck.method, "seed": ck.seed, "stage": ck.stage}
        summary_rows.append({**key, **summary})
        layer_rows += [{**key, **r} for r in blocks]
        prev, prev_key = state, (ck.run, ck.stage)
    summary_df, layers_df = pd.DataFrame(summary_rows), pd.DataFrame(layer_rows)
    summary_df.to_csv(out_dir / DIRECTION_FILE, index=False)
    layers_df.to_csv(out_dir / LAYERS_FILE, index=False)
    _update_meta(out_dir, "direction", {"pretrained": rm.pretrained_name(), "top_k_layers": top_k_layers,
                                        "top_frac": top_frac, "checkpoints": len(ckpts), "seconds": time.time() - t0})
    return summary_df, layers_df
