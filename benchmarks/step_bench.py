"""One training step, three ways, on the same batch: Moderate-G_i, plain SFT, naive Moderate-G_i.

* plain: the standard step of GradsiftTrainer (mean per-sample loss, backward, AdamW);
* moderate: GradsiftTrainer's Moderate-G_i step (one forward, one backward with the
  norm hooks, selection, the kept gradient rebuilt from that pass, AdamW);
* naive: per-sample backward passes for G_i (the paper's implementation), then a
  fresh forward/backward on the kept samples, AdamW.

Then a whole stage end to end (Trainer.train over the same data) with the standard
and the Moderate-G_i method. Rounds are interleaved; the script prints medians
and ratios (absolute times on a shared machine are noise).

    python benchmarks/step_bench.py                       # SmolLM2-135M + LoRA r=16, B=32, T=128
    python benchmarks/step_bench.py --model random-small --batch-size 32
    python benchmarks/step_bench.py --model embedded-aligned --task yesno --batch-size 16 --seq-len 256
                                      # the demo's batches: real samples of a built-in task
    python benchmarks/step_bench.py --batch-size 32 --micro-batch 8
                                      # selection over the optimizer batch: 4 micro-batches of 8, pooled
    python benchmarks/step_bench.py --geometry qwen2.5-7b --dtype bf16 --batch-size 32 --micro-batch 4 \
        --seq-len 1024 --lora-r 32 --skip-naive --stage-batches 0      # the paper's shapes (a GPU)

With ``--micro-batch m`` every side runs the optimizer batch as B/m accumulated
micro-batches (the Trainer's loop, sync on the last one); the Moderate-G_i sides then
select over all B samples (``moderate``: the default, ``selection_backward: auto``, which keeps
per-sample LoRA gradients per micro-batch when they fit; ``moderate_recompute``: a second
forward/backward of the kept rows). Each side prints the update path it took. On a GPU the peak
memory of each side is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def build(model_name: str, lora_r: int, geometry: str | None = None, layers: int | None = None,
          dtype: str = "float32"):
    from peft import LoraConfig, get_peft_model

    if geometry:  # random weights of a real model's geometry (no download)
        from transformers import AutoConfig, AutoModelForCausalLM

        from memory_bench import GEOMETRY

        geo = dict(GEOMETRY[geometry])
        full = geo.pop("full_layers")
        cfg = AutoConfig.for_model(geo.pop("model_type"), num_hidden_layers=layers or full,
                                   max_position_embeddings=4096, **geo)
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, {"bf16": "bfloat16"}.get(dtype, dtype)))
    elif model_name == "random-small":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=8192))
    else:
        from gradsift.models import load_model

        model = load_model(model_name, dtype="float32")
    return get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def features(vocab: int, n: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = T - int(torch.randint(0, T // 3, (1,), generator=g))
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        cut = int(torch.randint(length // 4, 3 * length // 4, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:], "row": i})
    return out


def make_trainer(model, method: str, feats, batch_size: int, out_dir: str, pad_id: int = 0, params: str = "all",
                 backward: str = "auto", accum: int = 1):
    from transformers import TrainingArguments

    from gradsift.data.formatting import collate
    from gradsift.train.config import MethodSettings
    from gradsift.train.trainer import GradsiftTrainer

    bf16 = torch.cuda.is_available() and next(model.parameters()).dtype == torch.bfloat16
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch_size, learning_rate=1e-4,
                             gradient_accumulation_steps=accum, bf16=bf16,
                             num_train_epochs=1, max_grad_norm=0.0, save_strategy="no", report_to="none",
                             remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                             logging_steps=1000, dataloader_num_workers=0)
    settings = MethodSettings(name=method, rho=0.2, params=params, selection_backward=backward, verify=False)
    return GradsiftTrainer(model=model, args=args, train_dataset=feats,
                           data_collator=partial(collate, pad_token_id=pad_id), method=settings)


def naive_step(model, batch, optimizer):
    from gradsift.norms import naive_grad_norms, response_losses
    from gradsift.select import moderate

    G, L = naive_grad_norms(model, batch, params="all")
    kept = moderate(G, L, rho=0.2)
    model.train()
    sub = {k: v[kept] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    out = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"], use_cache=False)
    response_losses(out.logits, sub["labels"]).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stage-batches", type=int, default=4, help="batches in the end-to-end stage")
    ap.add_argument("--task", help="real samples of this task (registry name or file) instead of random tokens; "
                    "--seq-len is then its max_length")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="run the optimizer batch as accumulated micro-batches of this size (selection over all)")
    ap.add_argument("--geometry", default=None, help="random weights of this geometry (see memory_bench.GEOMETRY)")
    ap.add_argument("--layers", type=int, default=None, help="with --geometry: decoder layers (default: full depth)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bf16"])
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                    help="tuned: gradsift.runtime.tune_cpu_allocator() as the CLI does (both sides)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.malloc == "tuned":
        from gradsift.runtime import tune_cpu_allocator

        tune_cpu_allocator()

    from gradsift.data.formatting import collate

    model = build(args.model, args.lora_r, args.geometry, args.layers, args.dtype)
    micro = args.micro_batch or args.batch_size
    if args.batch_size % micro:
        raise SystemExit(f"--micro-batch {micro} must divide --batch-size {args.batch_size}")
    accum = args.batch_size // micro
    n = args.batch_size * max(1, args.stage_batches)
    pad = 0
    if args.task:
        from gradsift.data.formatting import encode_records
        from gradsift.tasks import load_task
        from gradsift.models import load_tokenizer

        tok = load_tokenizer(args.model)
        pad = tok.pad_token_id
        task = load_task(args.task, n_train=n, n_eval=0, seed=0)
        feats = encode_records(tok, task.train[:n], args.seq_len)
    else:
        feats = features(model.config.vocab_size, n, args.seq_len)
    batch = collate(feats[: args.batch_size], pad)
    tmp = tempfile.mkdtemp()
    # the default (auto): several micro-batches keep per-sample LoRA rows when they fit, else a second pass
    trainers = {"standard": make_trainer(model, "standard", feats, micro, tmp, pad, accum=accum),
                "moderate": make_trainer(model, "moderate", feats, micro, tmp, pad, accum=accum),
                "moderate_trainable": make_trainer(model, "moderate", feats, micro, tmp, pad, params="trainable",
                                                   accum=accum)}
    if accum > 1:
        trainers["moderate_recompute"] = make_trainer(model, "moderate", feats, micro, tmp, pad,
                                                      backward="recompute", accum=accum)
    micro_batches = [collate(feats[j * micro : (j + 1) * micro], pad) for j in range(accum)]
    for t in trainers.values():
        t.create_optimizer_and_scheduler(num_training_steps=100)
    naive_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(method):
        if method == "naive":
            naive_step(model, batch, naive_opt)
            return
        t = trainers[method]
        t.current_gradient_accumulation_steps = accum
        for j, mb in enumerate(micro_batches):  # as the Trainer's loop drives them: sync on the last
            t.accelerator.gradient_state._set_sync_gradients(j == accum - 1)
            t.training_step(t.model, dict(mb))
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)

    methods = ["plain", "moderate", "moderate_trainable"] + (["moderate_recompute"] if accum > 1 else []) \
        + ([] if args.skip_naive else ["naive"])
    name = {"plain": "standard", "moderate": "moderate", "moderate_trainable": "moderate_trainable", "naive": "naive",
            "moderate_recompute": "moderate_recompute"}
    cuda = torch.cuda.is_available()
    peak = {}
    for m in methods:  # warm-up (and the peak memory of each side, on a GPU)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step(name[m])
        if cuda:
            torch.cuda.synchronize()
            peak[m] = torch.cuda.max_memory_allocated() / 2**30
    times = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(name[m])
            if cuda:
                torch.cuda.synchronize()
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    best = {m: min(v) for m, v in times.items()}  # the least disturbed round of each side

    # a whole stage, end to end, on the same data
    stage = {"standard": float("nan"), "moderate": float("nan")}
    for m in ("standard", "moderate") if args.stage_batches > 0 else ():
        t = make_trainer(model, m, feats, micro, tmp, pad, accum=accum)
        t0 = time.perf_counter()
        t.train()
        stage[m] = time.perf_counter() - t0
    res = {"model": args.model, "task": args.task, "malloc": args.malloc, "B": args.batch_size, "T": args.seq_len, "lora_r": args.lora_r,
           "threads": torch.get_num_threads(), "step_median_s": med, "step_times_s": times,
           "step_ratio_vs_plain": {m: v / med["plain"] for m, v in med.items()},
           "step_min_s": best, "step_min_ratio_vs_plain": {m: v / best["plain"] for m, v in best.items()},
           "stage_s": stage, "stage_ratio": stage["moderate"] / stage["standard"],
           "stage_batches": args.stage_batches, "micro_batch": micro, "accumulation": accum,
           "peak_GiB": peak, "geometry": args.geometry, "dtype": args.dtype,
           "update": {m: trainers[name[m]]._strategy for m in methods if name[m] in trainers}}
    data = f"task {args.task}, max_length {args.seq_len}" if args.task else f"T={args.seq_len}"
    print(f"\n== {args.geometry or args.model} + LoRA r={args.lora_r}, B={args.batch_size} "
          f"({accum} x {micro}), {data}, "
          f"{torch.get_num_threads()} threads, malloc {args.malloc}")
    for m, v in med.items():
        label = {"moderate": "moderate (G over all params)", "moderate_trainable": "moderate (G over LoRA params)",
                 "moderate_recompute": "moderate (all, second pass)"}
        mem = f"   peak {peak[m]:.1f} GiB (x{peak[m] / peak['plain']:.2f})" if m in peak else ""
        how = f"   [{res['update'][m]}]" if m in res["update"] and m != "plain" else ""
        print(f"  {label.get(m, m):<30} step {v:7.2f} s   x{v / med['plain']:.2f} of the plain step "
              f"(fastest rounds: x{best[m] / best['plain']:.2f}){mem}{how}")
    print(f"  stage of {args.stage_batches} batches: standard {stage['standard']:.1f} s, "
          f"moderate {stage['moderate']:.1f} s -> ratio {res['stage_ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
