"""Inference precision of a whole model, dense or bank-sparse, so that both run the same way.

    fp32  every weight and activation fp32 (training's precision)
    bf16  every weight and activation bf16 (norms and softmax as Hugging Face runs them in bf16); the
          bank-sparse kernel packs its copy in bf16 and computes in fp32 registers
    int8  bf16 activations; every linear layer's weight int8 with one scale per output row — attention,
          dense FFNs and the LM head as int8 `RowLinear`s, a bank-sparse
          FFN's gate/up/down put on the int8 grid of its kernel rows (one scale per row of W_gate, of
          W_up and of W_down^T: per channel), so that its reference path and its kernel compute with
          the same values; the embedding table stays bf16 (a token reads one row of it)
    int4  int4 weights with an fp16 scale per group of 32 inputs (Q4_0's grid and bytes: 4.5 bits a
          weight); the products read the activations at 8 bits per group of 32 (Q8_0's), as llama.cpp
          computes Q4_0, and between them the activations stay fp32, as llama.cpp keeps them (bf16 ones
          cost smollm2-135m 2.5 % more perplexity on pystdlib; a decoding step's activations are a few
          KB against the MBs of weights it reads). The LM head stays int8, as llama.cpp keeps its output
          matrix at 6 bits in a Q4_0 file (an int4 head costs smollm2-135m 6-10 % more perplexity).
          benchmarks/int4_grid.py measures each of these choices.
          A layer whose inputs are not a multiple of 64 (the kernel's chunk) stays int8 too.
          With `calibration` (token blocks), the codes of every int4 layer outside the bank-sparse FFNs
          are chosen by GPTQ on them (upcycle.infer.calibrate): the same grid, bytes and speed.
    int4a as int4 with a minimum per group too (Q4_1's grid: c d + m, 5 bits a weight, kernels.quant.
          int4a_rows): no level spent on the side of zero a group's weights avoid. Rounded to nearest.

At every precision a bank-sparse FFN keeps its weights once, as the kernel's packed copy
(upcycle.infer.lean_ffn); its reference path reads them from there. The linear layers outside the
bank-sparse FFNs (attention, dense FFNs, the LM head) become `upcycle.infer.rows.RowLinear`s: at a
decoding step's single row they run the kernel's row dots, which read the weights at the memory's pace where PyTorch's small bf16 matmuls do not; at more
rows, the plain matmul. Layers that read the same input (attention's q, k and v; a dense FFN's gate and
up: upcycle.arch names them) are stacked into one such layer (`StackedRows`), one call for the group.
Dense and sparse models are converted alike, so their speeds compare honestly.

A decoding step is memory-bound, so bytes are time: bf16 halves what every token reads, int8 quarters
it. The weights the row dots stream are moved to huge-page memory, as the bank-sparse kernel's packed
copies are (upcycle.kernels.memory): with 4 KiB pages a dense model's FFN weights streamed more slowly
than a sparse one's packed copies, which would favour the sparse model in any comparison. `to_precision`
converts in place, like nn.Module.to, and returns the model.
"""

from __future__ import annotations

import torch
from torch import nn

from upcycle.arch import adapter_for
from upcycle.errors import check
from upcycle.infer.calibrate import gptq_int4
from upcycle.infer.lean_ffn import make_lean, unpack
from upcycle.infer.rows import INT4S, RowLinear, RowsOf, StackedRows
from upcycle.kernels import QUANTIZERS, int4_fits, release
from upcycle.kernels.memory import huge_page_copy
from upcycle.kernels.quant import dequantize_int4
from upcycle.modules import BankSparseFFN
from upcycle.modules.bank_sparse import ShadowPredictor

PRECISIONS = ("fp32", "bf16", "int8", "int4", "int4a")
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "int8": torch.bfloat16,
    "int4": torch.float32,  # the activations between the int4 products: see the module's docstring
    "int4a": torch.float32,
}


def _on_grid(rows: torch.Tensor, precision: str) -> torch.Tensor:
    codes, scales = QUANTIZERS[precision](rows)
    return codes.float() * scales[:, None] if precision == "int8" else dequantize_int4(codes, scales)


@torch.no_grad()
def kernel_grid(ffn, precision: str = "int8") -> None:
    """Put a bank-sparse FFN's gate, up and down weights on the int8 (or int4) grid its kernel reads (per
    row of W_gate, W_up and W_down^T: int8 one scale, int4 one per group of 32) and mark it so the kernel
    packs that precision."""
    for linear, transpose in ((ffn.gate_proj, False), (ffn.up_proj, False), (ffn.down_proj, True)):
        w = linear.weight.t() if transpose else linear.weight
        grid = _on_grid(w, precision)
        linear.weight.copy_((grid.t() if transpose else grid).to(linear.weight.dtype))
    ffn.kernel_precision = precision


def _fits(precision: str, linear: nn.Module) -> str:
    """int4 where the kernel's chunks fit the inputs (a multiple of 64), else int8."""
    return "int8" if precision in INT4S and not int4_fits(linear.in_features) else precision


@torch.no_grad()
def to_precision(model: nn.Module, precision: str, calibration: torch.Tensor | None = None) -> nn.Module:
    """Convert `model` in place to fp32, bf16, int8 or int4 inference (see the module's docstring);
    `calibration`: token blocks [n, seq] for GPTQ-rounded int4 weights."""
    check(precision in PRECISIONS, "precision", precision, f"one of {', '.join(PRECISIONS)}")
    for module in model.modules():
        if isinstance(module, BankSparseFFN):
            unpack(module)  # converted before: its weights back from its pack, to convert again
    rounded = gptq_int4(model, calibration) if calibration is not None and precision == "int4" else {}
    release(model)  # packed copies are rebuilt in the new precision on the next call
    adapter = adapter_for(model)
    for i in range(adapter.num_layers):  # each packed before the model moves: one layer's float FFN at a time
        ffn = adapter.ffn(i)
        if isinstance(ffn, BankSparseFFN):
            ffn.to(DTYPES[precision])
            if precision in QUANTIZERS:
                kernel_grid(ffn, _fits(precision, ffn.gate_proj))  # gate, up and down^T rows: H inputs
            if isinstance(ffn.predictor, ShadowPredictor):
                ffn.predictor.for_inference()
            make_lean(ffn)  # its weights kept once, as the kernel's pack
    model.to(DTYPES[precision])
    for i in range(adapter.num_layers):
        ffn = adapter.ffn(i)
        inside_sparse = {id(m) for m in ffn.modules()} if isinstance(ffn, BankSparseFFN) else set()
        layer = adapter.layer(i)
        plain = _plain_linears(layer, adapter.linears(i), inside_sparse)
        stacked = set()
        for names in adapter.shared_input_linears(i):  # one call of the row dots for a group
            if all(name in plain for name in names):
                chosen = [rounded.get((i, name)) for name in names]
                stack = StackedRows(
                    [plain[name] for name in names],
                    _fits(precision, plain[names[0]]),
                    quantized=chosen if all(chosen) else None,
                )
                parent = names[0].rpartition(".")[0]
                layer.get_submodule(parent).add_module(
                    "stacked_" + "_".join(n.rpartition(".")[2] for n in names), stack
                )
                for j, name in enumerate(names):
                    layer.set_submodule(name, RowsOf(stack, j))
                stacked |= set(names)
        for name, linear in plain.items():
            if name not in stacked:
                layer.set_submodule(name, RowLinear(linear, _fits(precision, linear), quantized=rounded.get((i, name))))
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(head, (nn.Linear, RowLinear)):
        plain = _plain(head)
        tied = plain.weight is embedding.weight
        model.set_output_embeddings(RowLinear(plain, "int8" if precision in INT4S else precision))
        if tied and precision in QUANTIZERS:  # the head is its own copy now; the embedding keeps the bf16 table
            model.config.tie_word_embeddings = False
    _streamed_from_huge_pages(model)
    return model


def _streamed_from_huge_pages(model: nn.Module) -> None:
    """Every RowLinear's stored weight moved into huge-page memory, in place: a parameter keeps its
    identity (a tied embedding and head stay one tensor), int8 codes are a buffer of the layer. (Packing
    the small ones - SmolLM2's 0.4-1.3 MB attention matrices - into one huge-page arena as well made no
    measurable difference: two same-process runs of the lean decoder, within 0.2 ms of 8-17 ms a token.)"""
    moved = set()
    for module in model.modules():
        if not isinstance(module, RowLinear) or module.stored.device.type != "cpu" or id(module.stored) in moved:
            continue
        moved.add(id(module.stored))
        if module.quantized:
            module.codes = huge_page_copy(module.codes)
        else:
            module.weight.data = huge_page_copy(module.weight.data)


def _plain_linears(layer: nn.Module, linears: dict[str, nn.Module], inside_sparse: set[int]) -> dict[str, nn.Linear]:
    """The layer's linear layers outside its bank-sparse FFN, by name, as plain nn.Linears: an earlier
    conversion's RowLinears and stacked rows undone (the stacks taken off the layer)."""
    stacks = {name: m for name, m in layer.named_modules() if isinstance(m, StackedRows)}
    in_stacks = {id(m) for stack in stacks.values() for m in stack.modules()}
    converted = {
        name: m for name, m in layer.named_modules() if isinstance(m, (RowLinear, RowsOf)) and id(m) not in in_stacks
    }
    plain = {name: _plain(m) for name, m in {**linears, **converted}.items() if id(m) not in inside_sparse}
    for name in stacks:
        parent, _, attr = name.rpartition(".")
        delattr(layer.get_submodule(parent), attr)
    return plain


def _plain(linear: nn.Module) -> nn.Linear:
    """An nn.Linear with the weight a linear layer (plain, or a RowLinear or RowsOf from an earlier
    conversion) computes with, in the model's current dtype."""
    if isinstance(linear, nn.Linear):
        return linear
    weight = linear.dequantized()
    plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    plain.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:  # a stacked layer's bias is a slice of the stack's
        bias = linear.bias
        plain.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return plain
