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

import sys
import warnings
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from torch import nn

from gradsift.losses import causal_lm_losses, loss_positions, response_losses  # noqa: F401 (re-exported)
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from gradsift.norms.rules import Call, EmbeddingRule, LinearRule, NormRule, Rule, dispatch
from gradsift.norms.rules.base import NotCovered, add_grad, hooks_suspended, set_batch_tokens, suspend_hooks
from gradsift.norms.rules.embedding import embedding_sq_norms
from gradsift.norms.rules.linear import GramCache, SharedInputs, gram_or_materialize

ParamSet = Literal["all", "trainable"]

# the largest parameter the exact per-sample fallback takes (it runs one backward pass per
# sample through it); a larger one is refused with a message suggesting params="trainable"
FALLBACK_MAX_NUMEL = 2**28

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
def _eager(model: nn.Module, modules: list[nn.Module] | None = None):
    """Run compiled submodules eagerly while scoring, so that every hook sees its call.

    ``module.compile()`` sets ``_compiled_call_impl``; ``torch.compile(submodule)``
    put in place of a submodule is an ``OptimizedModule``: both are switched to
    their plain module for the duration, then restored. ``modules``: the model's
    modules, listed once by the caller.
    """
    compiled = _compiled_type()
    undo = []
    for module in (modules if modules is not None else model.modules()):
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


def _computes(out) -> bool:
    """Does a torch function's result carry values computed from its inputs (a tensor), not just metadata?"""
    return any(isinstance(x, torch.Tensor) for x in tree_leaves(out))


class _Tracer(TorchFunctionMode):
    """Inside one module's forward: captures the traced calls on the module's own parameters.

    A call of one of the rule's traced functions that uses the parameters in the
    slots the rule reads (``F.embedding(ids, self.weight)``) is captured; a
    parameter used by any other function (read as ``self.weight.dtype`` aside)
    is a failure, reported when the forward ends.
    """

    def __init__(self, engine: "GhostNormEngine", module: nn.Module, group: "_Group"):
        super().__init__()
        self.engine, self.module, self.group = engine, module, group
        self.rule = group.rule_for(module)
        self.params = {id(p): (n, p) for n, p in module._parameters.items() if p is not None}
        self.failure: str | None = None
        self.rooted = False
        self.func = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.failure is not None:
            return func(*args, **kwargs)
        used = {self.params[id(a)][0] for a in tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor) and id(a) in self.params and self.params[id(a)][1] is a}
        if not used:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", repr(func))
        if not _computes(out):
            return out  # a read (dtype, device, shape, is_floating_point()), no computation
        if func in self.rule.traced and self.rule.traced_params(func, args, kwargs) == used:
            self.func = func
            try:
                return self.engine._capture_traced(self, args, kwargs, out)
            except NotCovered as e:
                self.failure = str(e)
                return out
        self.failure = f"its forward uses {', '.join(sorted(used))} in {name}(), which no rule covers"
        return out


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)
_FLAT = (torch.Tensor, *_PLAIN)


def _tensor_args(args: tuple, kwargs: dict):
    """The values to look up among a torch call's arguments: the arguments themselves when they are all tensors
    and plain values (most calls; a plain value is never a parameter), else every tensor nested in them (as
    ``tree_leaves`` finds them). This runs on every op of a scoring forward."""
    values = (*args, *kwargs.values()) if kwargs else args
    for a in values:
        if not isinstance(a, _FLAT):
            return [t for t in tree_leaves(values) if isinstance(t, torch.Tensor)]
    return values


def _flag_only_train(module: nn.Module) -> bool:
    """Does ``module.train(mode)`` only set ``training`` on it and its children? nn.Module's own ``train`` does,
    and so does transformers' ``PreTrainedModel.train`` when the model uses no hub kernels (which it recasts)."""
    train = type(module).train
    if train is nn.Module.train:
        return True
    hf = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    return hf is not None and train is hf.train and not getattr(module, "use_kernels", False)


def _in_forward(group: "_Group", running: dict) -> bool:
    """Is one of the group's modules running its forward now?"""
    for m in group.modules:
        if running.get(m, 0):
            return True
    return False


class _Usage(TorchFunctionMode):
    """During the scoring forward: a parameter of a group used outside the forward of its own module(s).

    (Mamba's mixer reads ``self.dt_proj.weight`` itself; a model may compute its
    logits with ``F.linear(h, self.embed_tokens.weight)``.) The rule of that
    module never sees such a use, so the group is sent to the exact fallback.
    """

    def __init__(self, engine: "GhostNormEngine"):
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        eng = self.engine
        if not torch.is_grad_enabled() or hooks_suspended():
            return func(*args, **kwargs)
        outside = None
        owner = eng._owner_group
        for a in _tensor_args(args, kwargs):
            hit = owner.get(id(a))
            if hit is not None and not hit[0].demoted and not _in_forward(hit[0], eng._running):
                outside = outside or {}
                outside.setdefault(id(hit[0]), hit)
        out = func(*args, **kwargs)
        if outside and _computes(out):  # not a mere read (dtype, shape, is_floating_point())
            for group, pname in outside.values():
                if not group.demoted:
                    eng._demote(group, group.modules[0], f"its parameter {pname} is used outside its forward "
                                f"(by {getattr(func, '__name__', func)}())")
        return out


class _Group:
    """Parameters whose per-sample gradients are computed together: one module, or a tied pair."""

    provisional = False  # every call is checked; a failed check demotes the group to the fallback
    demoted = False
    # keep_grads: the trainable parameters' per-sample gradients (B, *shape) where they are smaller than
    # the captures they come from (formed as the gradient arrives; the captures are then freed)
    per_sample: dict[str, torch.Tensor] | None = None

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

    def sq_norms(self, batch_size: int, keep: bool = False) -> torch.Tensor:
        """The group's per-sample squared norms (B,); with ``keep`` (the engine's keep_grads) the trainable
        parameters' per-sample gradients are formed and kept where that is smaller than the captures."""
        if keep:
            sq = self._keep_per_sample(batch_size)
            if sq is not None:
                return sq
        return self.rule.sq_norms(self.calls, self.names, batch_size)

    def _keep_per_sample(self, batch_size: int) -> torch.Tensor | None:
        """Form the trainable parameters' per-sample gradients now if the rule finds them smaller than its
        captures; return the group's per-sample squared norms then (None: the captures are kept)."""
        form = getattr(self.rule, "per_sample_grads", None)
        if form is None or not self.trainable:
            return None
        ps = form(self.calls, self.trainable, batch_size)
        if ps is None:
            return None
        sq = sum(torch.linalg.vecdot(g.flatten(1), g.flatten(1)) for n, g in ps.items() if n in self.names)
        frozen = self.names - self.trainable
        if frozen:
            sq = sq + self.rule.sq_norms(self.calls, frozen, batch_size)
        self.per_sample = ps
        self.calls = []
        return sq

    def accumulate(self, index: torch.Tensor, scale: float) -> None:
        if self.per_sample is not None:
            module = self.rule.module
            for n, g in self.per_sample.items():
                add_grad(module._parameters[n], scale * g[index].sum(dim=0))
        elif self.calls:
            self.rule.accumulate(self.calls, self.trainable, index, scale)

    def reset(self) -> None:
        self.calls = []
        self.received = 0
        self.per_sample = None


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
        H, D = self.head._factors(self.head_calls, batch_size, upcast_grad=False)  # D: no fp32 copy of the logits'
        sq = torch.zeros(batch_size, dtype=torch.float32, device=D.device)
        if "weight" in self.names:
            sq += gram_or_materialize(H, D)
        if "bias" in self.names:
            sq += D.sum(dim=1, dtype=torch.float32).pow(2).sum(-1)
        M = {}
        if "weight" in self.names:
            for c in self.emb_calls:
                ids = c.ctx["ids"]
                M[id(c)] = torch.gather(D, 2, ids.unsqueeze(1).expand(batch_size, D.shape[1], ids.shape[1])).float()
        self._head = (sq, H, M)
        if not keep:
            for c in self.head_calls:
                c.grad = None

    def drop_missing(self) -> None:
        if self._head is None:
            self.head_calls = [c for c in self.head_calls if c.grad is not None]
        self.emb_calls = [c for c in self.emb_calls if c.grad is not None]

    def sq_norms(self, batch_size, keep=False):
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
            valid = self.emb.valid(self.emb_calls)
            out += embedding_sq_norms(ids, b, valid, self.emb.module.weight.shape[0]).to(out.device)
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
        self._all_params = [p for _, p in named]
        self._all_modules = list(self.model.modules())
        self._train_overrides = [m for m in self._all_modules if type(m).train is not nn.Module.train]
        self.param_names = {id(p): n for n, p in named}
        self.module_names = {m: n for n, m in self.model.named_modules()}
        if self.params == "all":
            target = {id(p) for _, p in named}
        else:
            target = {id(p) for _, p in named if p.requires_grad}
        if not target:
            raise ValueError("no parameter to score: the model has no trainable parameter (use params='all')")
        self.target = target
        self.trainable_ids = {id(p) for _, p in named if p.requires_grad}
        self._strict = strict

        owners: dict[int, list[tuple[nn.Module, type[Rule], str]]] = {}
        module_rules: dict[nn.Module, tuple[type[Rule], bool]] = {}
        for _, module in self.model.named_modules():
            rule_cls, provisional = dispatch(module)
            if rule_cls is None:
                continue
            module_rules[module] = (rule_cls, provisional)
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
                    g.provisional = module_rules[head][1] or module_rules[emb][1]
                    self.groups.append(g)
                    self.group_of[head] = self.group_of[emb] = g
                    covered.update(id(q) for q in head._parameters.values() if q is not None)
        for module, (rule_cls, provisional) in module_rules.items():
            if module in self.group_of:
                continue
            own = {n: p for n, p in module._parameters.items() if p is not None}
            names = {n for n, p in own.items() if id(p) in target and len(owners.get(id(p), [])) == 1}
            if not names:
                continue
            train = {n for n in names if id(own[n]) in self.trainable_ids}
            rule = rule_cls(module)
            if isinstance(rule, NormRule) and provisional:
                rule.check_calls = True
            g = _Group(rule, names, train)
            g.provisional = provisional
            self.groups.append(g)
            self.group_of[module] = g
            covered.update(id(own[n]) for n in names)

        self.fallback = [p for _, p in named if id(p) in target and id(p) not in covered]
        if self.fallback:
            names = [self.param_names[id(p)] for p in self.fallback]
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            if strict:
                raise NotImplementedError(f"no per-sample norm rule for parameters: {shown}")
            self._check_fallback_size(self.fallback)
            warnings.warn(
                f"gradsift: no per-sample norm rule for {shown}; their per-sample gradients are computed "
                "exactly with one extra backward pass per sample (slower)",
                stacklevel=3,
            )

        self._gram_cache = GramCache()
        self._shared_inputs = SharedInputs()
        for g in self.groups:
            if not isinstance(g, _TiedGroup) and isinstance(g.rule, LinearRule):
                g.rule.shared_inputs = self._shared_inputs
                if "weight" in g.names:
                    g.rule.gram_cache = self._gram_cache
        self._fallback_L: torch.Tensor | None = None
        # hook every module of a group, and every embedding (the roots of the backward pass)
        hooked = set(self.group_of)
        for _, module in self.model.named_modules():
            if isinstance(module, nn.Embedding):
                hooked.add(module)
        self._tracers: dict[nn.Module, list] = {}
        self._running: dict[nn.Module, int] = {}
        self._owner_group: dict[int, tuple[_Group, str]] = {}
        for g in self.groups:
            for m in g.modules:
                for n, p in m._parameters.items():
                    if p is not None and id(p) in target:
                        self._owner_group[id(p)] = (g, self.param_names.get(id(p), n))
        self._proving = True  # until a first forward has proven the plan (every group's parameters checked)
        for module in hooked:
            self._handles.append(module.register_forward_pre_hook(self._module_start))
            self._handles.append(module.register_forward_hook(self._forward_hook, always_call=True))
        self._usage: _Usage | None = None
        self._handles.append(self.model.register_forward_pre_hook(self._model_start))
        self._handles.append(self.model.register_forward_hook(self._model_end, always_call=True))

    def _set_training(self, mode: bool) -> None:
        """``model.train(mode)``, without its walk over every module when no module's ``train`` does more than
        set the flag."""
        if all(_flag_only_train(m) for m in self._train_overrides):
            for m in self._all_modules:
                object.__setattr__(m, "training", mode)
        else:
            self.model.train(mode)

    def _model_start(self, module, args):
        if self._active and self._usage is None:
            self._usage = _Usage(self)
            self._usage.__enter__()

    def _model_end(self, module, args, output):
        if self._usage is not None:
            usage, self._usage = self._usage, None
            usage.__exit__(None, None, None)

    def _check_fallback_size(self, params: list[torch.Tensor]) -> None:
        """The fallback runs one backward per sample through each parameter: refuse a huge one."""
        big = [p for p in params if p.numel() > FALLBACK_MAX_NUMEL]
        if big:
            p = max(big, key=lambda q: q.numel())
            raise ValueError(
                f"no per-sample norm rule for {self.param_names[id(p)]} ({p.numel() / 1e6:.0f}M elements, "
                f"{type(self._owner_of(p)).__name__}): the exact per-sample fallback would run one backward pass "
                f"per sample through it; score params='trainable' (e.g. LoRA adapters) instead, or raise "
                f"gradsift.norms.engine.FALLBACK_MAX_NUMEL ({FALLBACK_MAX_NUMEL})"
            )

    def _owner_of(self, p: torch.Tensor) -> nn.Module | None:
        for m in self.module_names:
            if any(q is p for q in m._parameters.values()):
                return m
        return None

    def _forward_grad_ids(self, input_ids: torch.Tensor) -> set[int]:
        """Called at the start of each forward: the parameters that keep requires_grad during it.

        Only the fallback's: every other parameter is frozen, so autograd saves nothing for
        weight gradients. A group that fails a check in the pass goes to the fallback and
        the pass is run again (see ``_forward``).
        """
        set_batch_tokens(input_ids.shape[-1] if input_ids.dim() == 2 else None)
        return {id(p) for p in self.fallback}

    def _demote(self, group: _Group, module: nn.Module, reason: str) -> None:
        """A group whose rule cannot take a call: its parameters go to the exact fallback from now on."""
        name = self.module_names.get(module, "?")
        where = f"{name} ({type(module).__name__})"
        if not (group.provisional or self._proving):
            raise NotImplementedError(
                f"gradsift: no exact per-sample norm for {where}: {reason}. Send this layer type to the exact "
                f"fallback with gradsift.norms.register_rule({type(module).__name__}, None), or score "
                "params='trainable'"
            )
        if self._strict:
            raise NotImplementedError(f"no per-sample norm rule for {where}: {reason}")
        group.demoted = True
        group.calls_for(module).clear()
        if group in self.groups:
            self.groups.remove(group)
        for m in group.modules:
            if self.group_of.get(m) is group:
                del self.group_of[m]
        have = {id(q) for q in self.fallback}
        params = []
        for m in group.modules:
            for p in m._parameters.values():
                if p is not None and id(p) in self.target and id(p) not in have:
                    have.add(id(p))
                    params.append(p)
        self._check_fallback_size(params)
        self.fallback.extend(params)
        warnings.warn(f"gradsift: {where}: {reason}; its parameters go to the exact per-sample fallback "
                      "(one extra backward pass per sample)", stacklevel=2)

    # ------------------------------------------------------------------ hooks
    def _module_start(self, module, args):
        if not self._active or hooks_suspended() or not torch.is_grad_enabled():
            return None
        self._running[module] = self._running.get(module, 0) + 1
        group = self.group_of.get(module)
        if group is None or not group.rule_for(module).traced:
            return None
        tracer = _Tracer(self, module, group)
        tracer.__enter__()
        self._tracers.setdefault(module, []).append(tracer)
        return None

    def _capture_traced(self, tracer: "_Tracer", args, kwargs, out):
        """A traced call (F.embedding / F.linear on the module's own weight): capture it, hook its output."""
        group, module, rule = tracer.group, tracer.module, tracer.rule
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise NotCovered(f"{getattr(tracer.func, '__name__', tracer.func)} returned no floating tensor")
        if not out.requires_grad:
            out = out.detach().requires_grad_(True)
        with suspend_hooks():  # the rule's own reads of the parameters are no use by the model
            ctx, out = rule.capture_traced(args, kwargs, out, self._B)
        call = Call(ctx)
        group.calls_for(module).append(call)
        out.register_hook(lambda g, group=group, call=call: self._on_grad(group, call, g))
        if isinstance(rule, EmbeddingRule):
            tracer.rooted = True
            return self._root(out)  # a lookup: a root of the backward pass
        return out

    def _root(self, t: torch.Tensor) -> torch.Tensor:
        """Make ``t`` a root of the backward pass; the model goes on with a copy of it, so that an in-place
        change (CTRL scales its embeddings with ``*=``) cannot move the root past its hooks."""
        self._roots.append(t)
        return t.clone()

    def _forward_hook(self, module, args, output):
        if self._running.get(module, 0) > 0:
            self._running[module] -= 1
        tracer = None
        stack = self._tracers.get(module)
        if stack:
            tracer = stack.pop()
            tracer.__exit__(None, None, None)
            if tracer.failure is not None and not getattr(tracer.group, "demoted", False):
                self._demote(tracer.group, module, tracer.failure)
        if not self._active or hooks_suspended() or not torch.is_grad_enabled():
            return None
        if not isinstance(output, torch.Tensor):
            return None
        with self._usage_paused():
            return self._capture_output(module, args, output, tracer)

    @contextmanager
    def _usage_paused(self):
        """The engine's own work in a hook (captures, norm re-runs, hook registration) outside the usage check:
        none of it is a use of a parameter by the model, and most torch calls of a scoring forward are these."""
        usage = self._usage
        n = torch._C._len_torch_function_stack()
        if usage is None or n == 0 or torch._C._get_function_stack_at(n - 1) is not usage:
            yield
            return
        torch._C._pop_torch_function_stack()
        try:
            yield
        finally:
            torch._C._push_on_torch_function_stack(usage)

    def _capture_output(self, module, args, output, tracer):
        out = output
        if isinstance(module, nn.Embedding) and not (tracer is not None and tracer.rooted and tracer.failure is None):
            # an embedding no rule traced (frozen, or in the fallback): its output is a root of the backward
            # pass (already a leaf that requires grad when the model called enable_input_require_grads)
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            out = self._root(out)
        group = self.group_of.get(module)
        if tracer is None and group is not None and out.requires_grad:
            try:
                with suspend_hooks():  # the rule's own reads of the parameters are no use by the model
                    ctx, out = group.rule_for(module).capture(args, out, self._B)
            except NotCovered as e:
                self._demote(group, module, str(e))
                return out if out is not output else None
            call = Call(ctx)
            group.calls_for(module).append(call)
            out.register_hook(lambda g, group=group, call=call: self._on_grad(group, call, g))
        return out if out is not output else None

    def _on_grad(self, group: _Group, call: Call, grad: torch.Tensor) -> None:
        if self._ignore_grads or getattr(group, "demoted", False):
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
            self._sq += group.sq_norms(self._B, keep=self.keep_grads).to(self._sq.device)
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
        """One scoring forward; run again while a check in it sent a group to the fallback.

        The fallback needs its parameters to require grad in the forward pass, and only
        the fallback's do; a group demoted during a pass (a parameter used outside its
        module, rows that cannot be mapped, a proven rule whose call check failed) is
        therefore scored in a second pass, with its parameters requiring grad. Demotions
        are permanent, so this happens at most once per failing group.
        """
        while True:
            n_fallback = len(self.fallback)
            L = self._forward_once(batch)
            if len(self.fallback) == n_fallback:
                self._proving = False
                return L

    def _forward_once(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.clear()
        input_ids, labels = batch["input_ids"], batch["labels"]
        attention_mask = batch.get("attention_mask")
        extra = {"position_ids": batch["position_ids"]} if batch.get("position_ids") is not None else {}
        self._B = input_ids.shape[0]
        self._was_training = self.model.training
        self._set_training(False)  # no dropout while scoring
        keep = self._forward_grad_ids(input_ids)
        saved = [(p, p.requires_grad) for p in self._all_params]
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        self._active = True
        try:
            with torch.enable_grad(), _eager(self.model, self._all_modules):
                L, out = causal_lm_losses(self.model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                                       "labels": labels}, trim=self.trim_logits, use_cache=False,
                                          **extra)
        finally:
            self._active = False
            self._shared_inputs.reset()  # sharing is decided in the forward; hold no capture beyond it
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
            self._set_training(True)
        if checking:
            from gradsift.norms.verify import check_first_batch

            self._verified = True
            group_sq = {k: v / scale**2 for k, v in record.items()}
            if self.fallback:
                group_sq["fallback"] = self._fallback_sq.detach().double().cpu() / scale**2
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
            self._fallback_sq = self._sq.clone()  # the fallback's share (for the self-check)
        self._ignore_grads = False
        torch.autograd.grad(total, self._roots, allow_unused=True, retain_graph=self._fallback_L is not None)
        for g in self.groups:
            if g.received != -1 and g.all_calls():
                self._finalize(g)

    def _fallback_pass(self, L: torch.Tensor, mask: torch.Tensor) -> None:
        """Exact per-sample squared norms of the parameters no rule covers: one backward per sample.

        No per-sample gradient is kept: with ``keep_grads`` the graph is kept
        instead (until the next batch), and ``accumulate_grad`` backpropagates the
        kept samples' summed loss through these parameters only, so no buffer
        grows as B x a parameter's size.
        """
        self._ignore_grads = True
        try:
            with _requiring_grad(self.fallback):  # as they did in the forward pass
                for i in mask.nonzero().flatten().tolist():
                    grads = torch.autograd.grad(L[i], self.fallback, retain_graph=True, allow_unused=True)
                    for g in grads:
                        if g is not None:
                            self._sq[i] += g.float().pow(2).sum().to(self._sq.device)
            trainable = [p for p in self.fallback if id(p) in self.trainable_ids]
            self._fallback_L = L if self.keep_grads and trainable else None
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
        self._accumulate(index, scale)

    def _accumulate(self, index, scale: float, skip_per_sample: bool = False) -> None:
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        if index.numel() == 0:
            return
        scale = scale / self._grad_scale  # fp16: what the backward captured is loss scaled
        for g in self.groups:
            if g.trainable and not (skip_per_sample and g.per_sample is not None):
                g.accumulate(index.to(_device_of(g)), scale)
        trainable = [p for p in self.fallback if id(p) in self.trainable_ids]
        if trainable and self._fallback_L is not None:
            L = self._fallback_L
            self._ignore_grads = True
            try:
                grads = torch.autograd.grad(L[index.to(L.device)].sum() * scale, trainable, retain_graph=True,
                                            allow_unused=True)
            finally:
                self._ignore_grads = False
            for p, g in zip(trainable, grads):
                if g is not None:
                    add_grad(p, g)

    def per_sample_grads(self, params: list[torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Each sample's gradient of the trainable parameters: {id(p): (B, *p.shape) float32}.

        Needs ``keep_grads=True`` and a finished ``backward`` over every row. Layers whose
        per-sample gradients the backward already formed (LoRA factors) give them as they
        are (no copy); the others are built one sample at a time from their captures. The
        engine drops its references at ``clear()``.
        """
        if not self.keep_grads:
            raise RuntimeError("per_sample_grads needs GhostNormEngine(..., keep_grads=True)")
        if params is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
        out: dict[int, torch.Tensor] = {}
        for g in self.groups:
            if g.per_sample is not None:
                module = g.rule.module
                for n, t in g.per_sample.items():
                    out[id(module._parameters[n])] = t if self._grad_scale == 1.0 else t / self._grad_scale
        rest = [p for p in params if id(p) not in out]
        if rest:
            saved = [p.grad for p in rest]
            rows = {id(p): torch.zeros((self._B, *p.shape), dtype=torch.float32, device=p.device) for p in rest}
            try:
                for i in range(self._B):
                    for p in rest:
                        p.grad = None
                    self._accumulate([i], 1.0, skip_per_sample=True)
                    for p in rest:
                        if p.grad is not None:
                            rows[id(p)][i] = p.grad.float()
            finally:
                for p, grad in zip(rest, saved):
                    p.grad = grad
            out.update(rows)
        return {id(p): out[id(p)] for p in params if id(p) in out}

    def clear(self) -> None:
        """Drop everything captured for the last batch."""
        for g in self.groups:
            g.reset()
        self._gram_cache.reset()
        self._shared_inputs.reset()
        self._roots = []
        self._graph_loss = None
        self._fallback_grads = {}
        self._fallback_L = None

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


@contextmanager
def _requiring_grad(params: list[torch.Tensor]):
    """Parameters that required grad in the forward pass (the fallback's) do so again while differentiated."""
    saved = [(p, p.requires_grad) for p in params]
    for p, _ in saved:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


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
