"""Evaluate a model on a corpus split: the function behind `upcycle eval`."""

from __future__ import annotations

from dataclasses import dataclass

from upcycle import data
from upcycle.errors import check
from upcycle.eval import Perplexity, perplexity


@dataclass
class EvalConfig:
    data: str = "shakespeare"
    split: str = "validation"
    seq_len: int = 512
    max_blocks: int | None = 32  # None: the whole split
    batch_size: int = 4
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        check(self.split in data.SPLITS, "split", self.split, f"one of {', '.join(data.SPLITS)}")
        check(self.seq_len >= 2, "seq_len", self.seq_len, "an integer >= 2")
        check(self.max_blocks is None or self.max_blocks >= 1, "max_blocks", self.max_blocks, "None or >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")


def evaluate(model, tokenizer, config: EvalConfig, *, progress: bool = True) -> Perplexity:
    blocks = data.blocks(config.data, tokenizer, config.split, config.seq_len, max_blocks=config.max_blocks,
                         val_fraction=config.val_fraction, seed=config.seed)
    return perplexity(model, blocks, batch_size=config.batch_size, progress=progress,
                      desc=f"{config.data} {config.split}")
