#!/usr/bin/env bash
# On a GPU machine, from a fresh clone: set-up as in the README, then the tests that need a CUDA
# device (marked `gpu`; they skip elsewhere), then short GPU runs of the two LLM benchmarks in
# bfloat16 (WikiText-2 protocol, 8,192 evaluation tokens) and of the offload benchmark (a random
# TinyLlama-shaped checkpoint, offloaded against in memory: pruning, and one step of the edit fit).
# Results go to runs/gpu-check/.
# A GPU machine may need a CUDA build of torch: PRUNESCOPE_TORCH='torch' bash scripts/gpu-check.sh
# Tests only: GPU_CHECK_BENCH=0 bash scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -n "${PRUNESCOPE_TORCH:-}" ]; then
  .venv/bin/pip install -q --disable-pip-version-check "$PRUNESCOPE_TORCH"
fi
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.cuda.get_device_name(0))"
.venv/bin/python -m pytest -m gpu -v -rs
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
  mkdir -p runs/gpu-check
  .venv/bin/python benchmarks/bench_llm_prune.py --device cuda --dtype bfloat16 --methods wanda,sparsegpt \
    --patterns 0.5,2:4 --eval-tokens 8192 --json runs/gpu-check/bench_llm_prune.json
  .venv/bin/python benchmarks/bench_shrink.py --device cuda --dtype bfloat16 --eval-tokens 8192 \
    --rows mlp1152:flap:lstsq,mlp1152:wanda-sp:lstsq,mlp1152-kv2:flap:lstsq --no-sparsegpt \
    --workdir runs/gpu-check/models --json runs/gpu-check/bench_shrink.json
  .venv/bin/python benchmarks/bench_offload.py --device cuda --dtype bfloat16 --work runs/gpu-check/offload \
    | tee runs/gpu-check/bench_offload.md
  .venv/bin/python benchmarks/bench_edit_offload.py --device cuda --dtype bfloat16 --work runs/gpu-check/edit-offload \
    | tee runs/gpu-check/bench_edit_offload.md
fi
