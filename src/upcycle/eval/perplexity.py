"""Perplexity and bits per token of a causal LM on token blocks."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from upcycle.errors import check
from upcycle.eval.peak_memory import return_freed_memory


@dataclass
class Perplexity:
    """Mean next-token negative log-likelihood (nats) over `tokens` predicted tokens."""

    nll: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2)

    def as_dict(self) -> dict:
        return {**asdict(self), "ppl": self.ppl, "bits_per_token": self.bits_per_token}


@torch.no_grad()
def perplexity(
    model, blocks: torch.Tensor, *, batch_size: int = 8, progress: bool = True, desc: str = "perplexity"
) -> Perplexity:
    """Every block is scored on its own: token t is predicted from tokens < t of the same block.
    The sum runs in float64 so the result does not depend on the batch size beyond float error."""
    check(blocks.dim() == 2 and blocks.shape[1] >= 2, "blocks", tuple(blocks.shape), "a (n, seq_len >= 2) tensor")
    check(batch_size >= 1, "batch_size", batch_size, ">= 1")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total += nll.double().item()
        count += targets.numel()
    model.train(was_training)
    return_freed_memory()  # the batches' activations and logits: not to stay resident after scoring
    return Perplexity(nll=total / count, tokens=count)
