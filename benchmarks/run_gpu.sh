#!/usr/bin/env bash
# Figure 3 setting on a GPU: ViT-B/16, batch 16, AMP (fp16 autocast + GradScaler), 224px.
# VPT uses the paper's prompt counts (200 shallow, 50 deep) by default.
set -euo pipefail
cd "$(dirname "$0")/.."
ssf-deploy bench --method all --model vit_base_patch16_224 --num-classes 100 \
  --batch-size 16 --image-size 224 --device cuda --amp --backend torch \
  --warmup "${WARMUP:-10}" --iters "${ITERS:-50}" \
  --json benchmarks/results/gpu_vit_base_b16_amp.json \
  --plot benchmarks/results/gpu_vit_base_b16_amp.png | tee benchmarks/results/gpu_vit_base_b16_amp.txt
