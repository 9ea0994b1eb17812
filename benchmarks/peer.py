"""The peer tools' virtual environments, shared by the benchmark scripts (run as ``python
benchmarks/<script>.py``, so this folder is on ``sys.path``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

PEERS = Path(__file__).resolve().parent / "peers"


def llmcompressor_python() -> str:
    """The llm-compressor venv's python (``peers/llmcompressor_env.sh`` makes it on first use)."""
    out = subprocess.run(["bash", str(PEERS / "llmcompressor_env.sh")], check=True, capture_output=True,
                         text=True).stdout
    return out.strip().splitlines()[-1]
