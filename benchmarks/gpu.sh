#!/usr/bin/env bash
# GPU speed: jaxlm and the PyTorch reference back to back on the same GPU, for the ~1B
# Llama-style model and gpt-1.3b. Appends one row per model to benchmarks/results/$RESULTS
# (device_kind, model, seq_len, mfu, tokens_per_s_per_device, ratio_vs_pytorch, command,
# versions). Run from the repository root on a machine with one GPU:
#   RESULTS=h100.json bash benchmarks/gpu.sh [extra jaxlm overrides]
set -euo pipefail
RESULTS=${RESULTS:-gpu.json}
STEPS=${STEPS:-20}
PYTHON=${PYTHON:-python3}
mkdir -p benchmarks/results
for model in llama-1b gpt-1.3b; do
    reference=$(mktemp --suffix=.json)
    "$PYTHON" benchmarks/torch_reference.py --config "$model" --steps "$STEPS" "$@" \
        | tail -n 1 > "$reference"
    "$PYTHON" -m jaxlm.bench --config "$model" --mesh dp=1 --steps "$STEPS" \
        --pytorch "$reference" --out "benchmarks/results/$RESULTS" "$@"
    rm -f "$reference"
done
