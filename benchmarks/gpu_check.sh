#!/usr/bin/env bash
# The GPU check: one H100/H200, no internet, under 8 minutes. Prints
#   1. ghost vs naive per-sample-norm throughput at B=32 (the embedded SmolLM2-135M; target >= 8x),
#   2. the Moderate-G_i step vs a plain LoRA step at the paper's shapes: Qwen2.5-7B geometry
#      (random weights, bf16), LoRA r=32 on all linear layers, 32 samples per optimizer step as
#      8 micro-batches of 4, T=1024 (target <= 1.1x), with both peak memories (80 GB target),
#   3. the memory model of benchmarks/memory_bench.py at the same shapes, for comparison.
# Results also land in $OUT (default gpu_check_out/) as JSON.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, with the project's venv
#   PYTHON=/path/to/python OUT=/tmp/gc bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
start=$(date +%s)

"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
PY

echo "== 1. per-sample gradient norms, ghost vs naive loop, B=32 T=256 (embedded SmolLM2-135M)"
timeout 200 "$PY" benchmarks/score_bench.py --model embedded --batch-size 32 --seq-len 256 --rounds 3 \
    --device cuda --skip vmap opacus --json "$OUT/score.json" || echo "score_bench failed or timed out (rc=$?)"

echo "== 2. Moderate-G_i step vs plain LoRA step, Qwen2.5-7B geometry, bf16, 32 = 8 x 4, T=1024"
timeout 330 "$PY" benchmarks/step_bench.py --geometry qwen2.5-7b --dtype bf16 --lora-r 32 --batch-size 32 \
    --micro-batch 4 --seq-len 1024 --rounds 2 --skip-naive --stage-batches 0 --json "$OUT/step.json" \
    || echo "step_bench failed or timed out (rc=$?)"

echo "== 3. memory model at the same shapes (2 layers built, extrapolated to 28)"
timeout 90 "$PY" benchmarks/memory_bench.py --models qwen2.5-7b --layers 2 --seq-lens 256 512 --micro 4 8 \
    --target-len 1024 --json "$OUT/memory.json" || echo "memory_bench failed or timed out (rc=$?)"

echo "== done in $(( $(date +%s) - start )) s; JSON in $OUT/"
