"""The predictor-gated bank-sparse SwiGLU FFN.

Per token, a predictor scores every intermediate channel; channels are grouped in banks of
`bank` and the top `keep` scores of every bank are kept, so every bank does the same work (what makes
the pattern fast on real hardware). The kept channels of SwiGLU(x) = down(act(gate(x)) * up(x)) are
combined through a gate mode:

    hard     mask, with a straight-through gradient into the predictor's logits
    sigmoid  mask * sigmoid(z): the LM loss trains the predictor through the gate value
    softmax  mask * keep * softmax over the bank's kept logits (a uniform gate is 1)

Two other selection rules share the module so that baselines run through the same code:
    oracle     the true top-k of |act(gate) * up| in every bank (an upper bound; no predictor)
    threshold  TEAL-style: keep |act(gate) * up| above a per-layer calibrated threshold (no banks)

Predictors (BankSparsity.predictor):
    lowrank  z = (x A) B + c, rank r (the paper's; trained: the warm-up and the router loss)
    shadow   z = |act(x̂ Ĝ^T) * (x̂ Û^T)|: the FFN's own activation from `bits`-bit copies of its gate and
             up weights (a midrise grid, one step per `group` inputs; rounded to nearest or by GPTQ:
             kernels.quant), against x̂, the input quantized to 8 bits per group (integer group
             dots: the CPU kernel's VNNI path). Nothing to train: the copies are re-derived from the
             FFN's weights whenever those change, so the shadow follows the FFN through training and is
             never stale; they are not saved (a function of the weights and, for GPTQ, of the saved
             input moment).

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
from upcycle.kernels.quant import dequantize_groups, quantize_activations, quantize_gptq, quantize_rtn

GATE_MODES = ("hard", "sigmoid", "softmax")
SELECTIONS = ("predictor", "oracle", "threshold")
PREDICTORS = ("lowrank", "shadow")
QUANTIZERS = ("rtn", "gptq")


@dataclass
class BankSparsity:
    """How an FFN is made bank-sparse: `keep` of every `bank` channels, scored by a predictor: the
    shadow (`bits`-bit copies of the FFN's own gate/up weights, `group` inputs per scale: the default)
    or a rank-`rank` low-rank one (the paper's)."""

    bank: int = 64
    keep: int = 16
    rank: int = 64
    gate: str = "hard"
    selection: str = "predictor"
    predictor: str = "shadow"
    bits: int = 4  # shadow: bits per weight of the gate/up copies
    group: int = 64  # shadow: inputs per quantization scale
    # shadow: how the copies are rounded (kernels.quant); GPTQ rounds to nearest until it is given
    # the layer's calibration inputs
    quantizer: str = "gptq"

    def __post_init__(self):
        check(isinstance(self.bank, int) and self.bank >= 1, "bank", self.bank, "a positive integer")
        check(
            isinstance(self.keep, int) and 1 <= self.keep <= self.bank,
            "keep",
            self.keep,
            f"an integer from 1 to bank ({self.bank})",
        )
        check(isinstance(self.rank, int) and self.rank >= 1, "rank", self.rank, "a positive integer")
        check(self.gate in GATE_MODES, "gate", self.gate, f"one of {', '.join(GATE_MODES)}")
        check(self.selection in SELECTIONS, "selection", self.selection, f"one of {', '.join(SELECTIONS)}")
        check(self.predictor in PREDICTORS, "predictor", self.predictor, f"one of {', '.join(PREDICTORS)}")
        check(isinstance(self.bits, int) and 2 <= self.bits <= 8, "bits", self.bits, "an integer from 2 to 8")
        check(isinstance(self.group, int) and self.group >= 1, "group", self.group, "a positive integer")
        check(self.quantizer in QUANTIZERS, "quantizer", self.quantizer, f"one of {', '.join(QUANTIZERS)}")

    def check_hidden(self, hidden: int) -> None:
        if self.predictor == "shadow":
            check(hidden % self.group == 0, "group", self.group, f"a divisor of the hidden size {hidden}")

    def check_width(self, width: int) -> None:
        check(
            width % self.bank == 0,
            "bank",
            self.bank,
            f"a divisor of the FFN width {width} (or pad the width: pad=True)",
        )

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
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) / fan_in**0.5)
        self.up.bias.zero_()


def shadow_bytes(width: int, hidden: int, bits: int, group: int) -> int:
    """Bytes a decoding step reads of a shadow predictor: both copies packed as the kernel stores them
    (2-bit codes four to a byte, 3- and 4-bit ones two, wider ones a byte each) and one fp32 scale per
    group."""
    code_bytes = hidden // 4 if bits == 2 else hidden // 2 if bits <= 4 else hidden
    return 2 * width * (code_bytes + 4 * (hidden // group))


class ShadowPredictor(nn.Module):
    """z = |act(x̂ Ĝ^T) * (x̂ Û^T)| from low-bit copies Ĝ, Û of the FFN's gate and up weights and the
    input x̂ rounded to 8 bits per group.

    Holds no parameters: `refresh(gate, up)` re-derives the copies (codes, scales and their dequantized
    values) and the owning FFN calls it whenever its weights changed. With the GPTQ quantizer it holds
    (and saves) the second moment of the FFN's inputs, E[x x^T], set once from calibration rows; a full
    GPTQ pass per step would dominate training, so in training mode the copies follow the weights as
    (copy at the last full pass) + (the weights' change since), and the next refresh outside training
    runs GPTQ again: what inference reads is always GPTQ of the current weights."""

    def __init__(self, bits: int, group: int, act, quantizer: str = "rtn", hidden: int | None = None):
        super().__init__()
        self.bits, self.group, self.act_fn, self.quantizer = bits, group, act, quantizer
        self.source: tuple | None = None  # (pointer, version) of the weights the copies were made from
        self.exact = False  # the copies are a full pass over those weights (not the training follow-up)
        self.codes: tuple[torch.Tensor, torch.Tensor] | None = None
        self.scales: tuple[torch.Tensor, torch.Tensor] | None = None
        self.weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self.quantized_from: tuple[torch.Tensor, torch.Tensor] | None = None  # GPTQ: the weights of the last pass
        self.full_weights: tuple[torch.Tensor, torch.Tensor] | None = None  # GPTQ: the copies it made
        self.inference_only = False  # see for_inference
        if quantizer == "gptq":  # fp32 whatever the model's dtype (see _apply)
            self.register_buffer("input_moment", torch.zeros(hidden, hidden, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """Moves apply to the input moment, dtype casts do not: rounded to bf16, GPTQ's H = E[x x^T] of a
        model with repeated inputs loses positive-definiteness (measured: Cholesky fails at hidden 4608)."""
        moment = self._buffers.get("input_moment")
        super()._apply(fn, recurse)
        if moment is not None and moment.dtype == torch.float32:
            moved = self._buffers["input_moment"]
            if moved.dtype != torch.float32:
                self._buffers["input_moment"] = moment.to(moved.device)
        return self

    @torch.no_grad()
    def set_input_moment(self, rows: torch.Tensor, chunk: int = 8192) -> None:
        """E[x x^T] over calibration rows x [N, H] of the FFN's input (GPTQ's weighting)."""
        moment = torch.zeros_like(self.input_moment)
        for part in rows.reshape(-1, rows.shape[-1]).split(chunk):
            part = part.float()
            moment += part.T @ part
        self.input_moment.copy_(moment / max(1, rows.numel() // rows.shape[-1]))
        self.source = None

    def _quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.quantizer == "gptq" and bool(self.input_moment.diagonal().any()):
            return quantize_gptq(w, self.input_moment, self.bits, self.group)
        return quantize_rtn(w, self.bits, self.group)  # also GPTQ before any calibration: nothing to weight by

    @torch.no_grad()
    def refresh(self, gate: torch.Tensor, up: torch.Tensor) -> None:
        state = tuple((t.data_ptr(), t._version, t.shape) for t in (gate, up))
        if state == self.source and (self.exact or self.training):
            return
        if (
            self.training
            and self.quantizer == "gptq"
            and self.quantized_from is not None
            and all(a.shape == b.shape for a, b in zip(self.quantized_from, (gate, up)))
        ):
            self.weights = tuple(
                copy + (w.detach() - w0).to(copy.dtype)
                for copy, w, w0 in zip(self.full_weights, (gate, up), self.quantized_from)
            )
            self.source, self.exact = state, False
            return
        (cg, sg), (cu, su) = self._quantize(gate), self._quantize(up)
        self.codes, self.scales, self.copy_dtype = (cg, cu), (sg, su), gate.dtype
        self.weights = None if self.inference_only else self._dequantized()
        if self.quantizer == "gptq" and not self.inference_only:
            self.full_weights, self.quantized_from = self.weights, (gate.detach().clone(), up.detach().clone())
        self.source, self.exact = state, True

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(dequantize_groups(c, s, self.group).to(self.copy_dtype) for c, s in zip(self.codes, self.scales))

    def for_inference(self) -> None:
        """Keep only the codes and scales: no dequantized copies, no GPTQ training follow-up state. Each
        of those is two gate/up-sized tensors; for a model converted for inference they doubled its FFN
        weights' memory (a 3.2B sparse model at int8 held 17.5 GB, measured: killed for memory)."""
        self.inference_only = True
        self.weights = self.full_weights = self.quantized_from = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.weights if self.weights is not None else self._dequantized()
        x = quantize_activations(x.detach(), self.group)
        return (self.act_fn(x @ g.T) * (x @ u.T)).abs()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group={self.group}, quantizer={self.quantizer}"


class BankSparseFFN(nn.Module):
    """A SwiGLU FFN (gate_proj, up_proj, down_proj as in Llama/Qwen) whose intermediate activation is
    kept `keep` of every `bank` channels per token."""

    ffn_kind = "bank_sparse"  # what upcycle.arch reports for a layer holding this module
    # set by upcycle.infer.lean_ffn.make_lean: the kernel's packed copy, then the FFN's only weights
    kernel_pack = None

    def kernel_weights(self) -> tuple[torch.Tensor, ...]:
        """gate, up, down (a lean FFN: its pack's codes and scales) and, for a low-rank predictor, its
        down, up, bias: what the kernel reads (a shadow predictor's logits are computed before the
        kernel is called). Dict look-ups, not nn.Module.__getattr__: a decode step calls this once per
        layer, so microseconds count."""
        m, pack = self._modules, self.__dict__.get("kernel_pack")
        if pack is not None:
            ffn = (pack.codes, pack.scales)
        else:
            ffn = (
                m["gate_proj"]._parameters["weight"],
                m["up_proj"]._parameters["weight"],
                m["down_proj"]._parameters["weight"],
            )
        predictor = m["predictor"]._modules
        if "down" not in predictor:
            return ffn
        pd, pu = predictor["down"]._parameters, predictor["up"]._parameters
        return ffn + (pd["weight"], pu["weight"], pu["bias"])

    def __init__(self, hidden: int, width: int, sparsity: BankSparsity, act: str = "silu"):
        super().__init__()
        sparsity.check_width(width)
        self.sparsity = sparsity
        self.keep = sparsity.keep  # mutable: k can be annealed from bank down to the target
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = ACT2FN[act]
        sparsity.check_hidden(hidden)
        if sparsity.predictor == "shadow":
            self.predictor = ShadowPredictor(sparsity.bits, sparsity.group, self.act_fn, sparsity.quantizer, hidden)
        else:
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

    def predictor_bytes(self) -> int:
        """Bytes of predictor weights a decoding step reads."""
        if isinstance(self.predictor, ShadowPredictor):
            width, hidden = self.gate_proj.out_features, self.gate_proj.in_features
            return shadow_bytes(width, hidden, self.predictor.bits, self.predictor.group)
        return sum(p.numel() * p.element_size() for p in self.predictor.parameters())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The predictor's score of every channel for the rows x."""
        self.refresh_shadow()
        return self.predictor(x)

    def refresh_shadow(self) -> None:
        """A shadow predictor's copies re-derived if the weights changed. A lean FFN's were made from its
        weights before they were packed (upcycle.infer.lean_ffn) and stay as they are."""
        if isinstance(self.predictor, ShadowPredictor) and self.kernel_pack is None:
            self.predictor.refresh(self.gate_proj.weight, self.up_proj.weight)

    def predicted_mask(self, x: torch.Tensor) -> torch.Tensor:
        return bank_topk_mask(self.logits(x).detach(), self.bank, self.keep)

    def gate_values(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        """What multiplies the activation: a mask, or a mask times gate values; None keeps all."""
        selection = self.sparsity.selection
        if selection == "oracle":
            return None if self.keep == self.bank else self.oracle_mask(x, h)
        if selection == "threshold":
            return (h.detach().abs() > self.threshold).to(h.dtype)
        z = self.logits(x)
        if self.training and isinstance(
            self.predictor, LowRankPredictor
        ):  # references only: the `router` loss does the work if a run asks for it
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
        predictor = f"rank={s.rank}" if s.predictor == "lowrank" else f"shadow {s.bits}-bit/{s.group} {s.quantizer}"
        return f"keep={self.keep} of bank={s.bank}, {predictor}, gate={s.gate}, selection={s.selection}"
