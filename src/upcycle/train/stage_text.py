"""The text a stage transform reads (slim's cuts, grow's steps): calibration blocks from the train split
and held-out blocks from the validation split, as options every such transform declares the same way."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from upcycle import data
from upcycle.config import Config, option


@dataclass
class StageText(Config):
    calibration: str = option(
        "shakespeare+pystdlib", "text for statistics (train split) and the one-shot measurements (validation split)"
    )
    calibration_tokens: int = option(8192, "tokens of calibration text")
    seq_len: int = option(256, "length of the text blocks")
    held_tokens: int = option(4096, "tokens of held-out text")

    def texts(self, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibration blocks, held-out blocks)."""
        calibration = data.blocks(
            self.calibration,
            tokenizer,
            "train",
            self.seq_len,
            max_blocks=max(1, self.calibration_tokens // self.seq_len),
        )
        held = data.blocks(
            self.calibration, tokenizer, "validation", self.seq_len, max_blocks=max(1, self.held_tokens // self.seq_len)
        )
        return calibration, held
