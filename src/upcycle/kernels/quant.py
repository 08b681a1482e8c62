"""Group quantizers: the kernels' int8 rows and the shadow predictor's low-bit copies of an FFN's gate/up
weights (a leaf both the kernels and modules/ use).

quantize_groups is symmetric round to nearest with a zero level (int8 rows, the 8-bit activations).
The shadow's copies (quantize_rtn, quantize_gptq) use another grid, *midrise*: a `bits`-bit code c in [0, 2^bits) stands for (c - (2^bits - 1) / 2) * step, so
all 2^bits levels are used and none is zero (a symmetric grid with a zero level wastes one of them:
at 2 bits it is ternary). Codes are returned doubled, 2c - (2^bits - 1) (odd integers), with
scale = step / 2, so that w ≈ codes * scale as for every other quantizer here. The step of each group
of `group` inputs is the one of CLIP_RATIOS * max|w| that rounds the group with the least squared error
(max|w| itself is too coarse at few bits: one outlier sets the step of the whole group).

Two ways to choose the codes:
    rtn   round each weight to its nearest level
    gptq  GPTQ (Frantar et al., 2022): the inputs in order, each one's rounding error carried onto the
          inputs not yet rounded, weighted by the inverse of H = E[x x^T] over the layer's calibration
          inputs, so that x Ŵ^T (what the shadow computes) stays close to x W^T rather than Ŵ to W.
          Measured on smollm2-135m at 2 bits: recall of the oracle's top-16 0.70 (rtn) -> 0.78.
"""

from __future__ import annotations

import torch

from upcycle.kernels.linalg import InverseHessianFactor

CLIP_RATIOS = torch.linspace(0.4, 1.0, 13)  # the top level at this fraction of max|w|, steps of 0.05
GPTQ_BLOCK = 128  # inputs rounded before the rest of the matrix is updated at once (a matmul)
GPTQ_DAMP = 0.01  # added to H's diagonal, times its mean: keeps the inverse finite


def code_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits < 8 else torch.int16  # doubled 8-bit codes reach ±255


def _round(w: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
    """Doubled midrise codes (odd, in [-(levels-1), levels-1]) of w for the given step (0: any code)."""
    c = torch.clamp(torch.floor(w / torch.where(step > 0, step, 1.0) + levels / 2), 0, levels - 1)
    return 2 * c - (levels - 1)


def best_steps(w: torch.Tensor, levels: int) -> torch.Tensor:
    """For w [..., group]: the step of least squared rounding error among CLIP_RATIOS of max|w|, [...]
    (the first of equals; 0 for an all-zero group, which so stays exactly zero: there is no zero level)."""
    top = w.abs().amax(-1, keepdim=True)
    best_error, best_step = None, None
    for ratio in CLIP_RATIOS.tolist():
        step = ratio * top / (levels / 2 - 0.5)
        error = (_round(w, step, levels) * step / 2 - w).pow(2).sum(-1, keepdim=True)
        if best_error is None:
            best_error, best_step = error, step
        else:
            better = error < best_error
            best_error, best_step = torch.where(better, error, best_error), torch.where(better, step, best_step)
    return best_step.squeeze(-1)


@torch.no_grad()
def quantize_rtn(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Doubled midrise codes [out, in] and scales [out, in / group] (step / 2) of w, round to nearest."""
    levels = 2**bits
    grouped = w.detach().float().reshape(w.shape[0], -1, group)
    step = best_steps(grouped, levels)
    codes = _round(grouped, step[..., None], levels)
    return codes.reshape(w.shape).to(code_dtype(bits)), step / 2


@torch.no_grad()
def quantize_gptq(w: torch.Tensor, moment: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As quantize_rtn, but GPTQ against the inputs' second moment `moment` [in, in] (any positive
    multiple of E[x x^T]). Each group's step is chosen when its first input is reached, from the weights
    as the errors carried so far have left them. An input never seen (zero diagonal) has no say."""
    levels, (rows, n) = 2**bits, w.shape
    weights = w.detach().float().clone()
    weights[:, moment.diagonal() == 0] = 0.0
    # the upper Cholesky factor of H^-1: row j holds how input j's error spreads over the inputs after it
    factor = InverseHessianFactor.of_copy(moment, GPTQ_DAMP)
    codes = torch.empty(rows, n, dtype=torch.float32)
    steps = torch.empty(rows, n // group)
    block = group * max(1, GPTQ_BLOCK // group)  # a whole number of groups
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        part, errors, spread = weights[:, b0:b1].clone(), torch.empty(rows, b1 - b0), factor.rows(b0, b1)
        for j in range(b1 - b0):
            if (b0 + j) % group == 0:
                steps[:, (b0 + j) // group] = best_steps(part[:, j : j + group], levels)
            step = steps[:, (b0 + j) // group]
            codes[:, b0 + j] = c = _round(part[:, j], step, levels)
            errors[:, j] = e = (part[:, j] - c * step / 2) / spread[j, b0 + j]
            part[:, j + 1 :] -= e[:, None] * spread[j, b0 + j + 1 : b1][None, :]
        weights[:, b1:] -= errors @ spread[:, b1:]
    return codes.to(code_dtype(bits)), steps / 2


def quantize_groups(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest quantization of the rows of w (out, in) in groups of `group` inputs:
    codes in [-Q, Q] with Q = 2^(bits-1) - 1 (int8) and one scale per group (max |w| / Q), so that
    w ≈ codes * scale. An all-zero group gets scale 1 (its codes are 0)."""
    q = 2 ** (bits - 1) - 1
    grouped = w.detach().float().reshape(w.shape[0], -1, group)
    scale = grouped.abs().amax(-1) / q
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(grouped / scale[..., None]).clamp_(-q, q).to(torch.int8)
    return codes.reshape(w.shape), scale


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    return (codes.float().reshape(codes.shape[0], -1, group) * scale[..., None]).reshape(codes.shape)


def quantize_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x̂: the rows of x (..., H) rounded to 8 bits per group of `group` inputs (scale max|x| / 127,
    codes in [-127, 127], ties to even), returned dequantized: the weights' quantizer at 8 bits."""
    rows = x.reshape(-1, x.shape[-1])
    return dequantize_groups(*quantize_groups(rows, 8, group), group).reshape(x.shape).to(x.dtype)
