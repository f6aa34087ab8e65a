#!/usr/bin/env bash
# Regenerates benchmarks/results/cpu_vit_small_b16.{json,png} (ViT-S/16, batch 16, 224px, fp32).
# Each row runs in a fresh subprocess (the CPU default) so its peak memory is its own.
# ITERS/WARMUP can be raised on a faster or idle machine; the memory numbers do not depend on them.
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS="${ITERS:-5}"
WARMUP="${WARMUP:-1}"
ssf-deploy bench --method all --model vit_small_patch16_224 --num-classes 100 \
  --batch-size 16 --image-size 224 --device cpu --no-amp --backend torch \
  --warmup "$WARMUP" --iters "$ITERS" \
  --json benchmarks/results/cpu_vit_small_b16.json \
  --plot benchmarks/results/cpu_vit_small_b16.png | tee benchmarks/results/cpu_vit_small_b16.txt
