#!/usr/bin/env bash
# Run the tests that need a CUDA device (marked `gpu`; they skip on machines without one), on a
# GPU machine, from a fresh clone: set-up as in the README, then only those tests, verbosely.
# A GPU machine may need a CUDA build of torch: PRUNESCOPE_TORCH='torch' bash scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -n "${PRUNESCOPE_TORCH:-}" ]; then
  .venv/bin/pip install -q --disable-pip-version-check "$PRUNESCOPE_TORCH"
fi
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.cuda.get_device_name(0))"
.venv/bin/python -m pytest -m gpu -v -rs
