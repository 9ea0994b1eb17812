#!/usr/bin/env bash
# Create (once) a private virtual environment holding the peer tool llm-compressor
# (PyPI: llmcompressor) with a CPU build of torch, beside -- never inside --
# prunescope's own .venv.  Re-runs are instant thanks to a stamp file.
#
#   bash benchmarks/peers/llmcompressor_env.sh      # prints the venv's python path
#
# Environment overrides:
#   LLMC_VENV      venv folder        (default: runs/peers/llmcompressor/.venv)
#   LLMC_VERSION   llmcompressor pin  (default: 0.14.0.1)
#   LLMC_TORCH     torch pin          (default: 2.13.0; must satisfy llmcompressor's
#                                      own torch range, 0.14.0.1 wants >=2.10,<=2.14.0)
#   PYTHON         interpreter used to create the venv (default: python3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${LLMC_VENV:-$root/runs/peers/llmcompressor/.venv}"
llmc_version="${LLMC_VERSION:-0.14.0.1}"
torch_version="${LLMC_TORCH:-2.13.0}"
python="${PYTHON:-python3}"
stamp="$venv/.llmcompressor-installed"
want="llmcompressor==$llmc_version torch==$torch_version"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
    echo "$venv/bin/python"
    exit 0
fi

log() { echo "[llmcompressor_env] $*" >&2; }

if [[ ! -x "$venv/bin/python" ]]; then
    log "creating venv at $venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# Our own constraints file replaces any global one (PIP_CONSTRAINT overrides pip.conf's
# global.constraint).  Pinning torch here keeps pip from ever swapping the CPU build for
# a multi-GB CUDA build while it resolves llmcompressor's requirements.
cons="$venv/peer-constraints.txt"
printf 'torch==%s\n' "$torch_version" >"$cons"
export PIP_CONSTRAINT="$cons"

# 1. CPU torch, asked for by its local label "+cpu" so that only CPU builds can match:
#    first from pip's configured find-links / local indexes, then from the PyTorch CPU
#    index.  Plain PyPI is never used for torch (on Linux it serves the CUDA build).
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$torch_version' else 1)" 2>/dev/null; then
    log "installing CPU torch $torch_version"
    "${pip[@]}" install -q "torch==$torch_version+cpu" 2>/dev/null \
        || "${pip[@]}" install -q --retries 1 --timeout 30 "torch==$torch_version+cpu" \
            --extra-index-url https://download.pytorch.org/whl/cpu \
        || { log "ERROR: no CPU wheel torch==$torch_version+cpu in pip's find-links or the" \
                 "PyTorch CPU index; put one in a find-links folder or set LLMC_TORCH"; exit 1; }
fi
if "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
    log "ERROR: a CUDA torch build got installed; remove $venv and retry"
    exit 1
fi

# 2. llmcompressor and everything it needs (torch is held by the constraint above).
log "installing llmcompressor $llmc_version"
"${pip[@]}" install -q "llmcompressor==$llmc_version"

# 3. Smoke import, then stamp.
"$venv/bin/python" - <<'PY' >&2
import importlib.metadata as md
import torch
assert not torch.version.cuda, "CUDA torch in peer venv"
import llmcompressor  # noqa: F401
from llmcompressor.modifiers.pruning import WandaPruningModifier  # noqa: F401
from llmcompressor.modifiers.pruning import SparseGPTModifier  # noqa: F401
for p in ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets", "accelerate"):
    print(f"[llmcompressor_env] {p} {md.version(p)}")
PY
echo "$want" >"$stamp"
echo "$venv/bin/python"
