"""The Hugging Face ``Trainer`` with online sample selection and the baselines' losses.

:class:`GradsiftTrainer` keeps all of the ``transformers.Trainer`` machinery
(optimizer, scheduler, gradient accumulation, mixed precision, accelerate,
logging, ``report_to``) and changes only what one training step computes:

- selection methods (``moderate``, ``high``, ``low``, ``random``): one forward of
  the whole batch through :class:`~gradsift.norms.GhostNormEngine`, the loss
  pre-filter, ONE backward of the survivors' losses that yields their exact G_i,
  the selection rule, and the kept samples' gradient assembled from that same
  pass (``accumulate_grad``; no second backward);
- ``standard`` / ``clip``: the mean over samples of the per-sample loss L_i;
- ``kl`` / ``ewc`` / ``olora``: that loss plus the method's penalty.

Under DDP the selection runs over the GLOBAL batch: L and G are all-gathered, every
rank picks the same kept set, adds its local kept rows' gradient scaled by
1/|global kept| and the trainable gradients are summed across ranks once per
optimizer step.

A drop-in for users with their own data: :class:`ModerateGiTrainer` (and
``ModerateGiSFTTrainer`` on ``trl.SFTTrainer`` when trl is installed). Their
batches must carry ``input_ids``, ``attention_mask`` and ``labels`` with -100 on
every non-response token.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback

from gradsift.losses import causal_lm_losses
from gradsift.train.baselines import (
    EWCState,
    KLReference,
    olora_penalty,
    response_lengths,
    token_kl,
)
from gradsift.train.config import METHODS, SELECTION_METHODS, MethodSettings

__all__ = [
    "GradsiftTrainer",
    "ModerateGiTrainer",
    "NonFiniteLossError",
    "JsonlLogCallback",
    "SelectionStepMixin",
]


class NonFiniteLossError(RuntimeError):
    """A NaN or infinite loss: training stops (completed stages are kept)."""


class JsonlLogCallback(TrainerCallback):
    """Append every ``Trainer`` log entry (one JSON object a line) to ``path``."""

    def __init__(self, path, extra: dict[str, Any] | None = None):
        self.path = path
        self.extra = dict(extra or {})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        import json

        row = {**self.extra, "step": state.global_step, **{k: _jsonable(v) for k, v in logs.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def _jsonable(v: Any) -> Any:
    if torch.is_tensor(v):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _resolve_method(method: str | MethodSettings, overrides: dict[str, Any]) -> MethodSettings:
    if isinstance(method, MethodSettings):
        settings = method.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    else:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        settings = MethodSettings(name=method, **{k: v for k, v in overrides.items() if v is not None})
    return settings


class SelectionStepMixin:
    """The online-selection training step; mix it before a ``transformers.Trainer`` subclass.

    Keyword arguments (besides the Trainer's own): ``method`` (a name or
    :class:`~gradsift.train.config.MethodSettings`), ``rho``, ``params``,
    ``prefilter``, ``selection_backward``, ``selection_seed``, ``stage_label``
    (named in error messages).
    """

    def __init__(
        self,
        *args,
        method: str | MethodSettings = "moderate",
        rho: float | None = None,
        params: str | None = None,
        prefilter: str | None = None,
        selection_backward: str | None = None,
        selection_seed: int = 0,
        stage_label: str | None = None,
        **kwargs,
    ):
        self.method = _resolve_method(
            method, {"rho": rho, "params": params, "prefilter": prefilter, "selection_backward": selection_backward}
        )
        self.stage_label = stage_label or "training"
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if self.method.name in SELECTION_METHODS and getattr(targs, "gradient_checkpointing", False):
            # the scoring pass reads every layer's input and output gradient; recomputed
            # (checkpointed) blocks would be captured twice. TRL's SFTConfig turns it on by default.
            import warnings

            warnings.warn(f"gradsift: method {self.method.name!r} needs every layer's activations in its scoring "
                          "pass; gradient checkpointing is turned off", stacklevel=2)
            targs.gradient_checkpointing = False
        self._selection_generator = torch.Generator().manual_seed(int(selection_seed))
        self._engine = None
        self._pending: list[dict[str, float]] = []
        self.selection_records: list[dict[str, Any]] = []
        super().__init__(*args, **kwargs)
        self.current_gradient_accumulation_steps = self.args.gradient_accumulation_steps  # set per step by train()
        # Our losses are per-batch means: the Trainer divides them by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False

    # ------------------------------------------------------------------ helpers
    @property
    def uses_selection(self) -> bool:
        return self.method.name in SELECTION_METHODS

    @property
    def shards_parameters(self) -> bool:
        """True under FSDP or DeepSpeed ZeRO-3: no process holds the whole model's weights."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        if kind == DistributedType.FSDP:
            return True
        if kind == DistributedType.DEEPSPEED:
            plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
            return getattr(plugin, "zero_stage", 3) == 3
        return False

    def _selection_backward_mode(self) -> str:
        mode = self.method.selection_backward
        if mode != "auto":
            return mode
        from accelerate.utils import DistributedType

        sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        return "recompute" if sharded else "reuse"

    def _get_engine(self, model: nn.Module):
        if self._engine is None:
            from gradsift.norms import GhostNormEngine

            self._engine = GhostNormEngine(model, params=self.method.params, keep_grads=True)
        return self._engine

    def close_engine(self) -> None:
        """Remove the scoring hooks (done automatically at the end of ``train``)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.close_engine()

    def _raise_non_finite(self, what: str, values: torch.Tensor, rows: torch.Tensor | None) -> None:
        bad = (~torch.isfinite(values)).nonzero().flatten()
        ids = rows[bad.to(rows.device)].tolist() if rows is not None else bad.tolist()
        label = "rows" if rows is not None else "batch positions"
        step = getattr(getattr(self, "state", None), "global_step", 0)
        raise NonFiniteLossError(
            f"{self.stage_label}: non-finite {what} at optimizer step {step} ({label} {ids[:10]}); "
            "training stopped, completed stages are kept"
        )

    def _gather_1d(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """All-gather a 1-D tensor whose length may differ across ranks; return it and this rank's offset."""
        world = self.accelerator.num_processes
        if world == 1:
            return t, 0
        size = torch.tensor([t.numel()], device=t.device, dtype=torch.long)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        counts = [int(s.item()) for s in sizes]
        padded = torch.zeros(max(counts), dtype=t.dtype, device=t.device)
        padded[: t.numel()] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        rank = self.accelerator.process_index
        return torch.cat([p[:c] for p, c in zip(parts, counts)]), sum(counts[:rank])

    def _all_reduce_trainable_grads(self, model: nn.Module) -> None:
        """Sum the trainable gradients across ranks (manual ``p.grad`` writes bypass the DDP reducer)."""
        for p in model.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    # ------------------------------------------------------------------ the step
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        if not self.uses_selection:
            return super().training_step(model, inputs, num_items_in_batch)
        return self._selection_step(model, inputs)

    def _select(self, G: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        from gradsift import select

        rule = {"moderate": select.moderate, "high": select.high, "low": select.low}[self.method.name]
        prefilter = None if self.method.prefilter == "none" else self.method.prefilter
        return rule(G, L, rho=self.method.rho, prefilter=prefilter)

    def _selection_step(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        from gradsift import select

        model.train()
        inputs = self._prepare_inputs(inputs)
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels") if k in inputs}
        rows = inputs.get("row")
        unwrapped = self.accelerator.unwrap_model(model)
        engine = self._get_engine(unwrapped)
        world = self.accelerator.num_processes
        ga = max(1, int(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)))
        mode = self._selection_backward_mode()
        prefilter = None if self.method.prefilter == "none" else self.method.prefilter
        try:
            if self.method.name == "random":
                # Random needs no score to choose: L of the batch from a gradient-free
                # forward (for the record), then the engine on the kept rows only.
                with torch.no_grad():
                    L_local = causal_lm_losses(unwrapped.eval(), batch)[0].float()
            else:
                L_local = engine.forward(batch).float()
            b = L_local.numel()
            L, offset = self._gather_1d(L_local)
            n = L.numel()
            rows_all = self._gather_1d(rows.to(L.device))[0] if torch.is_tensor(rows) else None
            if not bool(torch.isfinite(L).all()):
                self._raise_non_finite("loss", L, rows_all)

            if self.method.name == "random":
                k = select.n_keep(n, self.method.rho)
                kept = select.random_subset(n, k, self._selection_generator).to(L.device)
                scored = torch.zeros(n, dtype=torch.bool, device=L.device)
                scored[kept] = True
            elif prefilter is not None:
                scored = select.prefilter_mask(L, prefilter).to(L.device)
            else:
                scored = torch.ones(n, dtype=torch.bool, device=L.device)

            local_mask = scored[offset : offset + b]
            G_local = torch.zeros(b, dtype=torch.float32, device=L.device)
            if self.method.name == "random":
                # the kept rows alone go through the scoring pass (their G_i and gradient)
                local_rows = local_mask.nonzero().flatten()
                if local_rows.numel():
                    sub = {k: v[local_rows.to(v.device)] for k, v in batch.items()}
                    engine.forward(sub)
                    G_local[local_rows] = engine.backward().float().to(L.device)
            elif bool(local_mask.any()):
                G_local = engine.backward(local_mask).float()
            G, _ = self._gather_1d(G_local.to(L.device))
            if not bool(torch.isfinite(G).all()):
                self._raise_non_finite("gradient norm", G, rows_all)
            if self.method.name != "random":
                kept = self._select(G, L).to(L.device)

            in_local = (kept >= offset) & (kept < offset + b)
            kept_local = kept[in_local] - offset
            scale = 1.0 / (kept.numel() * ga)
            if mode == "reuse" and kept_local.numel():
                grad_scale = scale
                scaler = getattr(self.accelerator, "scaler", None)
                if scaler is not None:  # fp16: the optimizer unscales every gradient
                    grad_scale *= float(scaler.get_scale())
                # Random's engine pass held exactly the local kept rows (both ascending)
                index = torch.arange(kept_local.numel()) if self.method.name == "random" else kept_local
                engine.accumulate_grad(index, scale=grad_scale)
        finally:
            engine.clear()
            model.train()

        if mode == "recompute":
            self._recompute_backward(model, batch, kept_local, scale * world)
        elif world > 1 and self.accelerator.sync_gradients:
            self._all_reduce_trainable_grads(unwrapped)

        self._record_selection(G, L, kept, scored, batch["labels"], rows_all)
        return (L[kept].mean() / ga).detach().to(self.args.device)

    def _recompute_backward(self, model: nn.Module, batch: dict[str, Any], kept_local: torch.Tensor, scale: float):
        """A fresh forward/backward of the kept rows (sharded setups): every rank runs one."""
        empty = kept_local.numel() == 0
        index = kept_local if not empty else torch.zeros(1, dtype=torch.long, device=kept_local.device)
        sub = {k: v[index] for k, v in batch.items()}
        was_training = model.training
        model.eval()  # the same dropout-free pass the scores came from
        try:
            with self.compute_loss_context_manager():
                L, _ = causal_lm_losses(model, sub)
            loss = L.sum() * (0.0 if empty else scale)
            kwargs = {}
            from accelerate.utils import DistributedType

            if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
                kwargs["scale_wrt_gas"] = False
            self.accelerator.backward(loss, **kwargs)
        finally:
            model.train(was_training)

    def _record_selection(self, G, L, kept, scored, labels, rows_all) -> None:
        n = L.numel()
        kept_mask = torch.zeros(n, dtype=torch.bool, device=L.device)
        kept_mask[kept] = True
        lengths, _ = self._gather_1d(response_lengths(labels).to(L.device))
        dropped_scored = scored & ~kept_mask
        self._pending.append(
            {
                "kept_fraction": kept.numel() / n,
                "G_kept_mean": G[kept_mask].mean().item(),
                "G_dropped_mean": G[dropped_scored].mean().item() if bool(dropped_scored.any()) else float("nan"),
                "batch_loss": L.mean().item(),
                "kept_loss": L[kept_mask].mean().item(),
            }
        )
        if not self.is_world_process_zero():
            return
        step = int(self.state.global_step)
        G_c, L_c, k_c, s_c, len_c = (x.detach().cpu() for x in (G, L, kept_mask, scored, lengths))
        row_c = rows_all.detach().cpu() if rows_all is not None else None
        for i in range(n):
            self.selection_records.append(
                {
                    "step": step,
                    "row": int(row_c[i]) if row_c is not None else -1,
                    "G": float(G_c[i]) if bool(s_c[i]) else float("nan"),
                    "L": float(L_c[i]),
                    "scored": bool(s_c[i]),
                    "kept": bool(k_c[i]),
                    "response_len": int(len_c[i]),
                }
            )

    def selection_table(self):
        """Every scored sample of this run as a pandas DataFrame (step, row, G, L, scored, kept, response_len)."""
        import pandas as pd

        return pd.DataFrame(
            self.selection_records, columns=["step", "row", "G", "L", "scored", "kept", "response_len"]
        )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._pending and "loss" in logs:
            keys = dict.fromkeys(k for p in self._pending for k in p)
            for key in keys:
                vals = [p[key] for p in self._pending if key in p and math.isfinite(p[key])]
                logs[key] = sum(vals) / len(vals) if vals else float("nan")
            self._pending = []
        super().log(logs, *args, **kwargs)


class GradsiftTrainer(SelectionStepMixin, Trainer):
    """``transformers.Trainer`` for every gradsift method.

    Extra keyword arguments: those of :class:`SelectionStepMixin` and, for the
    baselines, ``kl_reference`` (:class:`~gradsift.train.baselines.KLReference`;
    default: the model with its adapters disabled), ``ewc_state``
    (:class:`~gradsift.train.baselines.EWCState`), ``olora_adapter`` (the adapter
    being trained) and ``olora_frozen`` (earlier adapters). ``kl_beta``,
    ``ewc_lambda`` and ``olora_lambda`` default to the method settings.
    """

    def __init__(
        self,
        *args,
        method: str | MethodSettings = "standard",
        kl_reference: KLReference | None = None,
        ewc_state: EWCState | None = None,
        olora_adapter: str | None = None,
        olora_frozen: list[str] | None = None,
        kl_beta: float | None = None,
        ewc_lambda: float | None = None,
        olora_lambda: float | None = None,
        **kwargs,
    ):
        overrides = {"kl_beta": kl_beta, "ewc_lambda": ewc_lambda, "olora_lambda": olora_lambda}
        if isinstance(method, str):
            method = _resolve_method(method, overrides)
        else:
            method = method.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        super().__init__(*args, method=method, **kwargs)
        self.kl_reference = kl_reference if kl_reference is not None else KLReference(None)
        self.ewc_state = ewc_state if ewc_state is not None else EWCState()
        self.olora_adapter = olora_adapter
        self.olora_frozen = list(olora_frozen or [])
        if self.method.name == "olora" and not self.olora_adapter:
            raise ValueError("method olora needs olora_adapter (the name of the adapter being trained)")
        if self.method.name == "clip" and self.args.max_grad_norm != self.method.clip_norm:
            raise ValueError(
                f"method clip: TrainingArguments.max_grad_norm is {self.args.max_grad_norm}, "
                f"expected method.clip_norm={self.method.clip_norm}"
            )

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Mean over samples of L_i, plus the method's penalty while training."""
        labels = inputs["labels"]
        # logits only where the loss reads them; the KL penalty compares whole distributions
        L, outputs = causal_lm_losses(model, inputs, trim=self.method.name != "kl")
        if not bool(torch.isfinite(L).all()):
            rows = inputs.get("row")
            self._raise_non_finite("loss", L.detach(), rows if torch.is_tensor(rows) else None)
        loss = L.mean()
        if model.training:
            unwrapped = self.accelerator.unwrap_model(model)
            name = self.method.name
            extra: dict[str, float] = {}
            if name == "kl" and self.method.kl_beta > 0:
                ref = self.kl_reference.logits(unwrapped, inputs)
                kl = token_kl(outputs.logits, ref, labels).mean()
                loss = loss + self.method.kl_beta * kl
                extra["kl"] = kl.item()
            elif name == "ewc" and self.ewc_state.stages:
                pen = self.ewc_state.penalty(unwrapped, self.method.ewc_lambda)
                loss = loss + pen
                extra["ewc_penalty"] = pen.item()
            elif name == "olora" and self.olora_frozen:
                pen = olora_penalty(unwrapped, self.olora_adapter, self.olora_frozen, self.method.olora_lambda)
                loss = loss + pen
                extra["olora_penalty"] = pen.item()
            extra["task_loss"] = L.mean().item()
            self._pending.append(extra)
        return (loss, outputs) if return_outputs else loss


class ModerateGiTrainer(GradsiftTrainer):
    """Drop-in ``Trainer`` that trains each batch on its Moderate-G_i samples only (Algorithm 1).

    Use it exactly like ``transformers.Trainer``; the batches must carry
    ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding).
    ``rho`` (0.2), ``params`` ("all"), ``prefilter`` ("mean_std") set the rule.
    """

    def __init__(self, *args, rho: float = 0.2, params: str = "all", prefilter: str = "mean_std", **kwargs):
        kwargs.pop("method", None)
        super().__init__(*args, method="moderate", rho=rho, params=params, prefilter=prefilter, **kwargs)


def _make_sft_trainer():
    try:
        from trl import SFTTrainer
    except ImportError as exc:
        raise ImportError("ModerateGiSFTTrainer needs trl: pip install trl") from exc

    class ModerateGiSFTTrainer(SelectionStepMixin, SFTTrainer):
        """``trl.SFTTrainer`` whose training step keeps only the Moderate-G_i samples of each batch.

        The SFT collator must produce ``labels`` with -100 outside the completion
        (``completion_only_loss`` / assistant-only loss) so that L_i is the response loss.
        """

        def __init__(self, *args, rho: float = 0.2, params: str = "all", prefilter: str = "mean_std", **kwargs):
            kwargs.pop("method", None)
            super().__init__(*args, method="moderate", rho=rho, params=params, prefilter=prefilter, **kwargs)

    return ModerateGiSFTTrainer


def __getattr__(name: str):
    if name == "ModerateGiSFTTrainer":
        cls = _make_sft_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
