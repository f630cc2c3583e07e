"""Cost of the first-batch self-check: `gradsift score` with and without ``verify``.

Scores the same GSM8K rows with the embedded model (SmolLM2-135M-Instruct) twice
in one run, the check on and off, alternating which goes first round by round,
and prints the ratio. The check runs once per scoring run (on its first batch),
so its cost is a constant: the script also times the check itself and gives
the overhead it would be on 1000 samples when fewer were scored
(``--samples``: 1000 samples take about 15 min per side on a busy 2-core CPU).

    python benchmarks/verify_bench.py --samples 1000             # the target: < 5% of scoring 1000 samples
    python benchmarks/verify_bench.py --samples 96 --rounds 2    # quick, extrapolated to 1000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from gradsift.data import encode_records, read_records  # noqa: E402
from gradsift.norms import verify as verify_mod  # noqa: E402
from gradsift.scoring import ScoreOptions, score_features  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default=None, help="records (default: the GSM8K train copy in the shared data)")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--params", default="all")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from gradsift.models import load_model, load_tokenizer

    data = args.data
    if data is None:
        root = os.environ.get("GRADSIFT_SHARED_DATA", "/work/shared/data")
        data = os.path.join(root, "gsm8k", "train.jsonl")
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    records = read_records(data, prompt_field="question", response_field="answer", limit=args.samples)
    feats = encode_records(tok, records, args.max_length, source=str(data))
    n_tok = sum(len(f["input_ids"]) for f in feats)
    print(f"{len(feats)} samples, {n_tok} tokens, B={args.batch_size}, {args.device}, {args.dtype}, params={args.params}",
          flush=True)

    check_times: list[float] = []
    real = verify_mod.check_first_batch

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            check_times.append(time.perf_counter() - t)

    verify_mod.check_first_batch = timed

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for verify in ((False, True) if r % 2 == 0 else (True, False)):
            opts = ScoreOptions(params=args.params, batch_size=args.batch_size, max_length=args.max_length,
                                verify=verify)
            sync()
            t = time.perf_counter()
            table = score_features(model, feats, tok.pad_token_id, opts, progress=False)
            sync()
            times[verify].append(time.perf_counter() - t)
            assert len(table) == len(feats)
            print(f"round {r}: verify={verify}: {times[verify][-1]:.1f} s", flush=True)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    check = statistics.median(check_times)
    per_1000 = off / len(feats) * 1000
    out = {
        "samples": len(feats), "batch_size": args.batch_size, "device": args.device, "dtype": args.dtype,
        "params": args.params, "rounds": args.rounds, "seconds_without_verify": off, "seconds_with_verify": on,
        "ratio": on / off, "check_seconds": check, "check_share_of_run": check / off,
        "extrapolated_overhead_1000_samples": check / per_1000,
    }
    print(f"scoring {len(feats)} samples: {off:.1f} s without the check, {on:.1f} s with it: ratio {on / off:.3f}")
    print(f"the check itself: {check:.2f} s = {100 * check / off:.2f}% of this run; "
          f"on 1000 samples ({per_1000:.0f} s to score): {100 * check / per_1000:.2f}% (target < 5%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
