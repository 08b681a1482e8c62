"""Peers for side-by-side benchmarks, run in a throwaway environment outside the checkout (torch pinned
first, as the project's own setup does). The drivers in this folder run inside it; upcycle does not."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

# modelopt's Minitron plugin imports megatron-core (and, through it, transformer_engine); its FastNAS mode
# profiles with torchprofile 0.0.4 (later releases lack the module it reads)
PEERS = ("llmcompressor==0.14.0.1", "nvidia-modelopt==0.47.0", "megatron-core==0.16.1", "torchprofile==0.0.4")
TORCH = "torch==2.13.0"
HERE = Path(__file__).parent


def peer_python() -> Path:
    """The environment's python, made on first use (a few minutes); CalledProcessError if pip fails."""
    venv = Path(tempfile.gettempdir()) / "upcycle-bench-peers"
    if not (venv / ".installed").exists():
        print(f"installing {', '.join(PEERS)} into {venv} (a throwaway environment, {TORCH} pinned) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run(pip + [TORCH], check=True, capture_output=True, text=True)
        subprocess.run(pip + [TORCH, *PEERS], check=True, capture_output=True, text=True)
        (venv / ".installed").touch()
    return venv / "bin" / "python"


def driver(name: str) -> str:
    return str(HERE / f"{name}.py")
