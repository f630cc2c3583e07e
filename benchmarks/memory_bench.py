"""Memory of a Moderate-G_i step vs a plain LoRA step at real 7B/8B geometry, measured on a CPU.

Builds a few decoder layers of Qwen2.5-7B and Llama-3.1-8B geometry (their real hidden,
intermediate, head and vocabulary sizes; random weights; bf16; the input embedding
table is built with 4096 rows, since a lookup keeps the same bytes per token whatever
the table's size, while the output head has the real vocabulary; LoRA r=32 on every linear
layer, adapters in fp32 as PEFT keeps them), runs one batch through

* a plain LoRA step (forward in training mode, backward), and
* the Moderate-G_i scoring pass (``GhostNormEngine(params="all", keep_grads=True)``:
  forward with every parameter frozen, one backward),

and counts the bytes kept for the backward: every tensor autograd saves (saved-tensor
hooks; parameters excluded; one count per storage) and every tensor the engine holds
(its captures after the forward, what it keeps after the backward for the update;
without ``--backward``, the CPU default, the latter is computed from the LoRA layers'
output shapes instead of measured).
Bytes inside the decoder layers are divided by layers x tokens, the rest (embedding
output, final norm, logits at the response positions) by tokens; two sequence lengths
check that the per-token figures do not grow with T. The figures are then extrapolated
to the full depth for a micro-batch m and length T:

    plain    = weights + LoRA states + m*T*(layers*s_plain + o_plain)
    moderate (recompute) = weights + LoRA states + m*T*(layers*(s_saved + s_captured) + o_engine)
    moderate (reuse)     = that + the output gradients kept for the update (m*T*layers*s_kept)
                           + the window's per-sample LoRA gradients (several micro-batches)

(LoRA states: fp32 parameter, gradient and two AdamW moments = 16 bytes a parameter.)
Transient workspace (a matmul's output before it is freed, the allocator's slack) is
not counted on either side there. The largest transient, at the output head, is
measured on its own (``head_peak``: the heap's peak per response token, plain vs
scoring, with the loss in blocks and as before them).

    python benchmarks/memory_bench.py                    # both models, 1 layer, T = 32 and 64
    python benchmarks/memory_bench.py --layers 2 --seq-lens 256 512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

GEOMETRY = {
    # hidden, intermediate, heads, kv heads, vocab, full depth, tied
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, full_layers=28, tie_word_embeddings=False),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, full_layers=32, tie_word_embeddings=False),
}
GiB = 1024**3
EMBED_ROWS = 4096


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(name: str, layers: int, r: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    geo = dict(GEOMETRY[name])
    full = geo.pop("full_layers")
    model_type = geo.pop("model_type")
    vocab = geo["vocab_size"]
    # the input embedding's table does not change the bytes kept per token (a row lookup): build it
    # small, and the output head at the real vocabulary size (the logits are what cost memory)
    small = dict(geo, vocab_size=EMBED_ROWS)
    cfg = AutoConfig.for_model(model_type, num_hidden_layers=layers, max_position_embeddings=4096, **small)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    log(f"{name}: building {layers} layer(s)")
    from transformers.initialization import no_init_weights

    with no_init_weights():  # random values tiled from one small block: bytes, not statistics, are measured
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.lm_head = torch.nn.Linear(geo["hidden_size"], vocab, bias=False, dtype=torch.bfloat16)
        model.config.vocab_size = vocab
    block = torch.randn(1 << 20, dtype=torch.bfloat16) * 0.02
    with torch.no_grad():
        for n, p in model.named_parameters():
            flat = p.view(-1)
            if "norm" in n:
                flat.fill_(1.0)
                continue
            for s in range(0, flat.numel(), block.numel()):
                part = flat[s : s + block.numel()]
                part.copy_(block[: part.numel()])
    if torch.cuda.is_available():
        model.to("cuda")
    log(f"{name}: built")
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    with torch.device("meta"):
        full_cfg = AutoConfig.for_model(model_type, num_hidden_layers=full, max_position_embeddings=4096, **geo)
        n_full = sum(p.numel() for p in AutoModelForCausalLM.from_config(full_cfg).parameters())
    return model, full, n_full


class Where:
    """Which part of the model is running: 'layer' inside a decoder layer, else 'outside'."""

    def __init__(self, model):
        self.depth = 0
        self.handles = []
        for name, m in model.named_modules():
            if name.endswith(tuple(f"layers.{i}" for i in range(256))):
                self.handles.append(m.register_forward_pre_hook(self._enter))
                self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, *a):
        self.depth += 1

    def _leave(self, *a):
        self.depth -= 1

    @property
    def now(self) -> str:
        return "layer" if self.depth > 0 else "outside"

    def close(self):
        for h in self.handles:
            h.remove()


class SavedBytes:
    """Bytes of the tensors autograd saves for the backward, one count per storage, parameters excluded."""

    def __init__(self, model, where: Where):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.where = where
        self.seen: dict[int, tuple[int, str]] = {}

    def pack(self, t):
        s = t.untyped_storage()
        key = s.data_ptr()
        if key and key not in self.params and key not in self.seen:
            self.seen[key] = (s.nbytes(), self.where.now)
        return t

    def totals(self) -> dict[str, int]:
        out = {"layer": 0, "outside": 0}
        for nbytes, where in self.seen.values():
            out[where] += nbytes
        return out

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def engine_bytes(engine, names: dict, exclude: set[int] | None = None) -> dict[str, int]:
    """Bytes of every tensor the engine holds (captures, kept output gradients), by part of the model."""
    out = {"layer": 0, "outside": 0}
    seen = set(exclude or ())

    def add(t, where):
        if not torch.is_tensor(t):
            if isinstance(t, dict):
                for v in t.values():
                    add(v, where)
            elif isinstance(t, (list, tuple)):
                for v in t:
                    add(v, where)
            return
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            return
        seen.add(s.data_ptr())
        out[where] += s.nbytes()

    for g in engine.groups:
        where = "layer" if ".layers." in names.get(g.modules[0], "") else "outside"
        for c in g.all_calls():
            add(c.ctx, where)
            add(c.grad, where)
            add(c.extra, where)
        add(getattr(g, "_head", None), where)
    cache = getattr(engine, "_gram_cache", None)
    if cache is not None:
        for v in vars(cache).values():
            add(v, "layer")
    return out


def batch_of(vocab: int, B: int, T: int, response: float = 0.5):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, : int(T * (1 - response))] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def lora_rows_from_shapes(model) -> int:
    """Bytes of one sample's per-sample LoRA gradient row (fp32, every trainable parameter)."""
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


def measure(model, B: int, T: int, backward: bool) -> dict[str, float]:
    """Per-token bytes of a plain LoRA step and of the Moderate-G_i scoring pass.

    The scoring pass is measured in steady state: a first forward and backward (on a short
    batch) proves the plan, as the first micro-batch of a run does, and the measured pass
    is the next one. Its bytes are the union (by storage) of what autograd saved and what
    the engine captured.
    """
    from gradsift.losses import causal_lm_losses
    from gradsift.norms import GhostNormEngine

    vocab = model.get_input_embeddings().num_embeddings  # token ids within the (small) input table
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch_of(vocab, B, T).items()}
    names = {m: n for n, m in model.named_modules()}
    where = Where(model)
    try:
        # plain LoRA step: training-mode forward with the adapters trainable
        model.train()
        saved = SavedBytes(model, where)
        t0 = time.perf_counter()
        with saved.hooks():
            L, _ = causal_lm_losses(model, batch)
        log(f"T={T}: plain forward done")
        plain = saved.totals()  # what the forward saved for the backward: the plain step's activation memory
        if backward:
            L.mean().backward()
            log(f"T={T}: plain backward done")
        t_plain = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        del L

        engine = GhostNormEngine(model, params="all", keep_grads=True, verify=False)
        try:
            first = batch_of(vocab, 1, 8)
            engine.forward({k: v.to(device) for k, v in first.items()})
            engine.backward()
            engine.clear()
            log(f"T={T}: first (proving) scoring pass done")
            saved = SavedBytes(model, where)
            t0 = time.perf_counter()
            with saved.hooks():
                engine.forward(batch)
            eng_saved = saved.totals()
            log(f"T={T}: scoring forward done")
            captured = engine_bytes(engine, names, exclude=set(saved.seen))
            rows = lora_rows_from_shapes(model) * B
            if backward:
                engine.backward()
                kept = engine_bytes(engine, names)
                rows_measured = sum(t.numel() * t.element_size()
                                    for t in engine.per_sample_grads().values())
                log(f"T={T}: scoring backward done")
            else:
                kept = {"layer": 0, "outside": 0}
                rows_measured = None
            t_engine = time.perf_counter() - t0
        finally:
            engine.close()
    finally:
        where.close()
    layers = model.config.num_hidden_layers
    tokens = B * T
    per_layer = lambda d: d["layer"] / (layers * tokens)  # noqa: E731
    per_tok = lambda d: d["outside"] / tokens  # noqa: E731
    return {
        "T": T, "B": B,
        "plain_layer": per_layer(plain), "plain_outside": per_tok(plain),
        "engine_saved_layer": per_layer(eng_saved), "engine_saved_outside": per_tok(eng_saved),
        "captured_layer": per_layer(captured), "captured_outside": per_tok(captured),
        "kept_after_backward_layer": per_layer(kept), "kept_after_backward_outside": per_tok(kept),
        "lora_rows_bytes_per_sample": rows / B, "lora_rows_measured_per_sample": (rows_measured / B if rows_measured else None),
        "seconds_plain": t_plain, "seconds_engine": t_engine, "backward_measured": backward,
    }


class _HeapPeak(TorchDispatchMode):
    """The most heap bytes in use (glibc's mallinfo2, main arena plus mmapped blocks) after any op, above a base.

    As a dispatch mode it reads the allocator after every op of the forward and the backward,
    so transient tensors (an fp32 copy of the logits, their gradient) are counted, not only the
    ones kept for the backward; an op's internal scratch that it frees before returning is not.
    """

    def __init__(self):
        import ctypes

        super().__init__()

        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
        self._info = libc.mallinfo2
        self.base = self.peak = 0

    def in_use(self) -> int:
        m = self._info()
        return m.uordblks + m.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use() - self.base)
        return out

    def run(self, fn) -> int:
        import gc

        gc.collect()
        self.base, self.peak = self.in_use(), 0
        with self:
            fn()
        return self.peak


def head_peak(name: str, blocks: list[int], hidden: int = 16, repeats: int = 2) -> dict:
    """Peak heap bytes, per response token, of the loss at the real output head: plain step vs scoring pass.

    A model with no decoder layer (embedding, final norm, a ``hidden`` x V head in bf16, V
    the model's real vocabulary) runs a batch of one sample whose response is ``blocks`` times
    the cross-entropy's rows per block long (whole blocks, so that the per-token slope between
    two lengths is not moved by a partial block); the
    plain step backpropagates to the hidden states (as through the layers of a LoRA step),
    the scoring pass is ``GhostNormEngine(params="all")`` (the head's G_i from its output
    gradient). Each side is measured as shipped (the cross-entropy and the head's Gram in
    fp32 blocks) and as before the blocks (``F.cross_entropy`` on an fp32 copy of the
    logits; the logits' gradient upcast whole), in one run. Two lengths give the per-token
    slope (the blocks add a constant). The hidden size is small because one of the head's
    two bf16 matmul layouts runs at ~0.1 GFLOP/s on a CPU without bf16 instructions (418 s
    for one 32 x 3584 x 152064 product here); the peak is made of (tokens x V) tensors,
    and the hidden-sized ones it leaves out are a few times d bytes a token on both sides.
    """
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    import gradsift.losses as losses
    import gradsift.norms.rules.linear as linear
    from gradsift.losses import causal_lm_losses
    from gradsift.norms import GhostNormEngine

    geo = dict(GEOMETRY[name])
    geo.pop("full_layers")
    model_type = geo.pop("model_type")
    vocab = geo["vocab_size"]
    cfg = AutoConfig.for_model(model_type, num_hidden_layers=0, max_position_embeddings=4096,
                               **dict(geo, vocab_size=EMBED_ROWS, hidden_size=hidden, num_attention_heads=1,
                                      num_key_value_heads=1))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.lm_head = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.bfloat16)
        model.config.vocab_size = vocab
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.requires_grad_(False)
    model.enable_input_require_grads()  # the plain step's backward reaches the hidden states
    peak = _HeapPeak()

    def whole_ce(logits, target):  # the loss before the blocks
        return F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="none")

    def plain(batch):
        L, out = causal_lm_losses(model, batch)
        del out
        L.mean().backward()

    def scoring(batch):
        # the head's rule as at the real hidden size: the Gram form (auto picks it there below ~3,500 tokens a
        # sample; at hidden size 16 it would form the per-sample gradients instead)
        saved_mode, linear.LinearRule.mode = linear.LinearRule.mode, "ghost"
        try:
            with GhostNormEngine(model, params="all") as eng:
                eng.forward(batch)
                eng.backward()
        finally:
            linear.LinearRule.mode = saved_mode

    rows = max(1, losses.LOSS_CHUNK_ELEMENTS // vocab)
    tokens = [n * rows for n in blocks]
    out = {"response_tokens": tokens}
    for variant in ("before", "now"):
        for side, fn in (("plain", plain), ("scoring", scoring)):
            per_T = []
            for K in tokens:
                T = 2 * K
                b = batch_of(EMBED_ROWS, 1, T)
                b["labels"][:, : T - K] = -100
                saved_ce, saved_chunk = losses.token_cross_entropy, linear.GRAM_CHUNK_ELEMENTS
                if variant == "before":
                    losses.token_cross_entropy, linear.GRAM_CHUNK_ELEMENTS = whole_ce, 1 << 62
                try:
                    per_T.append(min(peak.run(lambda: fn(b)) for _ in range(repeats)))
                finally:
                    losses.token_cross_entropy, linear.GRAM_CHUNK_ELEMENTS = saved_ce, saved_chunk
            slope = (per_T[-1] - per_T[0]) / (tokens[-1] - tokens[0])
            out[f"{side}_{variant}"] = {"peaks": per_T, "bytes_per_token": slope,
                                        "bytes_per_logit": slope / vocab}
            log(f"{name} head, {side} {variant}: peaks {[round(p / 2**20) for p in per_T]} MiB, "
                f"{slope / 1024:.0f} KiB per response token ({slope / vocab:.2f} bytes a logit)")
    return out


def extrapolate(m: dict, n_full: int, lora_full: int, layers: int, micro: int, T: int, window: int) -> dict:
    tokens = micro * T
    weights = n_full * 2
    states = lora_full * 16
    plain = weights + states + tokens * (layers * m["plain_layer"] + m["plain_outside"])
    # the scoring pass of one micro-batch: what autograd saved (every parameter frozen) and the captures
    scoring = (weights + states
               + tokens * (layers * (m["engine_saved_layer"] + m["captured_layer"])
                           + m["engine_saved_outside"] + m["captured_outside"]))
    # recompute: the scoring passes keep nothing between micro-batches; the second pass is a plain step on
    # micro-batches of kept rows
    recompute = max(scoring, plain)
    # reuse: every scored row's per-sample LoRA gradient until the optimizer batch is complete
    reuse = scoring + window * lora_full * 4 if window > micro else scoring
    return {"plain_GiB": plain / GiB, "moderate_recompute_GiB": recompute / GiB,
            "moderate_reuse_GiB": reuse / GiB, "ratio_recompute": recompute / plain,
            "ratio_reuse": reuse / plain, "weights_GiB": weights / GiB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(GEOMETRY), choices=list(GEOMETRY))
    ap.add_argument("--layers", type=int, default=1, help="decoder layers built (the full depth is extrapolated)")
    ap.add_argument("--seq-lens", type=int, nargs=2, default=[32, 64])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    ap.add_argument("--target-len", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--window", type=int, default=32, help="samples per optimizer step (the paper's 32)")
    ap.add_argument("--head-blocks", type=int, nargs="*", default=[2, 4],
                    help="response lengths, in cross-entropy blocks, for the output head's transient peak "
                         "(two; none to skip)")
    ap.add_argument("--head-hidden", type=int, default=16, help="hidden size of the head-only model")
    ap.add_argument("--json", default=None)
    ap.add_argument("--backward", action=argparse.BooleanOptionalAction, default=None,
                    help="run the backward passes too (default: on a GPU only). Without it the engine's kept "
                         "output gradients are computed from the layer shapes; bf16 backward matmuls run ~25x "
                         "slower than the forward on a CPU without AVX-512")
    args = ap.parse_args()
    from gradsift.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_grad_enabled(True)
    report = {}
    for name in args.models:
        head = head_peak(name, args.head_blocks, args.head_hidden) if len(args.head_blocks) >= 2 else None
        model, full, n_full = build(name, args.layers, args.lora_r)
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        lora_full = lora // args.layers * full
        backward = args.backward if args.backward is not None else torch.cuda.is_available()
        runs = [measure(model, args.batch, T, backward) for T in args.seq_lens]
        del model
        m = runs[-1]
        rows = []
        for T in args.target_len:
            for micro in args.micro:
                rows.append({"micro": micro, "T": T, **extrapolate(m, n_full, lora_full, full, micro, T, args.window)})
        report[name] = {"layers_built": args.layers, "full_layers": full, "params_full": n_full,
                        "lora_params_full": lora_full, "per_token": runs, "extrapolated": rows, "head_peak": head}
        print(f"\n== {name}: {full} layers, {n_full / 1e9:.2f}B parameters, LoRA r={args.lora_r}: "
              f"{lora_full / 1e6:.1f}M")
        print("bytes per token per layer    " + "  ".join(f"T={r['T']:>5}" for r in runs))
        for key in ("plain_layer", "engine_saved_layer", "captured_layer", "kept_after_backward_layer"):
            print(f"  {key:<26} " + "  ".join(f"{r[key]:>7.0f}" for r in runs))
        print("bytes per token outside the layers")
        for key in ("plain_outside", "engine_saved_outside", "captured_outside", "kept_after_backward_outside"):
            print(f"  {key:<26} " + "  ".join(f"{r[key]:>7.0f}" for r in runs))
        if head:
            print("transient peak at the output head, bytes per response token (before the blocks / now)")
            for side in ("plain", "scoring"):
                b, n = head[side + "_before"], head[side + "_now"]
                print(f"  {side:<26} {b['bytes_per_token']:>9.0f} / {n['bytes_per_token']:>9.0f}   "
                      f"({b['bytes_per_logit']:.2f} / {n['bytes_per_logit']:.2f} bytes a logit; peaks "
                      f"{[round(p / 2**20) for p in b['peaks']]} / {[round(p / 2**20) for p in n['peaks']]} MiB "
                      f"at {head['response_tokens']} tokens)")
        r = runs[-1]
        measured = r["lora_rows_measured_per_sample"]
        print(f"per-sample LoRA gradient row: {r['lora_rows_bytes_per_sample'] / 2**20:.1f} MiB per layer built"
              + (f" (measured after the backward: {measured / 2**20:.1f} MiB)" if measured else "")
              + f"; {lora_full * 4 / GiB:.2f} GiB per sample at full depth")
        print(f"{'micro':>5} {'T':>5} {'plain GiB':>10} {'Moderate (recompute)':>21} {'ratio':>6} "
              f"{'Moderate (reuse, window ' + str(args.window) + ')':>30} {'ratio':>6}")
        for r in rows:
            print(f"{r['micro']:>5} {r['T']:>5} {r['plain_GiB']:>10.1f} {r['moderate_recompute_GiB']:>21.1f} "
                  f"{r['ratio_recompute']:>6.2f} {r['moderate_reuse_GiB']:>30.1f} {r['ratio_reuse']:>6.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
