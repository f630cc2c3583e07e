"""The Hugging Face ``Trainer`` with online sample selection and the baselines' losses.

:class:`GradsiftTrainer` keeps all of the ``transformers.Trainer`` machinery
(optimizer, scheduler, gradient accumulation, mixed precision, accelerate,
logging, ``report_to``) and changes only what one training step computes:

- selection methods (``moderate``, ``high``, ``low``, ``random``; the objects of
  :mod:`gradsift.select.methods`): the method's rule runs over the whole OPTIMIZER
  batch (every micro-batch of the accumulation window, on every process). Each
  micro-batch is scored as it comes (one forward and ONE backward through
  :class:`~gradsift.norms.GhostNormEngine`: its L_i and exact G_i); the last one
  pools the window's L and G, applies the loss pre-filter and the rule, and builds
  the kept samples' gradient: from the scoring pass itself when the window is one
  micro-batch, else from per-sample trainable gradients kept per micro-batch
  (LoRA) or a second forward/backward of the kept rows (full fine-tuning, sharded
  runs, dropout);
- ``standard`` / ``clip``: the mean over samples of the per-sample loss L_i (or
  the token mean, ``loss_reduction="token_mean"``);
- ``kl`` / ``ewc`` / ``olora``: that loss plus the method's penalty.

Under DDP L and G are all-gathered, every rank picks the same kept set, adds its
local kept rows' gradient and the trainable gradients are summed across ranks in
one flat collective per optimizer step.

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
from gradsift.select.methods import get_method
from gradsift.train.config import MethodSettings

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
        get_method(method)  # a one-line error for an unknown name
        settings = MethodSettings(name=method, **{k: v for k, v in overrides.items() if v is not None})
    return settings


class SelectionStepMixin:
    """The online-selection training step; mix it before a ``transformers.Trainer`` subclass.

    Keyword arguments (besides the Trainer's own): ``method`` (a name or
    :class:`~gradsift.train.config.MethodSettings`), ``rho``, ``params``,
    ``prefilter``, ``selection_backward``, ``selection_seed``, ``stage_label``
    (named in error messages), ``loss_reduction`` (``"sample_mean"``, the default:
    the mean over samples of their token-mean loss; or ``"token_mean"``: the mean over
    every response token of the optimizer batch, as ``transformers`` computes it).
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
        loss_reduction: str = "sample_mean",
        **kwargs,
    ):
        if loss_reduction not in ("sample_mean", "token_mean"):
            raise ValueError(f"loss_reduction must be 'sample_mean' or 'token_mean', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.method = _resolve_method(
            method, {"rho": rho, "params": params, "prefilter": prefilter, "selection_backward": selection_backward}
        )
        self.stage_label = stage_label or "training"
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        self.method_spec = get_method(self.method.name)
        if self.method_spec.selects and getattr(targs, "gradient_checkpointing", False):
            # the scoring pass reads every layer's input and output gradient; recomputed
            # (checkpointed) blocks would be captured twice. TRL's SFTConfig turns it on by default.
            import warnings

            warnings.warn(f"gradsift: method {self.method.name!r} needs every layer's activations in its scoring "
                          "pass; gradient checkpointing is turned off", stacklevel=2)
            targs.gradient_checkpointing = False
        self._selection_generator = torch.Generator().manual_seed(int(selection_seed))
        self._engine = None
        self._pending: list[dict[str, float]] = []
        self._window: list[dict[str, Any]] = []  # the scored micro-batches of the current optimizer batch
        self._pooled = 0
        self._strategy = "captures"
        self._has_dropout: bool | None = None
        self.selection_records: list[dict[str, Any]] = []
        super().__init__(*args, **kwargs)
        self.current_gradient_accumulation_steps = self.args.gradient_accumulation_steps  # set per step by train()
        # sample_mean: our losses are per-batch means, the Trainer divides them by the accumulation steps.
        # token_mean: the Trainer counts the optimizer batch's loss tokens (num_items_in_batch), we divide by it.
        token_mean = self.loss_reduction == "token_mean"
        self.loss_is_scaled_for_ga = token_mean
        self.model_accepts_loss_kwargs = token_mean

    # ------------------------------------------------------------------ helpers
    @property
    def uses_selection(self) -> bool:
        return self.method_spec.selects

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

    def _get_engine(self, model: nn.Module):
        if self._engine is None:
            from gradsift.norms import GhostNormEngine

            verify = self.method.verify
            if verify and self.shards_parameters:
                # the self-check's reference is a per-sample backward with whole weight gradients on
                # one process; with FSDP / ZeRO-3 no process holds them, so it cannot be formed here
                import warnings

                warnings.warn("gradsift: the first-batch norm self-check is skipped while the parameters are "
                              "sharded (FSDP / ZeRO-3); run it unsharded (e.g. `gradsift score`) to check "
                              "this model", stacklevel=2)
                verify = False
            self._engine = GhostNormEngine(model, params=self.method.params, keep_grads=True, verify=verify)
        return self._engine

    def close_engine(self) -> None:
        """Remove the scoring hooks (done automatically at the end of ``train``)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def train(self, *args, **kwargs):
        self._window, self._pooled = [], 0
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
        """Sum the trainable gradients across ranks in one flat collective (per dtype; manual
        ``p.grad`` writes bypass the DDP reducer)."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            grads = [p.grad for p in group]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)

    # ------------------------------------------------------------------ the step
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        if not self.uses_selection:
            return super().training_step(model, inputs, num_items_in_batch)
        return self._selection_step(model, inputs)

    def _trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """The trainable parameters, listed once per optimizer batch (a walk over every module)."""
        cached = getattr(self, "_trainable_cache", None)
        if cached is None or cached[0] is not model:
            cached = self._trainable_cache = (model, [p for p in model.parameters() if p.requires_grad])
        return cached[1]

    def _dropout_active(self, model: nn.Module) -> bool:
        """The model has dropout in training mode (LoRA dropout, or the model's own)."""
        if self._has_dropout is None:
            config = getattr(model, "config", None)
            own = any(float(getattr(config, k, 0) or 0) > 0 for k in ("attention_dropout", "hidden_dropout"))
            self._has_dropout = own or any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
        return self._has_dropout

    def _update_strategy(self, model: nn.Module, one_pass: bool) -> str:
        """How the kept samples' gradient is built for this optimizer batch.

        ``captures``: from the scoring pass's captures (one micro-batch, no second backward);
        ``per_sample``: per-sample trainable gradients kept for every micro-batch of the
        window, the kept ones summed at its end; ``recompute``: a second forward/backward
        of the kept rows at the end of the window.
        """
        mode = self.method.selection_backward
        several = not one_pass and self.method_spec.needs_scores
        if mode == "auto":
            from accelerate.utils import DistributedType

            sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
            if sharded or self._dropout_active(model) or (several and not self._rows_fit(model)):
                mode = "recompute"
            else:
                mode = "reuse"
        if mode == "recompute":
            return "recompute"
        return "per_sample" if several else "captures"

    def _rows_fit(self, model: nn.Module) -> bool:
        """Do the optimizer batch's per-sample trainable gradients (fp32, this process's rows) fit in
        ``reuse_memory_fraction`` of the device's memory?"""
        from gradsift.runtime import device_memory_bytes

        rows = self.args.per_device_train_batch_size * max(1, int(self.current_gradient_accumulation_steps))
        need = rows * sum(p.numel() for p in self._trainable(model)) * 4
        total = device_memory_bytes(self.args.device)
        return total is not None and need <= self.method.reuse_memory_fraction * total

    def _selection_step(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """One micro-batch of an optimizer batch: scored now, selected with the others at the window's end.

        The Trainer calls this once per micro-batch and sets ``sync_gradients`` on the
        last one of the accumulation window; that call pools the window's L and G (over
        every rank too), runs the method's rule over the whole optimizer batch and builds
        the kept samples' gradient.
        """
        model.train()
        inputs = self._prepare_inputs(inputs)
        _refuse_packed(inputs, self.stage_label)
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels") if k in inputs}
        rows = inputs.get("row")
        unwrapped = self.accelerator.unwrap_model(model)
        engine = self._get_engine(unwrapped)
        end = bool(self.accelerator.sync_gradients)
        if not self._window:
            self._trainable_cache = None
            self._strategy = self._update_strategy(unwrapped, one_pass=end)
            # the output gradients are kept only where the update is built from the captures
            engine.keep_grads = self._strategy != "recompute"
        try:
            self._score_micro_batch(engine, unwrapped, batch, rows)
            if not end:
                return torch.zeros((), device=self.args.device)
            return self._finish_window(model, unwrapped, engine)
        except BaseException:
            self._window = []
            raise
        finally:
            engine.clear()
            if not model.training:  # the engine scores in eval mode and restores the whole model
                model.train()

    def _score_micro_batch(self, engine, unwrapped: nn.Module, batch: dict[str, Any], rows) -> None:
        """L_i (and, for methods that need them, G_i) of one micro-batch, pooled over the ranks."""
        if self.method_spec.needs_scores:
            L_local = engine.forward(batch).float()
        else:  # no score needed to choose: L from a gradient-free forward, for the record
            with torch.no_grad():
                L_local = causal_lm_losses(unwrapped.eval(), batch)[0].float()
            unwrapped.train()
        L, offset = self._gather_1d(L_local)
        rows_all = self._gather_1d(rows.to(L.device))[0] if torch.is_tensor(rows) else None
        if not bool(torch.isfinite(L).all()):
            self._raise_non_finite("loss", L, rows_all)
        entry = {"batch": batch, "b": L_local.numel(), "n": L.numel(), "L": L, "rows": rows_all,
                 "offset": self._pooled + offset, "lengths": self._gather_1d(_loss_tokens(batch["labels"]).to(L.device))[0],
                 "response_len": self._gather_1d(response_lengths(batch["labels"]).to(L.device))[0]}
        if self.method_spec.needs_scores:
            G_local = engine.backward().float()  # every row: the pre-filter needs the whole optimizer batch
            G, _ = self._gather_1d(G_local.to(L.device))
            if not bool(torch.isfinite(G).all()):
                self._raise_non_finite("gradient norm", G, rows_all)
            entry["G"] = G
            if self._strategy == "per_sample":
                entry["grads"] = self._per_sample_grads(engine, unwrapped)
        self._pooled += entry["n"]
        self._window.append(entry)

    def _per_sample_grads(self, engine, model: nn.Module) -> dict[int, torch.Tensor]:
        """{id(p): (b, *p.shape) fp32}: each row's gradient of every trainable parameter (the LoRA factors'
        formed by the engine as their gradients arrived), kept until the window's end."""
        grads = engine.per_sample_grads(self._trainable(model))
        engine.clear()
        return grads

    def _weights(self, kept: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The weight of each kept sample's L_i in the update (they sum to 1)."""
        if self.loss_reduction == "token_mean":
            n = lengths[kept].to(torch.float64)
            return n / n.sum()
        return torch.full((kept.numel(),), 1.0 / kept.numel(), dtype=torch.float64, device=kept.device)

    def _finish_window(self, model: nn.Module, unwrapped: nn.Module, engine) -> torch.Tensor:
        window, self._window, self._pooled = self._window, [], 0
        spec = self.method_spec
        L = torch.cat([e["L"] for e in window])
        lengths = torch.cat([e["lengths"] for e in window])
        rows_all = torch.cat([e["rows"] for e in window]) if all(e["rows"] is not None for e in window) else None
        n = L.numel()
        prefilter = self.method.prefilter
        G = torch.cat([e["G"] for e in window]) if spec.needs_scores else None
        kept, scored = spec.choose(n, G, L, self.method.rho, prefilter, self._selection_generator)
        kept = kept.to(L.device)
        weight = torch.zeros(n, dtype=torch.float64, device=L.device)
        weight[kept] = self._weights(kept, lengths)
        # this rank's kept rows, per micro-batch of the window: (entry, local positions, weights)
        local = []
        for e in window:
            pos = torch.arange(e["offset"], e["offset"] + e["b"], device=L.device)
            idx = (weight[pos] > 0).nonzero().flatten()
            local.append((e, idx, weight[pos][idx]))
        if not spec.needs_scores:
            G = self._score_kept(engine, local, L.device)
            if not bool(torch.isfinite(G).all()):
                self._raise_non_finite("gradient norm", G, rows_all)
        grad_scale = 1.0
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:  # fp16: the optimizer unscales every gradient
            grad_scale = float(scaler.get_scale())
        if self._strategy == "captures" and spec.needs_scores:
            _, idx, w = local[0]
            _accumulate_weighted(engine, idx, w, grad_scale)
        elif self._strategy == "per_sample":
            self._add_per_sample(unwrapped, local, grad_scale)
        elif self._strategy == "recompute":
            self._recompute_backward(model, unwrapped, local)
        if self.accelerator.num_processes > 1 and not (self._strategy == "recompute" and self._reduces_itself()):
            self._all_reduce_trainable_grads(unwrapped)  # one flat collective per optimizer step
        self._record_selection(G, L, kept, scored, torch.cat([e["response_len"] for e in window]), rows_all)
        return (L[kept].double() * weight[kept]).sum().float().detach().to(self.args.device)

    def _reduces_itself(self) -> bool:
        """True when a backward through the wrapped model reduces the gradients (FSDP, DeepSpeed)."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def _score_kept(self, engine, local, device) -> torch.Tensor:
        """Methods that choose without scores: one scoring pass over the kept rows (chunked by micro-batch)
        gives their G_i and, unless recomputed, their gradient; returns the pooled G (0 elsewhere)."""
        chunk = max(1, self.args.per_device_train_batch_size)
        parts = [torch.zeros(e["b"], dtype=torch.float32, device=device) for e, _, _ in local]
        for sub, where, w in _kept_chunks(local, chunk):
            engine.forward(sub)
            G_sub = engine.backward().float().to(device)
            for k, (j, i) in enumerate(where):
                parts[j][i] = G_sub[k]
            if self._strategy != "recompute":
                scaler = getattr(self.accelerator, "scaler", None)
                scale = float(scaler.get_scale()) if scaler is not None else 1.0
                _accumulate_weighted(engine, torch.arange(len(where)), w, scale)
            engine.clear()
        return torch.cat([self._gather_1d(p)[0] for p in parts])

    def _add_per_sample(self, model: nn.Module, local, grad_scale: float) -> None:
        """Add sum_i w_i grad L_i over the window's kept rows, from the per-sample gradients kept per micro-batch."""
        for p in self._trainable(model):
            total = None
            for e, idx, w in local:
                rows = e["grads"].get(id(p))
                if rows is None or not idx.numel():
                    continue
                part = torch.tensordot(w.to(rows.device, torch.float32), rows[idx.to(rows.device)], dims=1)
                total = part if total is None else total + part
            if total is None:
                continue
            g = (total * grad_scale).to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        for e, _, _ in local:
            e["grads"] = None

    def _recompute_backward(self, model: nn.Module, unwrapped: nn.Module, local) -> None:
        """A fresh forward/backward of the kept rows, chunked by the micro-batch size.

        Sharded setups (FSDP, DeepSpeed) run it through the wrapped model, every rank the
        same number of chunks (a rank without kept rows backpropagates a zero loss), and
        their reducers average over the ranks, hence the factor ``world``. Under DDP the
        bare module runs it without the reducer and the gradients are summed in one flat
        collective afterwards. With dropout in the model the pass runs in training mode, so
        the update sees the same dropout as every other method.
        """
        from accelerate.utils import DistributedType

        chunk = max(1, self.args.per_device_train_batch_size)
        chunks = list(_kept_chunks(local, chunk))
        sharded = self._reduces_itself()
        world = self.accelerator.num_processes
        n_chunks = len(chunks)
        if sharded and world > 1:
            count = torch.tensor([n_chunks], device=self.args.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            n_chunks = int(count.item())
        target = model if sharded else unwrapped
        was_training = target.training
        target.train(self._dropout_active(unwrapped))  # dropout only where the model has it
        kwargs = {}
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            kwargs["scale_wrt_gas"] = False
        state = self.accelerator.gradient_state
        sync = state.sync_gradients
        import contextlib

        no_sync = (self.accelerator.no_sync(model) if (world > 1 and not sharded and model is not unwrapped)
                   else contextlib.nullcontext())
        try:
            with no_sync:
                for c in range(n_chunks):
                    if c < len(chunks):
                        sub, _, w = chunks[c]
                        factor = w.to(self.args.device, torch.float32) * (world if sharded else 1)
                    else:  # this rank has no kept row left: take part with a zero loss
                        e = next((e for e, _, _ in local), None)
                        sub = {k: v[:1] for k, v in e["batch"].items()}
                        factor = torch.zeros(1, device=self.args.device)
                    state._set_sync_gradients(sync and c == n_chunks - 1)
                    with self.compute_loss_context_manager():
                        L, _ = causal_lm_losses(target, sub)
                    loss = (L * factor.to(L.device)).sum()
                    if sharded:
                        self.accelerator.backward(loss, **kwargs)
                    else:
                        scaler = getattr(self.accelerator, "scaler", None)
                        (scaler.scale(loss) if scaler is not None else loss).backward()
        finally:
            state._set_sync_gradients(sync)
            target.train(was_training)

    def _record_selection(self, G, L, kept, scored, lengths, rows_all) -> None:
        n = L.numel()
        kept_mask = torch.zeros(n, dtype=torch.bool, device=L.device)
        kept_mask[kept] = True
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


def _loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that L_i averages over, per sample: the shifted labels that are not -100."""
    return (labels[:, 1:] != -100).sum(dim=1)


def _accumulate_weighted(engine, idx: torch.Tensor, w: torch.Tensor, scale: float) -> None:
    """``sum_i w_i grad L_i`` over ``idx`` from the engine's captures (one call per distinct weight)."""
    if idx.numel() == 0:
        return
    w = w.to(idx.device)
    for value in torch.unique(w):
        engine.accumulate_grad(idx[w == value], scale=float(value) * scale)


def _refuse_packed(inputs: dict[str, Any], label: str) -> None:
    """Selection trains on whole samples, one per row: a packed or padding-free batch is refused.

    The scorer can score packed rows per packed sample, but the training step selects and
    updates rows; scoring a packed row as one sample would silently select the wrong thing.
    """
    from gradsift.norms.packing import segment_starts

    if inputs.get("labels") is None or inputs.get("input_ids") is None:
        return
    starts, _ = segment_starts(inputs)
    if starts is not None:
        raise ValueError(
            f"{label}: the batch packs several samples into one row (position_ids that restart, cu_seq_lens or "
            "seq_idx); selection methods need one sample per row: turn packing / padding_free off"
        )


def _kept_chunks(local, chunk: int):
    """The kept rows of a window, ``chunk`` at a time: (batch, [(micro-batch, row)], weights).

    Rows of different micro-batches are right-padded to a common length (padding is
    masked and labelled -100, so it changes no loss and no gradient).
    """
    items = [(j, int(i), w) for j, (_, idx, ws) in enumerate(local) for i, w in zip(idx.tolist(), ws)]
    keys = ("input_ids", "attention_mask", "labels")
    pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    for s in range(0, len(items), chunk):
        part = items[s : s + chunk]
        batches = [local[j][0]["batch"] for j, _, _ in part]
        T = max(b["input_ids"].shape[1] for b in batches)
        sub = {}
        for k in keys:
            if k not in batches[0]:
                continue
            rows = []
            for (j, i, _), b in zip(part, batches):
                row = b[k][i]
                if row.shape[0] < T:
                    row = torch.cat([row, row.new_full((T - row.shape[0],), pad[k])])
                rows.append(row)
            sub[k] = torch.stack(rows)
        yield sub, [(j, i) for j, i, _ in part], torch.stack([w for _, _, w in part])


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
        if self.loss_reduction == "token_mean":
            tokens = _loss_tokens(labels).to(L.device)
            if num_items_in_batch is None:  # called on its own: the token mean of this batch
                loss = (L * tokens).sum() / tokens.sum()
            else:  # the Trainer's count over the optimizer batch (and the processes, like transformers)
                loss = (L * tokens).sum() / num_items_in_batch
                if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    loss = loss * self.accelerator.num_processes
        else:
            loss = L.mean()
        # a penalty counts once per optimizer step; with token_mean the Trainer does not divide by the accumulation
        pen_scale = 1.0
        if self.loss_reduction == "token_mean" and num_items_in_batch is not None:
            pen_scale = 1.0 / max(1, int(self.current_gradient_accumulation_steps))
        if model.training:
            unwrapped = self.accelerator.unwrap_model(model)
            name = self.method.name
            extra: dict[str, float] = {}
            if name == "kl" and self.method.kl_beta > 0:
                ref = self.kl_reference.logits(unwrapped, inputs)
                kl = token_kl(outputs.logits, ref, labels).mean()
                loss = loss + pen_scale * self.method.kl_beta * kl
                extra["kl"] = kl.item()
            elif name == "ewc" and self.ewc_state.stages:
                pen = self.ewc_state.penalty(unwrapped, self.method.ewc_lambda)
                loss = loss + pen_scale * pen
                extra["ewc_penalty"] = pen.item()
            elif name == "olora" and self.olora_frozen:
                pen = olora_penalty(unwrapped, self.olora_adapter, self.olora_frozen, self.method.olora_lambda)
                loss = loss + pen_scale * pen
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
