#!/usr/bin/env bash
# Both benchmarks on a CUDA GPU, written to the folder given as $1 (default benchmarks/gpu):
# the optimizer step (optimizer.json/.md) and the training step of CLIP ViT-B/16 (batch 32,
# 47 class prompts) and BERT-base (batch 8 x 128) per arm (train.json/.md/.png).
set -euo pipefail
out="${1:-benchmarks/gpu}"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
python3 -m so_tutorial.cli bench optimizer --device cuda --out "$out"
python3 -m so_tutorial.cli bench train --device cuda --out "$out"
