"""A bank-sparse FFN converted for inference holds its weights once: as the kernel's packed copy.

The kernel reads a pack [width, 3, hidden] of rows W_gate[j], W_up[j], W_down^T[j] (in the model's dtype,
or int8 / int4 codes with their scales). Beside it the FFN kept gate_proj, up_proj and down_proj for its
reference path (the rows of a prompt, perplexity's batches) — at int4 in fp32, since int4 runs fp32
activations. At 3.2B parameters that was ~11 GB of fp32 FFN weights beside a 1.3 GB pack, and the
process starved llama.cpp's mmapped file of page cache in the race it was measured in. `make_lean`
swaps the three linears for `PackedRows` views of the pack: the reference path computes with the pack's
own values (dequantized per call), the very values the kernel reads. `unpack` undoes it (a model
converted again goes back through plain weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from upcycle import kernels
from upcycle.infer.rows import INT4S
from upcycle.modules.bank_sparse import BankSparseFFN, ShadowPredictor

SLOTS = ("gate_proj", "up_proj", "down_proj")  # the pack's rows j: W_gate[j], W_up[j], W_down^T[j]


@dataclass
class FFNPack:
    """The kernel's packed copy of one FFN: codes [width, 3, hidden] (int4: hidden / 2 bytes) and scales
    (int8: fp32 [width, 3]; int4: fp16 [width, 3, hidden / 32]; none in fp32 / bf16), the precision they
    are stored at (None: the dtype's own values) and the dtype the FFN computes in."""

    codes: torch.Tensor
    scales: torch.Tensor
    precision: str | None
    dtype: torch.dtype

    def rows(self, slot: int) -> torch.Tensor:
        """The slot's rows [width, hidden] as the kernel reads them, in the FFN's dtype (a view in fp32 /
        bf16; a dequantized copy of the codes otherwise)."""
        codes = self.codes[:, slot]
        if self.precision == "int8":
            return (codes.float() * self.scales[:, slot, None]).to(self.dtype)
        if self.precision in INT4S:
            return kernels.dequantize_int4(codes, self.scales[:, slot]).to(self.dtype)
        return codes

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


class PackedRows(nn.Module):
    """One of a lean FFN's gate_proj, up_proj, down_proj: y = x W^T with W read from the pack. No
    parameters: the pack is the FFN's only copy of its weights (not in the state dict; a lean model is
    for inference, `unpack` gives the weights back)."""

    def __init__(self, pack: FFNPack, slot: int, in_features: int, out_features: int):
        super().__init__()
        self.pack, self.slot, self.in_features, self.out_features = pack, slot, in_features, out_features

    @property
    def weight(self) -> torch.Tensor:
        rows = self.pack.rows(self.slot)
        return rows.t() if SLOTS[self.slot] == "down_proj" else rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        stored = self.pack.precision or str(self.pack.dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, {stored} rows of the kernel's pack"


@torch.no_grad()
def make_lean(ffn: BankSparseFFN) -> None:
    """Pack the FFN's weights as its kernel reads them and drop the float weights (in place). A shadow
    predictor's copies are made from the weights first: with the weights gone they stay as they are."""
    if ffn.kernel_pack is not None:
        return
    gate, up, down = (getattr(ffn, name).weight for name in SLOTS)
    if isinstance(ffn.predictor, ShadowPredictor):
        ffn.predictor.refresh(gate, up)
    precision = getattr(ffn, "kernel_precision", None)
    codes, scales = kernels.pack_ffn(gate.detach(), up.detach(), down.detach(), precision)
    pack = FFNPack(codes, scales, precision, gate.dtype)
    width, hidden = gate.shape
    kernels.release(ffn)  # a plan of the float weights holds a pack of its own
    for slot, name in enumerate(SLOTS):
        inputs, outputs = (width, hidden) if name == "down_proj" else (hidden, width)
        setattr(ffn, name, PackedRows(pack, slot, inputs, outputs))
    ffn.kernel_pack = pack


@torch.no_grad()
def unpack(ffn: BankSparseFFN) -> None:
    """Give a lean FFN plain nn.Linear weights again (the pack's values, in its dtype), in place."""
    pack = ffn.kernel_pack
    if pack is None:
        return
    for name in SLOTS:
        rows = getattr(ffn, name)
        linear = nn.Linear(rows.in_features, rows.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(rows.weight.to(pack.dtype).contiguous().clone())
        setattr(ffn, name, linear)
    kernels.release(ffn)
    ffn.kernel_pack = None
    if isinstance(ffn.predictor, ShadowPredictor):
        ffn.predictor.source = None  # re-derived from these weights on the next call
