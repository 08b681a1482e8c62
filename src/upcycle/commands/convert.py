"""save any loadable model as a plain Hugging Face folder (safetensors)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from upcycle import hub
from upcycle.commands import quiet_transformers
from upcycle.config import Config, RunOptions, option
from upcycle.eval import Equivalence

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ConvertConfig(Config):
    dtype: str = option("float32", "dtype of the saved weights", choices=DTYPES)


def run(
    model: str, out: str, config: ConvertConfig = ConvertConfig(), options: RunOptions = RunOptions()
) -> tuple[Path, Equivalence]:
    """Load MODEL, save it to OUT, reload what was written and compare: the conversion states
    whether it preserved the function."""
    quiet_transformers()
    hub.check_out(out, options.overwrite)
    dtype = getattr(torch, config.dtype)
    loaded, tokenizer = hub.load(model, trust_remote_code=options.trust_remote_code)
    folder, check = hub.save_verified(loaded.to(dtype), tokenizer, out, overwrite=options.overwrite)
    print(f"saved {folder} ({config.dtype}); reloaded: {check.summary()}")
    return folder, check
