#!/usr/bin/env bash
# Regenerates benchmarks/results/cpu_vit_small_b16.* (ViT-S/16, batch 16, 224px, fp32, CPU):
#   .json/.png/.txt       ssf-deploy bench, every row; timings on the normal allocator, memory in
#                         separate mmap-threshold subprocesses, rows interleaved over REPEAT rounds
#   _independent.{json,txt}  benchmarks/independent_timer.py: full, ssf, frozen with no harness code
#   _targets.txt          benchmarks/targets.py: the lean-SSF targets and the gap between the two
# Run it on a quiet machine (the bench warns when it is not). ITERS/WARMUP/REPEAT can be raised.
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS="${ITERS:-5}"
WARMUP="${WARMUP:-1}"
REPEAT="${REPEAT:-3}"
PYTHON="${PYTHON:-python}"
R=benchmarks/results/cpu_vit_small_b16
"$PYTHON" -m ssf_deploy.tools bench --method all --model vit_small_patch16_224 --num-classes 100 \
  --batch-size 16 --image-size 224 --device cpu --no-amp --backend torch \
  --warmup "$WARMUP" --iters "$ITERS" --repeat "$REPEAT" \
  --out "$R.json" --plot "$R.png" | tee "$R.txt"
"$PYTHON" benchmarks/independent_timer.py --model vit_small_patch16_224 --batch-size 16 \
  --rows full,ssf,frozen --steps "$ITERS" --warmup 2 --rounds "$REPEAT" \
  --json "${R}_independent.json" | tee "${R}_independent.txt"
"$PYTHON" benchmarks/targets.py "$R.json" --independent "${R}_independent.json" \
  | tee "${R}_targets.txt" || true
