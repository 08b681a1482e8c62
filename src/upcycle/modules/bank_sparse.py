"""The predictor-gated bank-sparse SwiGLU FFN.

Per token, a low-rank predictor scores every intermediate channel; channels are grouped in banks of
`bank` and the top `keep` scores of every bank are kept, so every bank does the same work (what makes
the pattern fast on real hardware). The kept channels of SwiGLU(x) = down(act(gate(x)) * up(x)) are
combined through a gate mode:

    hard     mask, with a straight-through gradient into the predictor's logits
    sigmoid  mask * sigmoid(z): the LM loss trains the predictor through the gate value
    softmax  mask * keep * softmax over the bank's kept logits (a uniform gate is 1)

Two other selection rules share the module so that baselines run through the same code:
    oracle     the true top-k of |act(gate) * up| in every bank (an upper bound; no predictor)
    threshold  TEAL-style: keep |act(gate) * up| above a per-layer calibrated threshold (no banks)

This is the reference (masked dense) computation, used for training; it computes every channel and
zeroes the dropped ones. In eval mode with no gradient wanted, `forward` takes the fast inference path
of upcycle.kernels, which reads only the kept channels' weights, wherever it applies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from upcycle import kernels
from upcycle.errors import check

GATE_MODES = ("hard", "sigmoid", "softmax")
SELECTIONS = ("predictor", "oracle", "threshold")


@dataclass
class BankSparsity:
    """How an FFN is made bank-sparse: `keep` of every `bank` channels, scored by a rank-`rank` predictor."""

    bank: int = 64
    keep: int = 16
    rank: int = 64
    gate: str = "hard"
    selection: str = "predictor"

    def __post_init__(self):
        check(isinstance(self.bank, int) and self.bank >= 1, "bank", self.bank, "a positive integer")
        check(isinstance(self.keep, int) and 1 <= self.keep <= self.bank, "keep", self.keep,
              f"an integer from 1 to bank ({self.bank})")
        check(isinstance(self.rank, int) and self.rank >= 1, "rank", self.rank, "a positive integer")
        check(self.gate in GATE_MODES, "gate", self.gate, f"one of {', '.join(GATE_MODES)}")
        check(self.selection in SELECTIONS, "selection", self.selection, f"one of {', '.join(SELECTIONS)}")

    def check_width(self, width: int) -> None:
        check(width % self.bank == 0, "bank", self.bank,
              f"a divisor of the FFN width {width} (or pad the width: pad=True)")

    def to_dict(self) -> dict:
        return asdict(self)


def bank_topk_mask(scores: torch.Tensor, bank: int, keep: int) -> torch.Tensor:
    """A 0/1 mask (same shape and dtype as scores) keeping exactly `keep` of every `bank` channels
    along the last dimension: the largest scores of each bank."""
    shape = scores.shape
    banked = scores.reshape(*shape[:-1], shape[-1] // bank, bank)
    index = banked.topk(keep, dim=-1, sorted=False).indices
    mask = torch.zeros_like(banked).scatter_(-1, index, 1.0)
    return mask.reshape(shape)


def oracle_ranking_loss(z: torch.Tensor, oracle: torch.Tensor, bank: int, keep: int) -> torch.Tensor:
    """Per bank, a softmax cross-entropy that puts the probability mass on the oracle's k channels:
    top-k selection uses only the ranking within each bank, so the loss looks at nothing else."""
    logp = torch.log_softmax(z.float().reshape(-1, bank), dim=-1)
    return -(logp * oracle.reshape(-1, bank)).sum(-1).mean() / keep


class LowRankPredictor(nn.Module):
    """z = (x A) B + c: one routing logit per FFN channel from rank-r factors (A: H x r, B: r x I)."""

    def __init__(self, hidden: int, width: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @torch.no_grad()
    def init_svd(self, gate_weight: torch.Tensor) -> None:
        """z ~ the gate pre-activation x W_gate^T, truncated to rank r."""
        u, s, vh = torch.linalg.svd(gate_weight.float(), full_matrices=False)
        r = self.down.out_features
        root = s[:r].sqrt()
        self.down.weight.copy_((root[:, None] * vh[:r]).to(self.down.weight.dtype))
        self.up.weight.copy_((u[:, :r] * root).to(self.up.weight.dtype))
        self.up.bias.zero_()

    @torch.no_grad()
    def init_random(self, generator: torch.Generator | None = None) -> None:
        for linear in (self.down, self.up):
            fan_in = linear.in_features
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) / fan_in ** 0.5)
        self.up.bias.zero_()


class BankSparseFFN(nn.Module):
    """A SwiGLU FFN (gate_proj, up_proj, down_proj as in Llama/Qwen) whose intermediate activation is
    kept `keep` of every `bank` channels per token."""

    ffn_kind = "bank_sparse"  # what upcycle.arch reports for a layer holding this module

    def __init__(self, hidden: int, width: int, sparsity: BankSparsity, act: str = "silu"):
        super().__init__()
        sparsity.check_width(width)
        self.sparsity = sparsity
        self.keep = sparsity.keep  # mutable: k can be annealed from bank down to the target
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = ACT2FN[act]
        self.predictor = LowRankPredictor(hidden, width, sparsity.rank)
        # TEAL-style selection: |activation| above this value is kept
        self.register_buffer("threshold", torch.zeros(()))
        # in training: the last forward's logits, activation and k, for the `router` loss
        self.router_inputs: tuple[torch.Tensor, torch.Tensor, int] | None = None

    @property
    def bank(self) -> int:
        return self.sparsity.bank

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """The dense intermediate activation act(gate(x)) * up(x)."""
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def oracle_mask(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        h = self.activation(x) if h is None else h
        return bank_topk_mask(h.detach().abs(), self.bank, self.keep)

    def router_loss(self) -> torch.Tensor | None:
        """How far the last training forward's predictor ranking was from this FFN's own top-k."""
        if self.router_inputs is None:
            return None
        z, h, keep = self.router_inputs
        return oracle_ranking_loss(z, bank_topk_mask(h.abs(), self.bank, keep), self.bank, keep)

    def predicted_mask(self, x: torch.Tensor) -> torch.Tensor:
        return bank_topk_mask(self.predictor(x).detach(), self.bank, self.keep)

    def gate_values(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        """What multiplies the activation: a mask, or a mask times gate values; None keeps all."""
        selection = self.sparsity.selection
        if selection == "oracle":
            return None if self.keep == self.bank else self.oracle_mask(x, h)
        if selection == "threshold":
            return (h.detach().abs() > self.threshold).to(h.dtype)
        z = self.predictor(x)
        if self.training:  # references only: the `router` loss does the work if a run asks for it
            self.router_inputs = (z, h.detach(), self.keep)
        mode = self.sparsity.gate
        if mode == "hard":
            mask = torch.ones_like(z) if self.keep == self.bank else bank_topk_mask(z.detach(), self.bank, self.keep)
            return mask + (z - z.detach())  # value: the mask exactly; gradient: straight into z
        mask = bank_topk_mask(z.detach(), self.bank, self.keep)
        if mode == "sigmoid":
            return mask * torch.sigmoid(z)
        banked = z.masked_fill(mask == 0, float("-inf")).reshape(*z.shape[:-1], -1, self.bank)
        return self.keep * torch.softmax(banked, dim=-1).reshape(z.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = kernels.sparse_ffn_forward(self, x)  # inference only; None: not applicable here
        return self.reference_forward(x) if fast is None else fast

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every channel computed, the dropped ones zeroed: the training path and the fallback."""
        h = self.activation(x)
        gate = self.gate_values(x, h)
        return self.down_proj(h if gate is None else h * gate)

    def extra_repr(self) -> str:
        s = self.sparsity
        return f"keep={self.keep} of bank={s.bank}, rank={s.rank}, gate={s.gate}, selection={s.selection}"
