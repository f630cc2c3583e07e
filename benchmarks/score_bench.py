"""Per-sample gradient norms: ghost engine vs the naive loop vs torch.func vmap vs Opacus.

All sides run on the same inputs in one run, interleaved round by round, and the
script prints medians and RATIOS (absolute times on a shared machine are noise).
Peak memory is measured in a fresh subprocess per method (ru_maxrss), next to a
plain training step (forward + backward of the mean loss, weight grads included).

    python benchmarks/score_bench.py                      # SmolLM2-135M, B=8, T=128, and a small random model
    python benchmarks/score_bench.py --model embedded --batch-size 32 --seq-len 128 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from gradsift.norms import GhostNormEngine, naive_grad_norms, response_losses  # noqa: E402


def build_model(name: str, device: str):
    if name == "random-small":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=False)
        return LlamaForCausalLM(cfg).to(device)
    from gradsift.models import load_model

    return load_model(name, dtype="float32", device=device)


def make_batch(vocab: int, B: int, T: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    am = torch.ones_like(ids)
    # different lengths, right padding, response = the second half
    for i in range(B):
        n = T - (i * T) // (4 * B)
        am[i, n:] = 0
    labels = ids.clone()
    labels[:, : T // 2] = -100
    labels[am == 0] = -100
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": am, "labels": labels}.items()}


def run_ghost(model, batch):
    with GhostNormEngine(model, params="all") as eng:
        eng.forward(batch)
        return eng.backward()


def run_naive(model, batch):
    return naive_grad_norms(model, batch, params="all")[0]


def run_plain_step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    response_losses(out.logits, batch["labels"]).mean().backward()
    model.zero_grad(set_to_none=True)


def run_vmap(model, batch):
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, ids, am, labels):
        out = functional_call(model, p, (ids.unsqueeze(0),), {"attention_mask": am.unsqueeze(0), "use_cache": False})
        return response_losses(out.logits, labels.unsqueeze(0))[0]

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(params, batch["input_ids"], batch["attention_mask"],
                                                          batch["labels"])
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()


def run_opacus(model, batch):
    """Opacus ghost clipping (GradSampleModuleFastGradientClipping): per-sample norms without instantiation."""
    if getattr(model.config, "tie_word_embeddings", False):
        raise NotImplementedError("Opacus does not support tied input/output embeddings")
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model.train()  # Opacus captures activations only in training mode
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", strict=False,
                                               use_ghost_clipping=True)
    try:
        out = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        response_losses(out.logits, batch["labels"]).sum().backward()
        return gsm.get_norm_sample().detach()
    finally:
        gsm._close()
        model.eval()
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            for attr in ("_norm_sample", "grad_sample", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)


METHODS = {"ghost": run_ghost, "naive": run_naive, "vmap": run_vmap, "opacus": run_opacus, "plain_step": run_plain_step}


def peak_memory(method: str, args) -> dict:
    """Run one method in a fresh process; report peak RSS (CPU) or peak allocated (CUDA) in MiB."""
    cmd = [sys.executable, __file__, "--child", method, "--model", args.model, "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--device", args.device]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def child(args) -> None:
    model = build_model(args.model, args.device)
    batch = make_batch(model.config.vocab_size, args.batch_size, args.seq_len, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        METHODS[args.child](model, batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        print(json.dumps({"base_mib": base / 2**20, "peak_mib": peak / 2**20, "extra_mib": (peak - base) / 2**20}))
        return
    import threading

    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():  # RSS sampled every 2 ms while the method runs
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    METHODS[args.child](model, batch)
    stop.set()
    th.join()
    print(json.dumps({"base_mib": base / 2**20, "peak_mib": peak[0] / 2**20, "extra_mib": (peak[0] - base) / 2**20}))


def bench(args, model_name: str) -> dict:
    model = build_model(model_name, args.device)
    model.eval()
    batch = make_batch(model.config.vocab_size, args.batch_size, args.seq_len, args.device)
    B = args.batch_size
    ref = run_naive(model, batch)
    available, notes = {}, {}
    for name in ("ghost", "naive", "vmap", "opacus", "plain_step"):
        if name in args.skip:
            continue
        try:
            out = METHODS[name](model, batch)  # warm-up and correctness
            if out is not None and name != "naive":
                err = ((out.double().cpu() - ref.double().cpu()).abs() / ref.double().cpu()).max().item()
                notes[name] = f"max rel. err vs naive {err:.1e}"
            available[name] = METHODS[name]
        except Exception as exc:  # a method that cannot run on this model is reported, not fatal
            notes[name] = f"n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    times = {k: [] for k in available}
    for _ in range(args.rounds):
        for name, fn in available.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(model, batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": model_name, "B": B, "T": args.seq_len, "device": args.device, "threads": torch.get_num_threads(),
              "median_s": med, "samples_per_s": {k: B / v for k, v in med.items() if k != "plain_step"}, "notes": notes}
    if "naive" in med:
        result["speedup_vs_naive"] = {k: med["naive"] / v for k, v in med.items() if k not in ("naive", "plain_step")}
    if "plain_step" in med:
        result["time_vs_plain_step"] = {k: v / med["plain_step"] for k, v in med.items() if k != "plain_step"}
    if not args.no_memory:
        saved = args.model
        args.model = model_name
        mem = {k: peak_memory(k, args) for k in available}
        args.model = saved
        result["memory"] = mem
        plain = mem.get("plain_step", {}).get("peak_mib")
        if plain:
            result["peak_vs_plain_step"] = {k: m["peak_mib"] / plain for k, m in mem.items() if "peak_mib" in m}
            extra = mem["plain_step"]["extra_mib"]
            result["extra_vs_plain_step"] = {k: m["extra_mib"] / extra for k, m in mem.items() if "extra_mib" in m}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M), a path/hub id, or random-small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip", nargs="*", default=[], help="methods to skip: vmap opacus ...")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--also-small", action="store_true", help="also run the small random model")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    results = [bench(args, args.model)]
    if args.also_small:
        results.append(bench(args, "random-small"))
    for r in results:
        print(f"\n== {r['model']}  B={r['B']} T={r['T']} on {r['device']} ({r['threads']} threads)")
        for k, v in r["median_s"].items():
            extra = f"  {r['samples_per_s'][k]:.2f} samples/s" if k in r["samples_per_s"] else ""
            print(f"  {k:<11} {v:8.3f} s{extra}   {r['notes'].get(k, '')}")
        for k, v in r.get("speedup_vs_naive", {}).items():
            print(f"  speed-up of {k} over the naive loop: {v:.2f}x")
        for k, v in r.get("time_vs_plain_step", {}).items():
            print(f"  time of {k} / plain training step: {v:.2f}")
        for k, v in r.get("memory", {}).items():
            print(f"  memory {k:<11} {v}")
        for k, v in r.get("peak_vs_plain_step", {}).items():
            print(f"  peak memory {k} / plain training step: {v:.2f} (memory above the loaded model: "
                  f"{r['extra_vs_plain_step'][k]:.2f})")
        for k, v in r["notes"].items():
            if k not in r["median_s"]:
                print(f"  {k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
