#!/usr/bin/env bash
# One prepared run for a lent GPU (one call, under 8 minutes): the vLLM backend (each step's entropy
# computed inside vLLM's sampler) beside bare vLLM without log-probabilities, and the canopy
# backend, on CUDA in bfloat16, M=100 rollouts, up to 1000 new tokens, top-k 100, on
#   1. Gemma-3-270m (real weights from build/real_weights/gemma-3-270m, else its shape at random),
#   2. a random model shaped like Llama-3.1-8B (built here on the GPU: 16 GB of bfloat16),
# printing tokens/s, their ratios (benchmarks/vllm_peer.py) and peak GPU memory. vLLM is used from
# this interpreter: vllm==0.32.0 installed beside the workflow (envs/engines/vllm-cuda.yaml pins
# it; the backend refuses other releases); without it only canopy runs. Results also land in $OUT
# (the device tool's output folder) or build/bench/gpu.
#
#   bash benchmarks/gpu.sh            # PYTHON=python3.11 bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-build/bench/gpu}
mkdir -p "$OUT"
started=$SECONDS

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PYTHON" - <<'PY'
from importlib import metadata

for name in ("torch", "transformers", "vllm"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name}: not installed")
PY

if "$PYTHON" -c "import vllm" >/dev/null 2>&1; then
    # Bare vLLM without log-probabilities is the bar the backend is held to; each vLLM contender
    # starts its own engine (a minute or more with an 8B model).
    contenders=vllm-bare,vllm-backend,canopy
else
    echo "vllm does not import here: canopy alone"
    contenders=canopy
fi
common=(--device cuda --dtype bfloat16 --rollouts 100 --top-k 100 --max-new-tokens 1000 --rounds 1
    --contenders "$contenders" --vllm-python "$(command -v "$PYTHON")")

# Gemma-3-270m: 2 prompts x 100 rollouts x up to 1000 tokens per contender; where the machine has
# no copy of the real weights (the device tool carries at most 64 MiB), a random model of its
# shape does the same work per token.
if [ -f build/real_weights/gemma-3-270m/config.json ]; then
    gemma=(--models gemma)
else
    gemma=(--models random --random-shape gemma270m)
fi
timeout 180 "$PYTHON" benchmarks/vllm_peer.py "${gemma[@]}" --prompts 2 "${common[@]}" \
    --json "$OUT/gemma.json" 2>&1 | tee "$OUT/gemma.txt" | grep -v "^INFO\|^WARNING\|^(" ||
    echo "gemma: failed or timed out (status $?)"

# Llama-3.1-8B-shaped random weights: 1 prompt x 100 rollouts x 1000 tokens (rollouts of random
# weights rarely meet EOS: every one runs to the cap).
timeout $((450 - (SECONDS - started))) "$PYTHON" benchmarks/vllm_peer.py --models random \
    --random-shape llama8b --prompts 1 "${common[@]}" --json "$OUT/llama8b.json" 2>&1 |
    tee "$OUT/llama8b.txt" | grep -v "^INFO\|^WARNING\|^(" ||
    echo "llama8b: failed or timed out (status $?)"
echo "gpu.sh: $((SECONDS - started)) s"
