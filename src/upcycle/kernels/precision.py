"""Inference precision of a whole model, dense or bank-sparse, so that both run the same way.

    fp32  every weight and activation fp32 (training's precision)
    bf16  every weight and activation bf16 (norms and softmax as Hugging Face runs them in bf16); the
          bank-sparse kernel packs its copy in bf16 and computes in fp32 registers
    int8  bf16 activations; every linear layer's weight int8 with one scale per output row — attention,
          dense FFNs and the LM head as `Int8Linear` (torch's weight-only int8 matmul), a bank-sparse
          FFN's gate/up/down put on the int8 grid of its kernel rows (one scale per row of W_gate, of
          W_up and of W_down^T: per channel), so that its reference path and its kernel compute with
          the same values; the embedding table stays bf16 (a token reads one row of it)

A decoding step is memory-bound, so bytes are time: bf16 halves what every token reads, int8 quarters
it. `to_precision` converts in place, like nn.Module.to, and returns the model.
"""

from __future__ import annotations

import torch
from torch import nn

from upcycle.arch import adapter_for
from upcycle.errors import check
from upcycle.kernels import int8_rows, release

PRECISIONS = ("fp32", "bf16", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16}


class Int8Linear(nn.Module):
    """y = x (codes * scales)^T + b: a linear layer whose weight is stored as int8 codes [out, in] and one
    scale per output row, multiplied by torch's weight-only int8 kernel (the codes are widened in
    registers: a quarter of fp32's bytes read)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, scales = int8_rows(linear.weight.detach())
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales.to(dtype))  # the matmul wants them in the activations' dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The weight these codes stand for (dequantized; what the matmul computes with)."""
        return self.codes.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = torch._weight_int8pack_mm(rows, self.codes, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@torch.no_grad()
def int8_grid(ffn) -> None:
    """Put a bank-sparse FFN's gate, up and down weights on the int8 grid its kernel reads (per channel:
    one scale per row of W_gate, W_up and W_down^T) and mark it so the kernel packs int8."""
    for linear, transpose in ((ffn.gate_proj, False), (ffn.up_proj, False), (ffn.down_proj, True)):
        w = linear.weight.t() if transpose else linear.weight
        codes, scales = int8_rows(w)
        grid = codes.float() * scales[:, None]
        linear.weight.copy_((grid.t() if transpose else grid).to(linear.weight.dtype))
    ffn.kernel_precision = "int8"


@torch.no_grad()
def to_precision(model: nn.Module, precision: str) -> nn.Module:
    """Convert `model` in place to fp32, bf16 or int8 inference (see the module's docstring)."""
    from upcycle.modules import BankSparseFFN

    check(precision in PRECISIONS, "precision", precision, f"one of {', '.join(PRECISIONS)}")
    release(model)  # packed copies are rebuilt in the new precision on the next call
    model.to(DTYPES[precision])
    if precision != "int8":
        return model
    adapter = adapter_for(model)
    for i in range(adapter.num_layers):
        ffn = adapter.ffn(i)
        inside_sparse = set()
        if isinstance(ffn, BankSparseFFN):
            int8_grid(ffn)
            inside_sparse = {id(m) for m in ffn.modules()}
        layer = adapter.layer(i)
        for name, linear in adapter.linears(i).items():
            if id(linear) not in inside_sparse:
                _replace(layer, name, Int8Linear(linear))
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(head, nn.Linear):
        tied = head.weight is embedding.weight
        model.set_output_embeddings(Int8Linear(head))
        if tied:  # the head is its own int8 copy now; the embedding keeps the bf16 table
            model.config.tie_word_embeddings = False
    return model
