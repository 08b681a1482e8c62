"""int4 weights rounded by GPTQ on calibration text, for `to_precision(model, "int4", calibration=...)`.

Q4_0's rule rounds each weight to its nearest level; GPTQ (kernels.quant.int4_rows_gptq) rounds the
inputs of a layer in order and carries each one's error onto the inputs not yet rounded, weighted by the
inverse of H = E[x x^T] of the layer's inputs, so that what the layer computes on such inputs stays close
rather than each weight. The grid, the bytes and the kernel are Q4_0's: only which code each weight gets
changes, so the speed is the same. llama.cpp's counterpart is an importance matrix (`llama-imatrix`), which
weights each input's rounding error by E[x_i^2], the diagonal of this H.

H is collected with the model itself: the calibration blocks run through it, every linear layer's input
(one H per group of layers that read the same input: attention's q, k and v; a dense FFN's gate and up)
summed as x^T x. The moments of every layer of a 3B model do not fit in memory (hidden 4,608: 85 MB
each, four a layer), so the layers are taken a chunk at a time (`budget_mb` of moments), the blocks run
again for each chunk and stopped after its last layer. H comes from the model as it is, not from the
already rounded layers before it (GPTQ's original runs the layers in sequence on the rounded model's
outputs; here the cost is one pass per chunk instead of a layer-by-layer runner per architecture).

A bank-sparse FFN's rows are left to Q4_0's rule: its down rows are stored transposed (a channel's
weights over the hidden outputs), along which GPTQ has no input correlation to use.
"""

from __future__ import annotations

import torch
from torch import nn

from upcycle import data
from upcycle.arch import adapter_for
from upcycle.hooks import StopForward, hooked, run_blocks
from upcycle.kernels.quant import int4_fits, int4_rows_gptq
from upcycle.modules import BankSparseFFN

CALIBRATION_TEXT = "shakespeare+pystdlib"
CALIBRATION_TOKENS = 4096  # 16 blocks of 256: GPTQ's H for SmolLM2-135M's int4 in ~20 s on 2 cores
TOKENS_HELP = "int4: calibration tokens GPTQ rounds the weights on (0: Q4_0's own rounding)"


def calibration_blocks(tokenizer, tokens: int = CALIBRATION_TOKENS) -> torch.Tensor | None:
    """Blocks of 256 tokens of the calibration text's train split (None for 0 tokens: Q4_0's rule)."""
    if tokens <= 0:
        return None
    return data.blocks(CALIBRATION_TEXT, tokenizer, "train", 256, max_blocks=max(1, tokens // 256))


def input_groups(model: nn.Module) -> list[tuple[int, list[str]]]:
    """(layer, names) of every group of linear layers that read one input and can be int4 (their inputs a
    multiple of 64), outside bank-sparse FFNs: a shared-input group, or one layer alone."""
    adapter = adapter_for(model)
    out = []
    for i in range(adapter.num_layers):
        ffn = adapter.ffn(i)
        inside = {id(m) for m in ffn.modules()} if isinstance(ffn, BankSparseFFN) else set()
        linears = {n: m for n, m in adapter.linears(i).items() if id(m) not in inside and int4_fits(m.in_features)}
        grouped = [names for names in adapter.shared_input_linears(i) if all(n in linears for n in names)]
        alone = [[n] for n in linears if not any(n in names for names in grouped)]
        out += [(i, names) for names in grouped + alone]
    return out


@torch.no_grad()
def gptq_int4(model: nn.Module, blocks: torch.Tensor, budget_mb: float = 2048) -> dict[tuple[int, str], tuple]:
    """{(layer, name): (codes, scales)} of int4_rows_gptq for every layer `input_groups` names whose every
    input the blocks reached, H from the token blocks [n, seq] run through `model` (module docstring)."""
    adapter, out = adapter_for(model), {}
    chunk, size = [], 0.0
    for i, names in input_groups(model):
        k = adapter.layer(i).get_submodule(names[0]).in_features
        if chunk and size + k * k * 4 / 2**20 > budget_mb:
            out |= _chunk(model, adapter, chunk, blocks)
            chunk, size = [], 0.0
        chunk.append((i, names))
        size += k * k * 4 / 2**20
    if chunk:
        out |= _chunk(model, adapter, chunk, blocks)
    return out


def _chunk(model, adapter, chunk: list[tuple[int, list[str]]], blocks: torch.Tensor) -> dict:
    firsts = {(i, names[0]): adapter.layer(i).get_submodule(names[0]) for i, names in chunk}
    moments = {key: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for key, m in firsts.items()}

    def collect(key, module, args):
        x = args[0].reshape(-1, module.in_features).float()
        moments[key].addmm_(x.T, x)

    def stop(*_):
        raise StopForward  # the layers after the chunk's last are not needed

    with hooked(firsts, pre=collect), hooked({"last": adapter.layer(chunk[-1][0])}, post=stop):
        run_blocks(model, blocks)
    out = {}
    for i, names in chunk:
        linears = [adapter.layer(i).get_submodule(n) for n in names]
        stacked = torch.cat([m.weight.detach().float().cpu() for m in linears])  # GPTQ rounds each row alone
        moment = moments.pop((i, names[0])).cpu()
        if not bool((moment.diagonal() > 0).all()):  # an input the blocks never reached (an expert never
            continue  # routed to): GPTQ would zero its weights; Q4_0's rule rounds them instead
        codes, scales = int4_rows_gptq(stacked, moment)
        start = 0
        for name, m in zip(names, linears):
            out[(i, name)] = (codes[start : start + m.out_features], scales[start : start + m.out_features])
            start += m.out_features
    return out
