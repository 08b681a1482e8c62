"""Linear layers for decoding: at a few rows, the kernel's dense row dots instead of a matmul.

Outside its sparse FFNs a decoding step is ~120 small matrix-vector products in SmolLM2 (attention's
q, k, v, o in every layer, the LM head), each reading its weights once. PyTorch's bf16 matmul at one row
costs 25-45 us a call even when the matrix is in cache (oneDNN: measured in the module docstring of
bank_sparse_ffn.cpp), so bf16 attention ran no faster than fp32 though it reads half the bytes.
`RowLinear` computes such a product with the FFN kernel's widen-in-registers dot products (fp32 sums;
fp32, bf16 or int8 weights with one scale per row), registered as the operator upcycle::row_dots so a
compiled graph calls it without Python. More rows than MAX_ROWS (a prompt), a gradient wanted, or no
kernel: the layer runs as a plain linear (torch's weight-only int8 matmul for int8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from upcycle import kernels

MAX_ROWS = 4  # the kernel computes up to 4 rows per pass over the weights; beyond, matmuls win


class RowLinear(nn.Module):
    """y = x W^T + b for inference, W stored as `precision`: fp32 or bf16 (the linear's own parameters,
    shared: a tied LM head stays tied) or int8 codes [out, in] with one fp32 scale per output row (and a
    copy of the bias in the activations' dtype)."""

    def __init__(self, linear: nn.Linear, precision: str, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.precision = linear.in_features, linear.out_features, precision
        dtype = dtype or linear.weight.dtype
        if precision == "int8":
            codes, scales = kernels.int8_rows(linear.weight.detach())
            self.register_buffer("codes", codes)
            self.register_buffer("scales", scales.float())
            self.register_buffer("scales_for_matmul", scales.to(dtype))  # torch's int8 matmul wants the activations' dtype
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        else:
            self.weight, self.bias = linear.weight, linear.bias
        # decided here, once: a compiled graph must not call into the loader (ctypes) to ask
        self.kernel_ready = kernels.enabled()
        if self.kernel_ready:
            kernels.operator_kind()  # registered before any graph is traced

    @property
    def stored(self) -> torch.Tensor:
        return self.codes if self.precision == "int8" else self.weight

    def dequantized(self) -> torch.Tensor:
        """The weight the layer computes with (an int8 layer's codes times its scales)."""
        if self.precision == "int8":
            return self.codes.float() * self.scales[:, None]
        return self.weight

    def _rows_by_kernel(self, rows: torch.Tensor) -> bool:
        # the operator tells the weight type by its element size: fp16 (2 bytes, like bf16) stays on the matmul
        return (rows.shape[0] <= MAX_ROWS and rows.device.type == "cpu" and self.kernel_ready and kernels._enabled
                and self.stored.dtype in kernels.WEIGHT_TYPES and not (torch.is_grad_enabled() and (rows.requires_grad or self.stored.requires_grad)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self._rows_by_kernel(rows):
            scales = self.scales if self.precision == "int8" else kernels.NO_SCALES
            y = torch.ops.upcycle.row_dots(rows.float(), self.stored, scales).to(x.dtype)
        elif self.precision == "int8":
            y = torch._weight_int8pack_mm(rows, self.codes, self.scales_for_matmul)
        else:
            y = F.linear(rows, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.precision}"
