"""One module per verb: `run(model, tokenizer, config) -> Result`, the whole verb on a model in memory.

    result = upcycle.sparsify(model, tokenizer, SparsifyConfig(keep=16))
    sparse, report = result            # a Result unpacks as (model, report)

A pipeline prints nothing (progress bars go to stderr through tqdm, and `progress=False` silences
them); loading, saving and what a person reads are the command's (upcycle.commands.<verb>). The
Python call and `upcycle <verb>` run the same pipeline with the same config, so every setting has the
one default its config declares.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import torch

Report = TypeVar("Report")


@dataclass
class Result(Generic[Report]):
    """What a verb made and what it measured."""

    model: torch.nn.Module
    report: Report

    def __iter__(self):  # `model, report = upcycle.<verb>(...)`
        yield self.model
        yield self.report


def configured(cls, config: Any, overrides: dict):
    """`config` (or the class's defaults) with `overrides` (field names) applied, checked again."""
    if config is None:
        return cls(**overrides)
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return replace(config, **overrides) if overrides else config
