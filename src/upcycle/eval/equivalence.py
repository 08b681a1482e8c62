"""Do two models compute the same function? Every transform's report uses this check.

Measured on the same token blocks: the largest absolute logit difference, the mean KL divergence
KL(reference || candidate) of the next-token distributions, and how often the two agree on the
most likely next token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from upcycle.errors import ConfigError


@dataclass
class Equivalence:
    max_abs_logit: float
    mean_kl: float
    top1_agreement: float
    tokens: int
    logit_cosine: float = 1.0  # mean over positions of cos(reference logits, candidate logits)
    loss_reference: float = 0.0  # next-token cross-entropy of each model on the blocks
    loss_candidate: float = 0.0

    @property
    def loss_change(self) -> float:
        """Relative change of the next-token loss, candidate vs reference."""
        return (self.loss_candidate - self.loss_reference) / self.loss_reference if self.loss_reference else 0.0

    def preserved(self, logit_tol: float = 1e-3, kl_tol: float = 1e-6) -> bool:
        """True when the candidate computes the reference's function up to float error."""
        return self.max_abs_logit <= logit_tol and self.mean_kl <= kl_tol and self.top1_agreement == 1.0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"max |Δlogit| {self.max_abs_logit:.3g}, mean KL {self.mean_kl:.3g}, "
            f"top-1 agreement {self.top1_agreement:.4f} on {self.tokens} tokens"
        )


def kl_divergence(reference_logprobs: torch.Tensor, candidate_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference || candidate) per position, from log-probabilities over the last dimension: the
    one spelling of it in upcycle (equivalence, the long-context probe, the kd loss, repair)."""
    return (reference_logprobs.exp() * (reference_logprobs - candidate_logprobs)).sum(-1)


class EquivalenceMeter:
    """Equivalence accumulated batch by batch from the two models' logits on the same token blocks (what
    `compare` does over whole models, and a streamed pass does from the logits at the top of its layers)."""

    def __init__(self):
        self.max_diff, self.kl_sum, self.cos_sum, self.agree, self.count, self.blocks = 0.0, 0.0, 0.0, 0, 0, 0
        self.loss_sums = [0.0, 0.0]

    @torch.no_grad()
    def add(self, ref: torch.Tensor, cand: torch.Tensor, batch: torch.Tensor) -> None:
        """Logits (B, T, V) of the reference and the candidate on `batch` (B, T) of token ids."""
        if ref.shape != cand.shape:
            raise ConfigError(f"the models disagree on the output shape: {tuple(ref.shape)} vs {tuple(cand.shape)}")
        ref, cand = ref.float().cpu(), cand.float().cpu()
        self.max_diff = max(self.max_diff, (ref - cand).abs().max().item())
        ref_logp, cand_logp = F.log_softmax(ref, -1), F.log_softmax(cand, -1)
        self.kl_sum += kl_divergence(ref_logp, cand_logp).double().sum().item()
        self.agree += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
        self.cos_sum += F.cosine_similarity(ref, cand, dim=-1).double().sum().item()
        targets = batch[:, 1:].reshape(-1).cpu()
        for n, logp in enumerate((ref_logp, cand_logp)):
            picked = logp[:, :-1].reshape(-1, logp.shape[-1]).gather(1, targets[:, None])
            self.loss_sums[n] -= picked.double().sum().item()
        self.count += ref.shape[0] * ref.shape[1]
        self.blocks += ref.shape[0]

    def result(self) -> Equivalence:
        count = max(self.count, 1)
        predicted = max(self.count - self.blocks, 1)  # the last position of a block predicts nothing here
        return Equivalence(
            max_abs_logit=self.max_diff,
            mean_kl=max(self.kl_sum / count, 0.0),
            top1_agreement=self.agree / count,
            tokens=self.count,
            logit_cosine=self.cos_sum / count,
            loss_reference=self.loss_sums[0] / predicted,
            loss_candidate=self.loss_sums[1] / predicted,
        )


@torch.no_grad()
def compare(reference, candidate, blocks: torch.Tensor, *, batch_size: int = 8) -> Equivalence:
    """Compare two causal LMs on `blocks` (n, seq_len) of token ids."""
    if blocks.dim() != 2:
        raise ConfigError(f"blocks has shape {tuple(blocks.shape)}: expected (n, seq_len)")
    states = reference.training, candidate.training
    reference.eval(), candidate.eval()
    meter = EquivalenceMeter()
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        ref = reference(input_ids=batch.to(_device(reference))).logits
        meter.add(ref, candidate(input_ids=batch.to(_device(candidate))).logits, batch)
    reference.train(states[0]), candidate.train(states[1])
    return meter.result()


def _device(model) -> torch.device:
    return next(model.parameters()).device
