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


# llama.cpp through its Python binding, built from the sdist (about 4½ minutes on 2 cores; needs a C++
# compiler; cmake and ninja come from PyPI); no torch
LLAMACPP = ("llama-cpp-python==0.3.36",)


def peer_python(name: str = "upcycle-bench-peers", packages: tuple[str, ...] = PEERS, torch: bool = True) -> Path:
    """The environment's python, made on first use (minutes); CalledProcessError if pip fails."""
    venv = Path(tempfile.gettempdir()) / name
    if not (venv / ".installed").exists():
        pinned = f", {TORCH} pinned" if torch else ""
        print(f"installing {', '.join(packages)} into {venv} (a throwaway environment{pinned}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        if torch:
            subprocess.run(pip + [TORCH], check=True, capture_output=True, text=True)
        subprocess.run(pip + ([TORCH] if torch else []) + list(packages), check=True, capture_output=True, text=True)
        if torch:  # a peer's dependency pulls a torchvision built for another torch: its operators fail to
            # register and take transformers' imports down with them ("Could not import module 'LlamaConfig'")
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", "torchvision"],
                           check=False, capture_output=True)  # fmt: skip
        (venv / ".installed").touch()
    return venv / "bin" / "python"


def llamacpp_python() -> Path:
    return peer_python("upcycle-bench-llamacpp", LLAMACPP, torch=False)


def driver(name: str) -> str:
    return str(HERE / f"{name}.py")
