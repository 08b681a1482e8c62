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
    levels = 2**bits

    def rounded(column: torch.Tensor, step: torch.Tensor, _offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        codes = _round(column, step, levels)
        return codes, codes * step / 2

    codes, steps = _gptq(w, moment, group, lambda part: best_steps(part, levels), rounded)
    return codes.to(code_dtype(bits)), steps / 2


def _gptq(w: torch.Tensor, moment: torch.Tensor, group: int, step_of, rounded) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's loop over the inputs of w [out, in] on any grid with one step per group of `group` inputs:
    step_of(weights [out, group]) -> steps [out], chosen when the group's first input is reached;
    rounded(column [out], steps [out], offset) -> (codes [out], the values they stand for [out]), offset
    the input's place in its group. Returns codes [out, in] (fp32) and steps [out, in / group]."""
    rows, n = w.shape
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
            offset = (b0 + j) % group
            if offset == 0:
                steps[:, (b0 + j) // group] = step_of(part[:, j : j + group])
            codes[:, b0 + j], value = rounded(part[:, j], steps[:, (b0 + j) // group], offset)
            errors[:, j] = e = (part[:, j] - value) / spread[j, b0 + j]
            part[:, j + 1 :] -= e[:, None] * spread[j, b0 + j + 1 : b1][None, :]
        weights[:, b1:] -= errors @ spread[:, b1:]
    return codes, steps


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


INT4_GROUP = 32  # weights per fp16 scale: Q4_0's
TOKEN_GROUP = 32  # inputs per 8-bit step of a token the int8 and int4 row dots read: Q8_0's
INT4_CHUNK = 64  # the kernel reads a row's codes in chunks of 128 weights, the last one may hold 64


def int4_fits(inputs: int) -> bool:
    """Whether rows of `inputs` weights can be stored as int4 rows (a whole number of chunks)."""
    return inputs % INT4_CHUNK == 0


def int4_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0's quantizer on the rows of w [..., K] (K a multiple of 64): per group of 32 inputs, d = m / -8
    with m the group's value of largest magnitude (so it lands exactly on code 0, the grid's far end),
    stored in fp16; codes c = floor(w / d + 8.5) clamped to [0, 15], standing for (c - 8) d. Returns codes
    as uint8 [..., K/2] in the kernel's layout (q4_rows.h: per chunk of n = min(128, K - k0) weights, byte
    b holds weight k0 + b in its low nibble and k0 + n/2 + b in its high one) and scales fp16 [..., K/32]."""
    k = _int4_inputs(w)
    grouped = w.detach().float().reshape(-1, k // INT4_GROUP, INT4_GROUP)
    step = _q4_steps(grouped)
    codes = _q4_codes(grouped, step[..., None]).reshape(-1, k)
    return _int4_pair(codes, step, w.shape)


def int4a_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 with a minimum per group (Q4_1's grid, 5 bits a weight): per group of 32 inputs, m = its
    smallest value and d = (its largest - m) / 15, both stored in fp16; codes c = round((w - m) / d) in
    [0, 15] (with the stored d and m), standing for c d + m. Codes as int4_rows lays them out; scales
    fp16 [..., K/16]: each row's K/32 steps d, then its K/32 minimums m (what the kernel's weight type 4
    reads). Where weights are skewed within a group, the minimum spends no level on the side they avoid."""
    k = _int4_inputs(w)
    grouped = w.detach().float().reshape(-1, k // INT4_GROUP, INT4_GROUP)
    low, high = grouped.amin(-1), grouped.amax(-1)
    step, low = ((high - low) / 15).to(torch.float16).float(), low.to(torch.float16).float()
    codes = torch.round((grouped - low[..., None]) / torch.where(step != 0, step, 1.0)[..., None]).clamp_(0, 15)
    packed, steps = _int4_pair(codes.reshape(-1, k), step, w.shape)
    minimums = low.to(torch.float16).reshape(*w.shape[:-1], k // INT4_GROUP)
    return packed, torch.cat([steps, minimums], dim=-1)


@torch.no_grad()
def int4_rows_gptq(w: torch.Tensor, moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4_rows' grid and layout, the codes chosen by GPTQ against the inputs' second moment `moment`
    [K, K] (as quantize_gptq): what the rows compute, x Ŵ^T, kept close to x W^T on such inputs rather
    than Ŵ to W. Each group's step is Q4_0's rule on the weights as the errors carried so far have left
    them, and the input that set it is held at code 0 (the extreme level), so that int4_rows of the
    dequantized weights gives these codes back: the packed copies and a reloaded model store the same."""
    _int4_inputs(w)
    extreme = {}  # each row's offset, in the group being rounded, of the input that set its step

    def step_of(part: torch.Tensor) -> torch.Tensor:
        extreme["at"] = part.abs().argmax(-1)
        return _q4_steps(part)

    def rounded(column: torch.Tensor, step: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        codes = torch.where((extreme["at"] == offset) & (step != 0), 0.0, _q4_codes(column, step))
        return codes, (codes - 8) * step

    codes, steps = _gptq(w, moment, INT4_GROUP, step_of, rounded)
    return _int4_pair(codes, steps, w.shape)


def _int4_inputs(w: torch.Tensor) -> int:
    k = w.shape[-1]
    if not int4_fits(k):
        raise ValueError(f"int4 rows need a multiple of {INT4_CHUNK} inputs, not {k}")
    return k


def _q4_steps(grouped: torch.Tensor) -> torch.Tensor:
    """Q4_0's step d of each group [..., group] -> [...]: its value of largest magnitude / -8, fp16-rounded."""
    extreme = grouped.gather(-1, grouped.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return (extreme / -8).to(torch.float16).float()


def _q4_codes(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Q4_0's codes (fp32, in [0, 15]) of w for steps d broadcast against it; 8 (zero) where d is 0."""
    codes = torch.floor(w / torch.where(step != 0, step, 1.0) + 8.5).clamp_(0, 15)
    return torch.where(step != 0, codes, 8.0)


def _int4_pair(codes: torch.Tensor, steps: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 codes [..., K/2], fp16 scales [..., K/32]) from codes [rows, K] and steps."""
    k = shape[-1]
    packed = _pack_nibbles(codes.reshape(-1, k).to(torch.uint8))
    return packed.reshape(*shape[:-1], k // 2), steps.to(torch.float16).reshape(*shape[:-1], k // INT4_GROUP)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes [rows, K] in [0, 16) -> [rows, K/2] bytes in the chunked layout of int4_rows."""
    full = codes.shape[1] // 128 * 128
    parts = [codes[:, :full].reshape(codes.shape[0], -1, 2, 64)]
    if full < codes.shape[1]:  # a last chunk of 64 weights
        parts.append(codes[:, full:].reshape(codes.shape[0], 1, 2, 32))
    return torch.cat([(p[:, :, 0] | (p[:, :, 1] << 4)).reshape(codes.shape[0], -1) for p in parts], dim=1)


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weights [..., K] int4 codes and scales stand for, in fp32: (c - 8) d (int4_rows), or c d + m where
    the scales hold the minimums too (int4a_rows: [..., K/16])."""
    half = codes.shape[-1]
    flat = codes.reshape(-1, half)
    full = half // 64 * 64
    parts = [flat[:, :full].reshape(flat.shape[0], -1, 64)]
    if full < half:
        parts.append(flat[:, full:].reshape(flat.shape[0], 1, 32))
    nibbles = torch.cat([torch.cat([p & 15, p >> 4], dim=-1).reshape(flat.shape[0], -1) for p in parts], dim=1)
    groups = 2 * half // INT4_GROUP
    scales = scales.reshape(flat.shape[0], -1, 1).float()
    if scales.shape[1] == 2 * groups:  # steps, then minimums
        grouped = nibbles.float().reshape(flat.shape[0], -1, INT4_GROUP) * scales[:, :groups] + scales[:, groups:]
    else:
        grouped = (nibbles.float() - 8).reshape(flat.shape[0], -1, INT4_GROUP) * scales
    return grouped.reshape(*codes.shape[:-1], 2 * half)
