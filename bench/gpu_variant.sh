#!/usr/bin/env bash
# GPU serving variant: TensorRT and ONNX Runtime under perf_analyzer, NVML
# utilisation, decode feed vs serve capacity. Run from the repository root with
# .venv present:  bench/gpu_variant.sh OUT_DIR [--small] [--backends DIR]
# Exits 3 with a list of what is missing when the machine has no usable GPU.
set -euo pipefail

out="${1:-${OUT:-}}"
if [[ -z "$out" ]]; then
    echo "usage: bench/gpu_variant.sh OUT_DIR [--small] [--backends DIR]" >&2
    exit 2
fi
shift || true
if [[ ! -x .venv/bin/python ]]; then
    echo "no .venv/bin/python here; run this from the repository root after 'make venv'" >&2
    exit 2
fi
# clinfer.bench.gpu checks the driver, NVML, TensorRT and Triton's backends itself.
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
exec .venv/bin/python -m clinfer.bench.gpu "$out" "$@"
