"""Where a run computes and in which dtype: `--device auto|cpu|cuda[:n]`, `--dtype auto|fp32|bf16|fp16`,
`--shard-size 2GB`, resolved once for every verb.

    device = resolve_device("auto")                 # a GPU if there is one, else the CPU
    dtype = resolve_dtype("auto", torch.bfloat16)   # auto: the checkpoint's own dtype
"""

from __future__ import annotations

import re

import torch

from upcycle.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch's names work too
DTYPE_CHOICES = ("auto", *DTYPES, *ALIASES)
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def check_device_name(name: str) -> None:
    if not _DEVICE.match(name):
        raise ConfigError(f"device={name!r} is not a device: auto, cpu, cuda or cuda:N")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device `name` means here; a one-line error when it names a GPU this machine lacks."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r}: no CUDA GPU is available here (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_dtype(name: str, own: torch.dtype) -> torch.dtype:
    """The dtype `name` means; `auto` is the checkpoint's own (`own`)."""
    if name == "auto":
        return own
    name = ALIASES.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def parse_size(text: str) -> int:
    """Bytes in a size like 2GB, 500MB, 1.5GiB or 123 (bytes)."""
    m = _SIZE.match(str(text).strip())
    if not m:
        raise ConfigError(f"shard_size={text!r} is not a size: e.g. 2GB, 500MB, 1GiB")
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    if size < 1:
        raise ConfigError(f"shard_size={text!r} must be at least one byte")
    return size
