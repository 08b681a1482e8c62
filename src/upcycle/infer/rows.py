"""Linear layers for decoding: at a few rows, the kernel's dense row dots instead of a matmul.

Outside its sparse FFNs a decoding step is ~120 small matrix-vector products in SmolLM2 (attention's
q, k, v, o in every layer, the LM head), each reading its weights once. PyTorch's bf16 matmul at one row
costs 25-45 us a call even when the matrix is in cache (oneDNN: measured in the module docstring of
bank_sparse_ffn.cpp), so bf16 attention ran no faster than fp32 though it reads half the bytes.
`RowLinear` computes such a product with the FFN kernel's widen-in-registers dot products (fp32 sums;
fp32 or bf16 weights), or for int8 weights (one scale per row) and int4 weights (an fp16 scale per group
of 32, Q4_0's) integer dot products against the row at 8 bits per group of 32 (Q8_0's), registered as the
operator upcycle::row_dots so a compiled graph calls it without Python. More rows than the kernel takes
(fp32: MAX_ROWS; bf16, int8, int4: MAX_KERNEL_ROWS, a prompt included), a gradient wanted, or no kernel:
the layer runs as a plain linear (torch's weight-only int8 matmul for int8, for int4 the dequantized
weight, each against the rows rounded as the kernel rounds them).

`StackedRows` puts the rows of linear layers that read the same input (attention's q, k and v; a dense
FFN's gate and up) into one RowLinear, so that a step streams them in one call instead of one a layer;
each layer becomes a `RowsOf`, its slice of that call's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from upcycle import kernels
from upcycle.kernels.quant import TOKEN_GROUP, quantize_activations

INT4S = ("int4", "int4a")  # the int4 precisions: Q4_0's grid, and with a minimum per group (Q4_1's)
MAX_ROWS = 4  # fp32: the kernel up to 4 rows; beyond, the BLAS matmul is as fast (41 rows of a 1536 x 576
# layer on an AVX2 EPYC: 0.67 ms against 0.86)
# bf16, int8 and int4: the kernel up to this many rows (4 at a time against rows held in L1, so the weights
# come from memory once). torch has no fast path for them on a CPU without AVX-512: its weight-only int8
# matmul took 671 ms for SmolLM2's LM head at 41 rows (fp32 activations) where the kernel takes 21 ms, its
# bf16 matmul made a 41-token prompt 589 ms against fp32's 155, and int4 has no matmul at all (it would
# widen the whole weight at every call).
MAX_KERNEL_ROWS = 64


class RowLinear(nn.Module):
    """y = x W^T + b for inference, W stored as `precision`: fp32 or bf16 (the linear's own parameters,
    shared: a tied LM head stays tied), int8 codes [out, in] with one fp32 scale per output row, or int4
    codes [out, in / 2] with an fp16 scale per group of 32 inputs (in a multiple of 64) (and for both a copy
    of the bias in the activations' dtype). `quantized`: the (codes, scales) to store, chosen elsewhere
    (infer.calibrate's GPTQ), instead of the precision's own quantizer's."""

    def __init__(self, linear: nn.Linear, precision: str, dtype: torch.dtype | None = None, quantized=None):
        super().__init__()
        self.in_features, self.out_features, self.precision = linear.in_features, linear.out_features, precision
        dtype = dtype or linear.weight.dtype
        if precision in kernels.QUANTIZERS:
            codes, scales = quantized or kernels.QUANTIZERS[precision](linear.weight.detach())
            self.register_buffer("codes", codes)
            if precision == "int8":
                self.register_buffer("scales", scales.float())
                # torch's int8 matmul wants the activations' dtype
                self.register_buffer("scales_for_matmul", scales.to(dtype))
            else:
                self.register_buffer("scales", scales)  # fp16 [out, in / 32], as the kernel reads them
            self.bias = (
                None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
            )
        else:
            self.weight, self.bias = linear.weight, linear.bias
        # decided here, once: a compiled graph must not call into the loader (ctypes) to ask
        self.kernel_ready = kernels.enabled()
        if self.kernel_ready:
            kernels.operator_kind()  # registered before any graph is traced

    def _apply(self, fn, recurse=True):
        """Moves apply to the scales, dtype casts do not: the kernel reads int8 rows' scales as fp32 and
        int4 rows' as fp16, so `model.to(torch.bfloat16)` after a conversion must leave them as they are."""
        scales = self._buffers.get("scales")
        super()._apply(fn, recurse)
        moved = self._buffers.get("scales")
        if scales is not None and moved.dtype != scales.dtype:
            self._buffers["scales"] = scales.to(moved.device)
        return self

    @property
    def quantized(self) -> bool:
        return self.precision in kernels.QUANTIZERS

    @property
    def stored(self) -> torch.Tensor:
        return self.codes if self.quantized else self.weight

    def dequantized(self) -> torch.Tensor:
        """The weight the layer computes with (an int8 or int4 layer's codes times their scales)."""
        if self.precision == "int8":
            return self.codes.float() * self.scales[:, None]
        if self.precision in INT4S:
            return kernels.dequantize_int4(self.codes, self.scales)
        return self.weight

    def _rows_by_kernel(self, rows: torch.Tensor) -> bool:
        # the operator tells the weight type by its element size: fp16 (2 bytes, like bf16) stays on the matmul
        return (
            rows.shape[0] <= (MAX_ROWS if self.precision == "fp32" else MAX_KERNEL_ROWS)
            and rows.device.type == "cpu"
            and self.kernel_ready
            and kernels._enabled
            and self.stored.dtype in kernels.WEIGHT_TYPES
            and not (torch.is_grad_enabled() and (rows.requires_grad or self.stored.requires_grad))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self._rows_by_kernel(rows):
            scales = self.scales if self.quantized else kernels.NO_SCALES
            y = torch.ops.upcycle.row_dots(rows.float(), self.stored, scales).to(x.dtype)
        elif self.precision == "int8":  # the rows rounded as the kernel rounds them
            if self.in_features % TOKEN_GROUP == 0:
                rows = quantize_activations(rows.float(), TOKEN_GROUP).to(rows.dtype)
            y = torch._weight_int8pack_mm(rows, self.codes, self.scales_for_matmul)
        elif self.precision in INT4S:  # a prompt: what the kernel computes, a row at a time
            y = F.linear(quantize_activations(rows.float(), TOKEN_GROUP), self.dequantized()).to(x.dtype)
        else:
            y = F.linear(rows, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.precision}"


class StackedRows(nn.Module):
    """The rows of several linear layers that read the same input, stacked into one RowLinear (`rows`).
    The first of their `RowsOf` called computes every layer's rows and holds the result until each has
    taken its slice; a call with another input tensor than the one held computes afresh, so a layer
    called out of turn still gets its own rows. Why: at a decoding step each call of the row dots costs a
    few microseconds before it reads anything, and a small matrix (SmolLM2's k and v: 0.4 MB) streams
    more slowly than a large one; one call over the stacked rows pays that once and streams one large
    matrix. `quantized`: each layer's (codes, scales) chosen elsewhere, as RowLinear's."""

    def __init__(self, linears: list[nn.Linear], precision: str, quantized: list | None = None):
        super().__init__()
        weight = torch.cat([linear.weight.detach() for linear in linears])
        self.has_bias = [linear.bias is not None for linear in linears]
        stacked = nn.Linear(linears[0].in_features, weight.shape[0], bias=any(self.has_bias), device="meta")
        stacked.weight = nn.Parameter(weight, requires_grad=False)
        if any(self.has_bias):
            stacked.bias = nn.Parameter(
                torch.cat(
                    [
                        linear.bias.detach() if linear.bias is not None else weight.new_zeros(linear.out_features)
                        for linear in linears
                    ]
                ),
                requires_grad=False,
            )
        if quantized is not None:
            quantized = tuple(torch.cat(parts) for parts in zip(*quantized))
        self.rows = RowLinear(stacked, precision, quantized=quantized)
        sizes = [linear.out_features for linear in linears]
        self.bounds = [sum(sizes[:j]) for j in range(len(sizes) + 1)]
        self._input, self._output, self._left = None, None, 0

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._left == 0 or self._input is not x:
            self._input, self._output, self._left = x, self.rows(x), len(self.bounds) - 1
        self._left -= 1
        y = self._output[..., self.bounds[index] : self.bounds[index + 1]]
        if self._left == 0:  # every layer has its rows: nothing held between steps
            self._input, self._output = None, None
        return y


class RowsOf(nn.Module):
    """Layer `index` of a StackedRows: y = x W^T + b with its own rows of the stacked weight."""

    def __init__(self, stack: StackedRows, index: int):
        super().__init__()
        object.__setattr__(self, "stack", stack)  # registered once, on the layers' parent, not under each
        self.index, self.precision = index, stack.rows.precision
        self.lo, self.hi = stack.bounds[index], stack.bounds[index + 1]
        self.in_features, self.out_features = stack.rows.in_features, self.hi - self.lo

    @property
    def bias(self) -> torch.Tensor | None:
        return self.stack.rows.bias[self.lo : self.hi] if self.stack.has_bias[self.index] else None

    def dequantized(self) -> torch.Tensor:
        """This layer's weight as the stacked rows compute with it."""
        return self.stack.rows.dequantized()[self.lo : self.hi]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack.part(x, self.index)

    def extra_repr(self) -> str:
        return f"rows {self.lo}:{self.hi} of the stacked rows, {self.precision}"
