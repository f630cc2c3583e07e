"""Tiny random models of every causal-LM family that transformers ships, for the exactness matrix.

``tiny_model(model_type)`` builds ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]``
from its config class with tiny sizes (hidden 32, 2 layers, vocabulary 96, eager
attention, fp32) and random weights; families that cannot be built on a CPU from
a config alone raise :class:`Unbuildable` with the reason. ``check_family`` runs
the engine on it and compares G_i with the batch-size-1 loop and the kept
gradient with a fresh backward. The tests (``tests/test_norms_models.py``) and
the support table (``scripts/model_matrix.py`` -> ``docs/models.md``) use both.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

V = 96  # vocabulary of the tiny models
WIDTH = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2
FFN = 48
MAX_PARAMS = 4_000_000

# config attributes set to a tiny value when the config has them (after attribute_map aliases)
_TINY = {
    # widths
    "hidden_size": WIDTH, "n_embd": WIDTH, "d_model": WIDTH, "embed_dim": WIDTH, "dim": WIDTH, "n_embed": WIDTH,
    "word_embed_proj_dim": WIDTH, "embedding_size": WIDTH, "hidden_dim": WIDTH, "d_embed": WIDTH,
    # feed-forward widths
    "intermediate_size": FFN, "ffn_dim": FFN, "n_inner": FFN, "decoder_ffn_dim": FFN, "encoder_ffn_dim": FFN,
    "moe_intermediate_size": 24, "shared_expert_intermediate_size": 24, "expert_intermediate_size": 24,
    "ffn_hidden_size": FFN, "d_ff": FFN, "dff": FFN, "d_inner": FFN, "mlp_dim": FFN, "ffn_size": FFN,
    # depth
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "decoder_layers": LAYERS,
    "encoder_layers": LAYERS, "n_layers": LAYERS,
    # heads
    "num_attention_heads": HEADS, "n_head": HEADS, "decoder_attention_heads": HEADS,
    "encoder_attention_heads": HEADS, "n_heads": HEADS, "num_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "n_kv_heads": KV_HEADS, "num_kv_heads": KV_HEADS, "multi_query_group_num": KV_HEADS,
    "head_dim": 8, "kv_channels": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 16, "attention_head_dim": 8,
    # mixtures of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_routed_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2, "n_group": 1, "topk_group": 1,
    "n_shared_experts": 1, "num_shared_experts": 1,
    # lengths and vocabulary
    "vocab_size": V, "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64, "max_seq_len": 64,
    "sliding_window": 8, "max_window_layers": LAYERS, "rotary_dim": 4,
    "vocab_size_per_layer_input": V, "hidden_size_per_layer_input": 8,
}
_TOKEN_IDS = {"pad_token_id": 2, "bos_token_id": 1, "eos_token_id": 0, "decoder_start_token_id": 1,
              "sep_token_id": 0, "cls_token_id": 1, "mask_token_id": 0, "unk_token_id": 0}


class Unbuildable(Exception):
    """A family that cannot be built from a tiny config on a CPU (the reason is the message)."""


def causal_lm_types() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink_layer_lists(cfg, n_layers: int) -> None:
    """Per-layer lists (layer_types, mlp_only_layers...) cut or cycled to the tiny depth."""
    for key, val in list(vars(cfg).items()):
        if isinstance(val, list) and len(val) > n_layers and key.endswith(("layer_types", "_pattern", "layers_block_type",
                                                                          "block_types", "attn_layer_indices")):
            kinds = list(dict.fromkeys(val))  # keep every kind of layer when the list allows it
            new = (kinds + val)[:n_layers] if len(kinds) <= n_layers else val[:n_layers]
            with contextlib.suppress(Exception):
                setattr(cfg, key, new)


def tiny_config(model_type: str, tied: bool | None = None):
    from transformers import CONFIG_MAPPING, PretrainedConfig

    if model_type not in CONFIG_MAPPING:
        raise Unbuildable(f"no config class for {model_type!r}")
    cfg_cls = CONFIG_MAPPING[model_type]
    try:
        base = cfg_cls()
    except Exception as e:  # noqa: BLE001
        raise Unbuildable(f"{cfg_cls.__name__}() fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}") from e
    text_cfg = getattr(base, "text_config", None)
    if text_cfg is not None and hasattr(base, "vision_config"):
        raise Unbuildable("multimodal model (vision inputs); its text-only causal LM has its own entry if it has one")
    kwargs = {}
    present = set(vars(base)) | set(getattr(cfg_cls, "attribute_map", {}))
    for k, v in _TINY.items():
        if k in present:
            kwargs[k] = v
    for k, v in _TOKEN_IDS.items():
        if k in present:
            kwargs[k] = v
    if "kv_lora_rank" in present:  # multi-head latent attention: keys and values have every head
        kwargs["num_key_value_heads"] = HEADS
    kwargs["tie_word_embeddings"] = bool(getattr(base, "tie_word_embeddings", False)) if tied is None else tied
    try:
        cfg = cfg_cls(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise Unbuildable(f"tiny {cfg_cls.__name__} fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}") from e
    _shrink_layer_lists(cfg, LAYERS)
    for key, sub in list(vars(cfg).items()):  # nested sub-configs (a patcher, a global transformer...)
        if isinstance(sub, PretrainedConfig) and key != "text_config":
            present = set(vars(sub)) | set(getattr(type(sub), "attribute_map", {}))
            for k, v in {**_TINY, **_TOKEN_IDS}.items():
                if k in present:
                    with contextlib.suppress(Exception):
                        setattr(sub, k, v)
            _shrink_layer_lists(sub, LAYERS)
    cfg._attn_implementation = "eager"
    with contextlib.suppress(Exception):
        cfg.use_cache = False
    for key in ("hidden_dropout", "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "dropout"):
        if isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.1)  # dropout on: the engine must switch it off while scoring
    return cfg


def tiny_model(model_type: str, seed: int = 0, tied: bool | None = None) -> nn.Module:
    import transformers

    name = causal_lm_types()[model_type]
    cls = getattr(transformers, name, None)
    if cls is None:
        raise Unbuildable(f"{name} is not importable from transformers")
    cfg = tiny_config(model_type, tied)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                size = sum(p.numel() for p in cls(cfg).parameters())
        except Exception:  # noqa: BLE001 - built for real below, which reports the error
            size = 0
    if size > MAX_PARAMS:
        raise Unbuildable(f"the config does not shrink generically ({size / 1e6:.0f}M parameters at tiny sizes)")
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            model = cls(cfg)
    except ImportError as e:
        raise Unbuildable(f"needs an extra package: {str(e).splitlines()[0][:160]}") from e
    except Exception as e:  # noqa: BLE001
        raise Unbuildable(f"{name}(tiny config) fails: {type(e).__name__}: {str(e).splitlines()[0][:140]}") from e
    model = model.float()
    _randomize(model)
    return model


def _randomize(model: nn.Module) -> None:
    """Random values for every parameter initialised to a constant (norm weights 1, biases 0, zero-init gates)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.numel() > 1 and float(p.float().std()) < 1e-6:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


def make_batch(seed: int = 0, B: int = 3, T: int = 9, pad_id: int = 2) -> dict[str, torch.Tensor]:
    """Right-padded samples of different lengths, a repeated token, and the pad id inside a response."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=gen)
    lengths = [T, T - 3, T - 2, 5, T - 1][:B]
    am = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for i, n in enumerate(lengths):
        am[i, :n] = 1
        labels[i, 2:n] = ids[i, 2:n]
    ids[0, 4] = ids[0, 6] = ids[0, 1]
    ids[1, 3] = pad_id
    labels[1, 3] = pad_id
    ids[am == 0] = pad_id
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def add_lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    def suffix(name: str) -> str:  # "mlp.fc1", or "ffn.0" for a Linear inside a Sequential
        parts = name.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]

    targets = sorted({suffix(n) for n, m in model.named_modules()
                      if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
                      and not n.endswith(("lm_head", "embed_out", "output"))})
    if not targets:
        raise Unbuildable("no nn.Linear layer for LoRA to adapt")
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    try:
        model = get_peft_model(model, cfg)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise Unbuildable(f"PEFT cannot add LoRA: {str(e).splitlines()[0][:160]}") from e
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@dataclass
class Outcome:
    status: str  # "exact", "exact (fallback)", "refused", "WRONG", "error", "unbuildable"
    detail: str = ""
    norm_err: float = math.nan
    grad_err: float = math.nan
    fallback: list[str] = field(default_factory=list)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def freeze_some(model: nn.Module) -> None:
    """Full fine-tuning of part of the model: the input embeddings and the first block frozen."""
    for n, p in model.named_parameters():
        if "embed" in n or ".0." in n or n.startswith(("wte", "transformer.wte")):
            p.requires_grad_(False)


def check_family(model_type: str, params: str = "all", lora: bool = False, seed: int = 0,
                 tol: float = 1e-4, tied: bool | None = None) -> Outcome:
    """Engine vs the batch-size-1 loop (G_i) and vs a fresh backward (kept gradient), on one tiny model.

    ``params="trainable"`` without LoRA freezes the input embeddings and the first block.
    """
    from gradsift.norms import GhostNormEngine, naive_grad_norms, response_losses

    try:
        model = tiny_model(model_type, seed, tied)
        if lora:
            model = add_lora(model)
        elif params == "trainable":
            freeze_some(model)
    except Unbuildable as e:
        return Outcome("unbuildable", str(e))
    batch = make_batch(seed)
    try:
        with torch.no_grad():
            model.eval()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except Exception as e:  # noqa: BLE001
        return Outcome("unbuildable", f"the model's own forward fails: {type(e).__name__}: {str(e).splitlines()[0][:140]}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with GhostNormEngine(model, params=params, keep_grads=True) as eng:
                eng.forward(batch)
                G = eng.backward()
                trainable = [p for p in model.parameters() if p.requires_grad]
                kept = torch.tensor([0, 2])
                for p in trainable:
                    p.grad = None
                eng.accumulate_grad(kept, scale=0.5)
                fast = [None if p.grad is None else p.grad.detach().clone() for p in trainable]
                fallback = [eng.param_names[id(p)] for p in eng.fallback]
    except (NotImplementedError, ValueError) as e:
        return Outcome("refused", str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001 - the model's own forward ran: an error of the engine
        return Outcome("error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    del caught
    try:
        G_ref, _ = naive_grad_norms(model, batch, params=params)
    except Exception as e:  # noqa: BLE001
        return Outcome("unbuildable", f"the model's own forward/backward fails: {type(e).__name__}: {str(e)[:120]}")
    norm_err = _rel(G, G_ref) if G.shape == G_ref.shape else math.inf
    padding_dependent = False
    if norm_err > tol:
        # is the model itself padding-dependent? the exact per-row gradients of the padded batch
        G_pad = _padded_batch_norms(model, batch, params)
        if _rel(G_pad, G_ref) > tol and _rel(G, G_pad) <= tol:
            padding_dependent, norm_err = True, _rel(G, G_pad)
    # the kept gradient against a fresh backward of the mean loss of the kept samples alone
    for p in trainable:
        p.grad = None
    model.eval()
    sub = {k: v[kept] for k, v in batch.items()}
    out = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"], use_cache=False)
    response_losses(out.logits, sub["labels"]).mean().backward()
    errs = []
    for p, f in zip(trainable, fast):
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        f = f if f is not None else torch.zeros_like(p)
        scale = max(float(ref.abs().max()), max((float(q.grad.abs().max()) for q in trainable if q.grad is not None),
                                                 default=0.0) * 1e-3, 1e-30)
        errs.append(float((f - ref).abs().max()) / scale)
    for p in trainable:
        p.grad = None
    grad_err = max(errs, default=0.0)
    ok = norm_err <= tol and grad_err <= tol
    status = ("exact (fallback)" if fallback else "exact") if ok else "WRONG"
    detail = "" if ok else f"G rel. error {norm_err:.1e}, kept-gradient rel. error {grad_err:.1e}"
    if ok and padding_dependent:
        detail = ("the model's output for a sample depends on its right padding: G_i is exact for the padded "
                  "batch (per-row reference), not equal to the unpadded batch-size-1 loop")
    return Outcome(status, detail, norm_err, grad_err, fallback)


def _padded_batch_norms(model: nn.Module, batch: dict[str, torch.Tensor], params: str) -> torch.Tensor:
    """G_i of the padded batch as the model computes it: one autograd.grad of L_i per row."""
    from gradsift.norms import response_losses

    named = [p for p in model.parameters() if params == "all" or p.requires_grad]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for p in named:
            p.requires_grad_(True)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        L = response_losses(out.logits, batch["labels"])
        G = []
        for i in range(L.shape[0]):
            gs = torch.autograd.grad(L[i], named, retain_graph=True, allow_unused=True)
            G.append(sum((g.double().pow(2).sum() for g in gs if g is not None), torch.zeros((), dtype=torch.float64)))
        return torch.stack(G).sqrt()
    finally:
        for p, f in flags:
            p.requires_grad_(f)
