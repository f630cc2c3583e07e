"""Loss terms of the baselines, used by :class:`~gradsift.train.trainer.GradsiftTrainer`.

Every method shares one task loss: the mean over samples of the per-sample
token-mean cross-entropy on response tokens (the L_i of the gradient norms), so the
methods differ only in which data they train on or in the penalty they add.

- ``standard`` / ``clip``: the task loss (``clip`` sets ``max_grad_norm``).
- ``kl``: + beta * KL(p_theta || p_ref), token level on response tokens, against
  a frozen reference (the aligned stage-0 model).
- ``ewc``: + lambda/2 * sum_s sum_p F_s,p (theta_p - theta*_s,p)^2 with the diagonal
  Fisher F_s and parameters theta*_s recorded at the end of each stage s.
- ``olora``: + lambda * sum_layers sum_{earlier adapters} |A_new A_old^T|_1
  (entry-wise L1 norm), with the earlier adapters frozen and still active.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradsift.losses import causal_lm_losses, response_losses

IGNORE_INDEX = -100
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys a causal LM forward takes (drops ``labels``, ``row`` and other extras)."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool mask of the predicted positions whose target is a response token."""
    return labels[:, 1:] != IGNORE_INDEX


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_i: mean token cross-entropy over sample i's response tokens, in fp32, shape (B,).

    Logits at position t predict the label at t+1 (the usual causal shift). The same
    definition as the scoring engine's, so every method trains on the same loss.
    """
    return response_losses(logits, labels)


def response_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Number of response (loss) tokens per sample, shape (B,)."""
    return response_mask(labels).sum(1)


# --------------------------------------------------------------------------- KL


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over response tokens of KL(p_theta || p_ref), shape (B,)."""
    logp = F.log_softmax(logits[:, :-1, :].float(), dim=-1)
    logq = F.log_softmax(ref_logits[:, :-1, :].float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    mask = response_mask(labels)
    return (kl * mask).sum(1) / mask.sum(1).clamp_min(1)


class KLReference:
    """The frozen reference of the KL baseline: the aligned (stage-0) model.

    Either a separate frozen module, or (``module=None``) the trained PEFT model
    itself with its adapters disabled, which is the stage-0 model only while the
    base weights are unchanged (stage 1, or adapters continued across stages).
    """

    def __init__(self, module: nn.Module | None = None):
        self.module = module
        if module is not None:
            module.eval()
            module.requires_grad_(False)

    @torch.no_grad()
    def logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        inputs = model_inputs(batch)
        if self.module is not None:
            return self.module(**inputs).logits
        if not hasattr(model, "disable_adapter"):
            raise RuntimeError("KL reference: the model has no adapters to disable; pass a reference module")
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                return model(**inputs).logits
        finally:
            model.train(was_training)


# --------------------------------------------------------------------------- EWC


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def estimate_fisher(
    model: nn.Module,
    features: Sequence[dict[str, Any]],
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]],
    n_samples: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the trainable parameters: mean over samples of (grad L_i)^2.

    One backward per sample (batch size 1, dropout off), over the first
    ``n_samples`` features.
    """
    from tqdm.auto import tqdm

    params = trainable_parameters(model)
    if not params:
        raise RuntimeError("EWC: the model has no trainable parameters")
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    chosen = list(features[: max(1, n_samples)])
    device = device or next(iter(params.values())).device
    was_training = model.training
    model.eval()
    saved = {n: p.grad for n, p in params.items()}
    try:
        for feat in tqdm(chosen, desc="EWC Fisher", unit="sample", disable=not progress, leave=False):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate_fn([feat]).items()}
            for p in params.values():
                p.grad = None
            loss = causal_lm_losses(model, batch)[0].sum()
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2
    finally:
        for n, p in params.items():
            p.grad = saved[n]
        model.train(was_training)
    return {n: f / len(chosen) for n, f in fisher.items()}


class EWCState:
    """Fisher diagonals and anchor parameters of the completed stages."""

    def __init__(self) -> None:
        self.stages: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def add(self, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> None:
        missing = set(fisher) ^ set(anchor)
        if missing:
            raise ValueError(f"EWC: Fisher and anchor name different parameters: {sorted(missing)[:3]}")
        self.stages.append(
            ({n: f.detach().float().clone() for n, f in fisher.items()},
             {n: a.detach().float().clone() for n, a in anchor.items()})
        )

    def penalty(self, model: nn.Module, lam: float) -> torch.Tensor:
        """lambda/2 * sum over stages and parameters of F (theta - theta*)^2."""
        params = dict(model.named_parameters())
        device = next(iter(params.values())).device
        total = torch.zeros((), device=device, dtype=torch.float32)
        for fisher, anchor in self.stages:
            for name, f in fisher.items():
                p = params.get(name)
                if p is None:
                    raise KeyError(f"EWC: parameter {name!r} of an earlier stage is not in the model")
                diff = p.float() - anchor[name].to(p.device)
                total = total + (f.to(p.device) * diff * diff).sum()
        return 0.5 * lam * total

    def save(self, path: str | Path, index: int) -> None:
        """Save one stage's Fisher and anchor as safetensors."""
        from safetensors.torch import save_file

        fisher, anchor = self.stages[index]
        tensors = {f"fisher::{n}": t.contiguous().cpu() for n, t in fisher.items()}
        tensors.update({f"anchor::{n}": t.contiguous().cpu() for n, t in anchor.items()})
        save_file(tensors, str(path))

    def load_stage(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        fisher = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("fisher::")}
        anchor = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("anchor::")}
        self.add(fisher, anchor)


# --------------------------------------------------------------------------- O-LoRA


def lora_a_weights(model: nn.Module, adapter: str) -> Iterable[tuple[str, nn.Module, torch.Tensor]]:
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter in lora_a:
            yield name, module, lora_a[adapter].weight


def olora_penalty(model: nn.Module, new: str, old: Sequence[str], lam: float) -> torch.Tensor:
    """lambda * sum over LoRA layers and earlier adapters of sum |A_new A_old^T|."""
    total: torch.Tensor | None = None
    for _, module, a_new in lora_a_weights(model, new):
        for name in old:
            if name not in module.lora_A:
                continue
            a_old = module.lora_A[name].weight.detach()
            term = (a_new.float() @ a_old.float().T).abs().sum()
            total = term if total is None else total + term
    if total is None:
        device = next(model.parameters()).device
        return torch.zeros((), device=device)
    return lam * total
