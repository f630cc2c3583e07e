"""Batched vs one-by-one greedy generation on the embedded model (one run, both sides).

    python benchmarks/eval_bench.py [--n 32] [--max-new-tokens 64] [--batch-size 16] [--data PATH]

Generates the same N AdvBench prompts twice with :class:`gradsift.eval.generation.HFGenerator`:
once in batches (sorted by length, left-padded) and once one prompt at a time, and
prints prompts/s for both and the speed-up. Also reports how many responses are
identical (greedy decoding: all of them, up to floating-point near-ties).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from gradsift.eval.generation import GenerationConfig, HFGenerator
from gradsift.eval.safety import load_safety_set
from gradsift.models import load_model, load_tokenizer

DEFAULT_DATA = Path(os.environ.get("GRADSIFT_SHARED_DATA", "/work/shared/data")) / "advbench" / "harmful_behaviors.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="AdvBench CSV (or any safety set)")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = [item["prompt"] for item in load_safety_set(args.data)[: args.n]]
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32")

    def run(batch_size: int) -> tuple[list[str], float]:
        gen = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch_size))
        gen.generate(prompts[:2], progress=False)  # warm-up
        start = time.perf_counter()
        out = gen.generate(prompts, progress=False)
        return out, time.perf_counter() - start

    batched, t_batched = run(args.batch_size)
    single, t_single = run(1)
    same = sum(a == b for a, b in zip(batched, single))
    print(f"model={args.model} n={len(prompts)} max_new_tokens={args.max_new_tokens} "
          f"batch_size={args.batch_size} threads={torch.get_num_threads()}")
    print(f"one-by-one : {len(prompts) / t_single:7.2f} prompts/s ({t_single:.1f} s)")
    print(f"batched    : {len(prompts) / t_batched:7.2f} prompts/s ({t_batched:.1f} s)")
    print(f"speed-up   : {t_single / t_batched:.2f}x   identical responses: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
