"""Exact per-sample gradient norms of a causal LM in one forward and one backward pass.

For a batch of B samples, L_i is the mean token cross-entropy over sample i's
response tokens (labels != -100, shifted as causal LMs are). The engine
backpropagates sum_i L_i once, with every parameter frozen so that autograd
computes activation gradients only, captures each layer's input and output
gradient through hooks, and turns them into ||grad_theta L_i||^2 with the layer's
rule (see ``gradsift.norms.rules``). Parameters that no rule covers are handled by
an exact per-sample fallback (one extra backward per sample, for those
parameters only) and named in a warning, or rejected with ``strict=True``.

Tied input/output embeddings (SmolLM2, small Qwen and Gemma models) get the norm
of the SUM of both uses' gradients, cross term included:
||D^T H + E||^2 = ||D^T H||^2 + ||E||^2 + 2 sum_{t,s} D[t, x_s] <h_t, b_s>,
with D the logits' gradient, H the lm_head input, x the token ids and b the
embedding output's gradient.

The engine can also keep what the backward captured and add, for any subset S of
the batch, sum_{i in S} grad L_i into ``p.grad`` of the trainable parameters
(``accumulate_grad``), so a training step on selected samples reuses the scoring
pass instead of running a second backward.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from torch import nn

from gradsift.losses import causal_lm_losses, loss_positions, response_losses  # noqa: F401 (re-exported)
from gradsift.norms.rules import Call, EmbeddingRule, LinearRule, Rule, find_rule
from gradsift.norms.rules.base import add_grad, hooks_suspended
from gradsift.norms.rules.embedding import embedding_sq_norms
from gradsift.norms.rules.linear import GramCache, gram_or_materialize

ParamSet = Literal["all", "trainable"]

# fp16 loss scaling of the scoring backward (dynamic, as torch.amp.GradScaler): the first
# scale, its bounds, the factor a scale that overflowed is divided by (the batch is then
# run again), and how many batches in a row without overflow double it.
INIT_LOSS_SCALE = 2.0**16
MAX_LOSS_SCALE = 2.0**24
LOSS_SCALE_BACKOFF = 8.0
LOSS_SCALE_GROWTH_INTERVAL = 100


def _compiled_type():
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - torch without dynamo
        return None
    return OptimizedModule


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile / DistributedDataParallel / DataParallel / DeepSpeed wrappers.

    The hooks must sit on the modules that really run: a compiled wrapper's forward
    runs its ``_orig_mod`` through dynamo (which would trace the hooks), the others
    keep the real model in ``.module``. FSDP is left as it is (its modules are the
    model's own).
    """
    compiled = _compiled_type()
    while True:
        if compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in (
                "DataParallel", "DeepSpeedEngine", "PipelineEngine"):
            model = model.module
        else:
            return model


@contextmanager
def _eager(model: nn.Module):
    """Run compiled submodules eagerly while scoring, so that every hook sees its call.

    ``module.compile()`` sets ``_compiled_call_impl``; ``torch.compile(submodule)``
    put in place of a submodule is an ``OptimizedModule``: both are switched to
    their plain module for the duration, then restored.
    """
    compiled = _compiled_type()
    undo = []
    for module in model.modules():
        if module.__dict__.get("_compiled_call_impl") is not None:
            undo.append((module.__dict__, "_compiled_call_impl", module.__dict__["_compiled_call_impl"]))
            module.__dict__["_compiled_call_impl"] = None
        if compiled is not None:
            for name, child in list(module._modules.items()):
                if isinstance(child, compiled):
                    undo.append((module._modules, name, child))
                    module._modules[name] = child._orig_mod
    try:
        yield
    finally:
        for where, key, value in reversed(undo):
            where[key] = value


class _Group:
    """Parameters whose per-sample gradients are computed together: one module, or a tied pair."""

    def __init__(self, rule: Rule, names: set[str], trainable: set[str]):
        self.rule = rule
        self.names = names  # parameter names counted in the norm
        self.trainable = trainable  # parameter names whose summed gradient can be accumulated
        self.calls: list[Call] = []
        self.received = 0

    @property
    def modules(self) -> list[nn.Module]:
        return [self.rule.module]

    def rule_for(self, module: nn.Module) -> Rule:
        return self.rule

    def calls_for(self, module: nn.Module) -> list[Call]:
        return self.calls

    def all_calls(self) -> list[Call]:
        return self.calls

    def sq_norms(self, batch_size: int) -> torch.Tensor:
        return self.rule.sq_norms(self.calls, self.names, batch_size)

    def accumulate(self, index: torch.Tensor, scale: float) -> None:
        if self.calls:
            self.rule.accumulate(self.calls, self.trainable, index, scale)

    def reset(self) -> None:
        self.calls = []
        self.received = 0


class _TiedGroup(_Group):
    """An output projection (Linear) and an input embedding sharing one weight."""

    def __init__(self, head: LinearRule, emb: EmbeddingRule, names: set[str], trainable: set[str]):
        self.head, self.emb = head, emb
        self.names = names  # subset of {"weight", "bias"}: names of the head's parameters
        self.trainable = trainable
        self.head_calls: list[Call] = []
        self.emb_calls: list[Call] = []
        self.received = 0
        self._head: tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]] | None = None

    @property
    def modules(self):
        return [self.head.module, self.emb.module]

    def rule_for(self, module):
        return self.head if module is self.head.module else self.emb

    def calls_for(self, module):
        return self.head_calls if module is self.head.module else self.emb_calls

    def all_calls(self):
        return self.head_calls + self.emb_calls

    def head_ready(self, batch_size: int, keep: bool) -> None:
        """Every head call has its gradient: reduce it now, so the (B, T, V) logits gradient can be freed.

        Keeps the head's squared norms, its input H and M[b, t, s] = D[b, t, x_s] (the
        logits gradient at the embedded tokens' columns, all the cross term needs).
        """
        H, D = self.head._factors(self.head_calls, batch_size)
        sq = torch.zeros(batch_size, dtype=torch.float32, device=D.device)
        if "weight" in self.names:
            sq += gram_or_materialize(H, D)
        if "bias" in self.names:
            sq += D.sum(dim=1).pow(2).sum(-1)
        M = {}
        if "weight" in self.names:
            for c in self.emb_calls:
                ids = c.ctx["ids"]
                M[id(c)] = torch.gather(D, 2, ids.unsqueeze(1).expand(batch_size, D.shape[1], ids.shape[1]))
        self._head = (sq, H, M)
        if not keep:
            for c in self.head_calls:
                c.grad = None

    def drop_missing(self) -> None:
        if self._head is None:
            self.head_calls = [c for c in self.head_calls if c.grad is not None]
        self.emb_calls = [c for c in self.emb_calls if c.grad is not None]

    def sq_norms(self, batch_size):
        if self._head is None and self.head_calls:
            self.head_ready(batch_size, keep=True)
        if self._head is not None:
            out, H, M_of = self._head
            out = out.clone()
        else:
            ids = self.emb_calls[0].ctx["ids"]
            out, H, M_of = torch.zeros(batch_size, dtype=torch.float32, device=ids.device), None, {}
        if self.emb_calls and "weight" in self.names:
            ids, b = self.emb.factors(self.emb_calls, batch_size)
            valid = self.emb._valid(ids)
            out += embedding_sq_norms(ids, b, valid, self.emb.module.num_embeddings).to(out.device)
            if M_of:
                M = torch.cat([M_of[id(c)] for c in self.emb_calls], dim=2)
                # cross term 2 <D^T H, E> = 2 sum_{t,s} D[t, x_s] <h_t, b_s>
                HB = torch.bmm(H, b.transpose(1, 2))
                out += 2.0 * (M * HB * valid.unsqueeze(1)).sum(dim=(1, 2))
        return out

    def accumulate(self, index, scale):
        if self.head_calls and self.trainable:
            self.head.accumulate(self.head_calls, self.trainable, index, scale)
        if self.emb_calls and "weight" in self.trainable:
            self.emb.accumulate(self.emb_calls, {"weight"}, index, scale)

    def reset(self):
        self.head_calls, self.emb_calls = [], []
        self.received = 0
        self._head = None


class GhostNormEngine:
    """Hooks a model to compute exact per-sample gradient norms G_i in one backward pass.

    Args:
        model: a causal LM (Hugging Face ``*ForCausalLM``, PEFT-wrapped or not).
        params: ``"all"`` (every parameter, frozen ones included) or ``"trainable"``
            (those with ``requires_grad``, e.g. LoRA adapters).
        keep_grads: keep what the backward captured so that ``accumulate_grad`` can
            build the summed gradient of any subset of the batch.
        strict: raise instead of falling back when a parameter has no rule.
        trim_logits: compute the logits only at positions that predict a response
            token (exact: the other positions' logits get no gradient).
        verify: check the first backward pass against the batch-size-1 loop, parameter
            group by parameter group, on two samples; raise
            :class:`~gradsift.norms.verify.NormCheckError` on a mismatch (see
            ``gradsift.norms.verify``).

    Packed rows (``position_ids`` that restart, ``cu_seq_lens_*``, ``seq_idx``) are
    split into their samples (``gradsift.norms.packing``): L and G then have one
    entry per packed sample, described by ``engine.segments``. With fp16 weights or
    fp16 autocast the scoring backward is loss scaled (dynamic, a power of two) and
    unscaled, so small activation gradients do not underflow.

    Usage::

        engine = GhostNormEngine(model, params="all")
        L = engine.forward(batch)        # (B,) per-sample losses
        G = engine.backward()            # (B,) exact per-sample gradient norms
        engine.close()
    """

    def __init__(self, model: nn.Module, params: ParamSet = "all", keep_grads: bool = False, strict: bool = False,
                 trim_logits: bool = True, verify: bool = False):
        if params not in ("all", "trainable"):
            raise ValueError(f"params must be 'all' or 'trainable', got {params!r}")
        self.model = _unwrap(model)
        self.params = params
        self.keep_grads = keep_grads
        self.trim_logits = trim_logits  # logits only where the loss reads them (see causal_lm_losses)
        self._B = 0
        self._active = False
        self._ignore_grads = False
        self._roots: list[torch.Tensor] = []
        self._graph_loss: torch.Tensor | None = None
        self._L: torch.Tensor | None = None
        self._sq: torch.Tensor | None = None
        self._fallback_grads: dict[int, torch.Tensor] = {}
        self._handles = []
        self.verify = verify
        self._verified = False
        self.verify_seconds: float | None = None  # what the self-check took
        self.segments = None  # the packed samples of the last batch (None: one sample per row)
        self._independent_layouts: set[tuple] = set()
        self._batch: dict[str, torch.Tensor] | None = None
        self._fp16 = False
        self._compute_dtype = torch.float32
        self._loss_scale = INIT_LOSS_SCALE  # fp16: the next batch's loss scale
        self._good_batches = 0
        self._grad_scale = 1.0  # the loss scale of what the last backward captured
        self._plan(strict)

    # ------------------------------------------------------------------ planning
    def _plan(self, strict: bool) -> None:
        named = list(self.model.named_parameters())  # shared parameters appear once
        self.param_names = {id(p): n for n, p in named}
        if self.params == "all":
            target = {id(p) for _, p in named}
        else:
            target = {id(p) for _, p in named if p.requires_grad}
        if not target:
            raise ValueError("no parameter to score: the model has no trainable parameter (use params='all')")
        self.target = target
        self.trainable_ids = {id(p) for _, p in named if p.requires_grad}

        owners: dict[int, list[tuple[nn.Module, type[Rule], str]]] = {}
        module_rules: dict[nn.Module, type[Rule]] = {}
        for _, module in self.model.named_modules():
            rule_cls = find_rule(module)
            if rule_cls is None:
                continue
            module_rules[module] = rule_cls
            for pname in rule_cls.param_names:
                p = module._parameters.get(pname)
                if p is not None:
                    owners.setdefault(id(p), []).append((module, rule_cls, pname))

        self.groups: list[_Group] = []
        self.group_of: dict[nn.Module, _Group] = {}
        covered: set[int] = set()
        # tied pairs first: one Linear and one Embedding sharing their weight
        for pid, uses in owners.items():
            if len(uses) == 2 and pid in target:
                kinds = {u[1] for u in uses}
                if kinds == {LinearRule, EmbeddingRule} and all(u[2] == "weight" for u in uses):
                    head = next(u[0] for u in uses if u[1] is LinearRule)
                    emb = next(u[0] for u in uses if u[1] is EmbeddingRule)
                    if head in self.group_of or emb in self.group_of:
                        continue
                    names = {n for n in ("weight", "bias") if (q := head._parameters.get(n)) is not None and id(q) in target}
                    train = {n for n in names if id(head._parameters[n]) in self.trainable_ids}
                    g = _TiedGroup(LinearRule(head), EmbeddingRule(emb), names, train)
                    self.groups.append(g)
                    self.group_of[head] = self.group_of[emb] = g
                    covered.update(id(q) for q in head._parameters.values() if q is not None)
        for module, rule_cls in module_rules.items():
            if module in self.group_of:
                continue
            own = {n: p for n, p in module._parameters.items() if p is not None}
            names = {n for n, p in own.items() if id(p) in target and len(owners.get(id(p), [])) == 1}
            if not names:
                continue
            train = {n for n in names if id(own[n]) in self.trainable_ids}
            g = _Group(rule_cls(module), names, train)
            self.groups.append(g)
            self.group_of[module] = g
            covered.update(id(own[n]) for n in names)

        self.fallback = [p for _, p in named if id(p) in target and id(p) not in covered]
        if self.fallback:
            names = [self.param_names[id(p)] for p in self.fallback]
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            if strict:
                raise NotImplementedError(f"no per-sample norm rule for parameters: {shown}")
            warnings.warn(
                f"gradsift: no per-sample norm rule for {shown}; their per-sample gradients are computed "
                "exactly with one extra backward pass per sample (slower)",
                stacklevel=3,
            )

        self._gram_cache = GramCache()
        for g in self.groups:
            if not isinstance(g, _TiedGroup) and isinstance(g.rule, LinearRule) and "weight" in g.names:
                g.rule.gram_cache = self._gram_cache
        # hook every module of a group, and every embedding (the roots of the backward pass)
        hooked = set(self.group_of)
        for _, module in self.model.named_modules():
            if isinstance(module, nn.Embedding):
                hooked.add(module)
        for module in hooked:
            self._handles.append(module.register_forward_hook(self._forward_hook))

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, module, args, output):
        if not self._active or hooks_suspended() or not torch.is_grad_enabled():
            return None
        if not isinstance(output, torch.Tensor):
            return None
        out = output
        if isinstance(module, nn.Embedding) and out.grad_fn is None:
            # frozen embedding: its output is a root of the backward pass (already a leaf that
            # requires grad when the model called enable_input_require_grads)
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            self._roots.append(out)
        group = self.group_of.get(module)
        if group is not None and out.requires_grad:
            ctx, out = group.rule_for(module).capture(args, out, self._B)
            call = Call(ctx)
            group.calls_for(module).append(call)
            out.register_hook(lambda g, group=group, call=call: self._on_grad(group, call, g))
        return out if out is not output else None

    def _on_grad(self, group: _Group, call: Call, grad: torch.Tensor) -> None:
        if self._ignore_grads:
            return
        call.grad = grad.detach()
        group.received += 1
        if isinstance(group, _TiedGroup) and group._head is None and any(c is call for c in group.head_calls) \
                and all(c.grad is not None for c in group.head_calls):
            group.head_ready(self._B, keep=self.keep_grads and bool(group.trainable))
        if group.received == len(group.all_calls()):
            self._finalize(group)

    def _finalize(self, group: _Group) -> None:
        # a call whose output got no gradient contributes 0
        if isinstance(group, _TiedGroup):
            group.drop_missing()
            calls = group.all_calls()
        else:
            calls = group.calls = [c for c in group.calls if c.grad is not None]
        if calls and group.names:
            self._sq += group.sq_norms(self._B).to(self._sq.device)
        if not (self.keep_grads and group.trainable):
            group.reset()
        group.received = -1  # finalized

    # ------------------------------------------------------------------ API
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the model on a right-padded batch; return the per-sample losses L (B,), float32.

        A packed batch is split into its samples first (see ``segments``); L has one
        entry per packed sample then.
        """
        from gradsift.norms import packing

        self.segments = packing.find_segments(batch)
        if self.segments is not None:
            pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
            unpacked = packing.unpack(batch, self.segments, pad if isinstance(pad, int) else 0)
            layout = packing.layout_key(batch)
            if layout not in self._independent_layouts:
                was = self.model.training
                self.model.eval()
                try:
                    with _eager(self.model):
                        packing.check_independent(self.model, batch, unpacked, self.segments)
                finally:
                    self.model.train(was)
                self._independent_layouts.add(layout)
            batch = unpacked
        self._batch = batch
        return self._forward(batch)

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.clear()
        input_ids, labels = batch["input_ids"], batch["labels"]
        attention_mask = batch.get("attention_mask")
        extra = {"position_ids": batch["position_ids"]} if batch.get("position_ids") is not None else {}
        self._B = input_ids.shape[0]
        self._was_training = self.model.training
        self.model.eval()  # no dropout while scoring
        keep = {id(p) for p in self.fallback}
        saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        self._active = True
        try:
            with torch.enable_grad(), _eager(self.model):
                L, out = causal_lm_losses(self.model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                                       "labels": labels}, trim=self.trim_logits, use_cache=False,
                                          **extra)
        finally:
            self._active = False
            for p, flag in saved:
                p.requires_grad_(flag)
        if not self._roots:
            raise RuntimeError("no nn.Embedding was called in the forward pass: cannot backpropagate to score samples")
        self._compute_dtype = self._dtype_of(out)
        self._fp16 = self._compute_dtype == torch.float16
        self._graph_loss = L
        self._L = L.detach()
        return self._L

    def _dtype_of(self, out) -> torch.dtype:
        """The dtype the forward computed in: autocast's, else the embedding output's or the logits'."""
        dev = self._roots[0].device.type
        try:
            if torch.is_autocast_enabled(dev):
                return torch.get_autocast_dtype(dev)
        except (TypeError, RuntimeError):  # pragma: no cover - older torch
            pass
        logits = getattr(out, "logits", None)
        dtypes = {t.dtype for t in [*self._roots, logits] if isinstance(t, torch.Tensor)}
        for low in (torch.float16, torch.bfloat16):
            if low in dtypes:
                return low
        return self._roots[0].dtype

    def backward(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One backward pass of sum_{i in mask} L_i; returns G (B,) (0 outside the mask).

        fp16: sum_i L_i is multiplied by the loss scale S before the backward, the
        squared norms are divided by S^2 and the kept gradients by S; if anything
        overflowed, the batch is run again with S / 8. With ``verify`` the first
        backward is checked against the per-sample loop before G is returned.
        """
        if self._graph_loss is None:
            raise RuntimeError("call forward(batch) before backward()")
        L = self._graph_loss
        if mask is None:
            mask = torch.ones_like(L, dtype=torch.bool)
        mask = mask.to(L.device).bool()
        scale = self._loss_scale if self._fp16 else 1.0
        checking = self.verify and not self._verified and bool(mask.any())
        if checking:
            from gradsift.norms.verify import recording
        while True:
            with (recording(self) if checking else nullcontext()) as record:
                self._backward_pass(L, mask, scale)
            if scale <= 1.0 or bool(torch.isfinite(self._sq).all()) or not bool(torch.isfinite(L[mask]).all()):
                break
            # overflow in the scaled backward: run the batch again with a smaller scale
            scale = max(1.0, scale / LOSS_SCALE_BACKOFF)
            was = self._was_training
            self._forward(self._batch)
            self._was_training = was
            L = self._graph_loss
        if self._fp16:
            if scale < self._loss_scale:
                self._loss_scale, self._good_batches = scale, 0
            else:
                self._good_batches += 1
                if self._good_batches >= LOSS_SCALE_GROWTH_INTERVAL and self._loss_scale < MAX_LOSS_SCALE:
                    self._loss_scale, self._good_batches = self._loss_scale * 2, 0
        self._grad_scale = scale
        if scale != 1.0:
            self._sq = self._sq / scale**2
        self._graph_loss = None
        self._roots = []
        if self._was_training:
            self.model.train()
        if checking:
            from gradsift.norms.verify import check_first_batch

            self._verified = True
            group_sq = {k: v / scale**2 for k, v in record.items()}
            self.verify_seconds = check_first_batch(self, self._batch, mask, group_sq, self._sq.detach().double().cpu(),
                                                    self._compute_dtype, loss_scale=scale)
        return self._sq.clamp_min(0).sqrt()

    def _backward_pass(self, L: torch.Tensor, mask: torch.Tensor, scale: float) -> None:
        self._sq = torch.zeros(self._B, dtype=torch.float32, device=L.device)
        for g in self.groups:
            g.received = 0
        scaled = L * scale if scale != 1.0 else L
        total = (scaled * mask).sum()
        if self.fallback:
            self._fallback_pass(scaled, mask)
        self._ignore_grads = False
        torch.autograd.grad(total, self._roots, allow_unused=True)
        for g in self.groups:
            if g.received != -1 and g.all_calls():
                self._finalize(g)

    def _fallback_pass(self, L: torch.Tensor, mask: torch.Tensor) -> None:
        self._ignore_grads = True
        try:
            store = self.keep_grads and any(id(p) in self.trainable_ids for p in self.fallback)
            per_sample = [torch.zeros((self._B, *p.shape), dtype=torch.float32) for p in self.fallback] if store else []
            for i in mask.nonzero().flatten().tolist():
                grads = torch.autograd.grad(L[i], self.fallback, retain_graph=True, allow_unused=True)
                for k, g in enumerate(grads):
                    if g is None:
                        continue
                    self._sq[i] += g.float().pow(2).sum().to(self._sq.device)
                    if store:
                        per_sample[k][i] = g.float().cpu()
            self._fallback_grads = {id(p): t for p, t in zip(self.fallback, per_sample)}
        finally:
            self._ignore_grads = False

    @property
    def losses(self) -> torch.Tensor | None:
        return self._L

    def accumulate_grad(self, index: torch.Tensor | list[int], scale: float = 1.0) -> None:
        """Add ``scale * sum_{i in index} grad L_i`` into ``p.grad`` of every trainable parameter.

        Needs ``keep_grads=True`` and a finished ``backward`` whose mask included ``index``.
        """
        if not self.keep_grads:
            raise RuntimeError("accumulate_grad needs GhostNormEngine(..., keep_grads=True)")
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        if index.numel() == 0:
            return
        scale = scale / self._grad_scale  # fp16: what the backward captured is loss scaled
        for g in self.groups:
            if g.trainable:
                g.accumulate(index.to(_device_of(g)), scale)
        for p in self.fallback:
            t = self._fallback_grads.get(id(p))
            if t is not None:
                add_grad(p, scale * t[index.cpu()].sum(dim=0))

    def clear(self) -> None:
        """Drop everything captured for the last batch."""
        for g in self.groups:
            g.reset()
        self._gram_cache.reset()
        self._roots = []
        self._graph_loss = None
        self._fallback_grads = {}

    def close(self) -> None:
        """Remove the hooks."""
        self.clear()
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _device_of(group: _Group) -> torch.device:
    return next(iter(group.modules[0].parameters())).device


def per_sample_grad_norms(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    params: ParamSet = "all",
    strict: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-sample gradient norms G (B,) and per-sample losses L (B,) for one batch.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (right padded,
    -100 everywhere but the response tokens). One forward and one backward pass;
    no per-sample gradient is stored whole. The model's parameters and ``.grad``
    are left untouched.
    """
    with GhostNormEngine(model, params=params, strict=strict) as engine:
        L = engine.forward(batch)
        G = engine.backward()
    return G, L
