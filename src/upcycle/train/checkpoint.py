"""Checkpoints a crash cannot damage.

A checkpoint is a folder `checkpoints/step-NNNNNN/` holding model.safetensors, trainer_state.pt
(optimizer, step, stage, data position, RNG) and meta.json. It is written under a temporary name
and renamed when complete; then `checkpoints/latest` (a one-line file) is replaced atomically.
A kill at any moment leaves `latest` naming a complete checkpoint. trainer_state.pt holds only
tensors and plain containers and is read with torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from upcycle.errors import UpcycleError

KEEP = 2  # complete checkpoints kept on disk


class ResumeMismatch(UpcycleError):
    """The checkpoint was written for another model or another run configuration."""


def model_fingerprint(state_dict: dict[str, torch.Tensor], model_type: str) -> str:
    shapes = sorted((k, tuple(v.shape)) for k, v in state_dict.items())
    return hashlib.sha256(json.dumps([model_type, shapes]).encode()).hexdigest()[:16]


def save(folder: Path, step: int, model_sd: dict, trainer_state: dict, meta: dict) -> Path:
    root = folder / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, aliases = _dedupe(model_sd)
    save_file(tensors, tmp / "model.safetensors", metadata={"aliases": json.dumps(aliases)})
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    older = sorted(p for p in root.glob("step-*") if p != final)
    for old in older[: max(len(older) - (KEEP - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(folder: Path) -> Path | None:
    pointer = folder / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = folder / "checkpoints" / pointer.read_text().strip()
    return path if (path / "meta.json").exists() else None


def load(path: Path):
    """(model state dict, trainer state, meta) of a complete checkpoint."""
    with safe_open(path / "model.safetensors", "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    model_sd = load_file(path / "model.safetensors")
    for alias, source in aliases.items():
        model_sd[alias] = model_sd[source]
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    return model_sd, trainer_state, meta


def _dedupe(state_dict: dict[str, torch.Tensor]):
    """safetensors refuses tensors that share memory (tied embeddings): store each once, note aliases."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, tensor in state_dict.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else (name,)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def _fsync_dir(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
