"""What int4 costs smollm2-135m, and the choices behind upcycle's int4: the LM head int8 or int4, and
Q4_0's scale rule (the group's extreme ÷ −8) against a scale chosen per group for the least squared error,
and Q4_0's rounding against GPTQ's on calibration text (upcycle's int4 with `calibration=`).

    python benchmarks/int4_grid.py      # about 3 minutes on 2 cores

Held-out perplexity (2 blocks of 256 tokens a corpus) of the dense model at fp32 and converted by
`to_precision(model, "int4")` (every linear int4, the head int8: upcycle's default), with the head int4 as
well, and with the least-squares scale (11 fractions of the extreme, either sign, the fp16 scale of least
squared error per group) in place of Q4_0's, and with the codes chosen by GPTQ on 16 blocks of 256 tokens
of the train split (the same grid and bytes), with bf16 activations instead of fp32 (int8's, not llama.cpp's), and int4a
(a minimum per group: Q4_1's grid). Result: benchmarks/results/int4_grid.json.
"""

from __future__ import annotations

import argparse
import copy

import torch
from harness import held_out, save, score

from upcycle import data, hub, kernels
from upcycle.infer import precision
from upcycle.infer.precision import to_precision
from upcycle.infer.rows import RowLinear
from upcycle.kernels import quant


def least_squares_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4_rows' layout with each group's fp16 scale chosen for the least squared rounding error."""
    k = w.shape[-1]
    groups = w.detach().float().reshape(-1, k // 32, 32)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
    best_error, best = None, None
    for base in (extreme / -8, extreme / 7):
        for fraction in torch.linspace(0.5, 1.0, 11).tolist():
            d = (base * fraction).half().float()
            codes = torch.clamp(torch.round(groups / torch.where(d != 0, d, 1.0)) + 8, 0, 15)
            error = ((codes - 8) * d - groups).pow(2).sum(-1, keepdim=True)
            better = error if best_error is None else error < best_error
            best_error = error if best_error is None else torch.where(better, error, best_error)
            best = d if best is None else torch.where(better, d, best)
    codes = torch.clamp(torch.round(groups / torch.where(best != 0, best, 1.0)) + 8, 0, 15)
    packed = quant._pack_nibbles(torch.where(best != 0, codes, 8.0).to(torch.uint8).reshape(-1, k))
    return packed.reshape(*w.shape[:-1], k // 2), best.half().reshape(*w.shape[:-1], k // 32)


def int4_head(model, source):
    """The model with its LM head int4 too (upcycle keeps it int8)."""
    head = torch.nn.Linear(source.config.hidden_size, source.config.vocab_size, bias=False)
    head.weight = torch.nn.Parameter(source.get_output_embeddings().weight.detach().to(torch.bfloat16), False)
    model.set_output_embeddings(RowLinear(head, "int4"))
    return model


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    model, tokenizer = hub.load("smollm2-135m")
    val = held_out(tokenizer, ("shakespeare", "pystdlib"), blocks=2)
    rows = {"fp32": score(model, val), "int4": score(to_precision(copy.deepcopy(model), "int4"), val)}
    calibration = data.blocks("shakespeare+pystdlib", tokenizer, "train", 256, max_blocks=16)
    rows["int4, GPTQ on 16 calibration blocks"] = score(to_precision(copy.deepcopy(model), "int4", calibration), val)
    rows["int4a (a minimum per group: Q4_1's grid)"] = score(to_precision(copy.deepcopy(model), "int4a"), val)
    precision.DTYPES["int4"] = torch.bfloat16  # int8's activations instead of llama.cpp's fp32, this row only
    try:
        rows["int4, bf16 activations"] = score(to_precision(copy.deepcopy(model), "int4"), val)
    finally:
        precision.DTYPES["int4"] = torch.float32
    rows["int4, int4 head"] = score(int4_head(to_precision(copy.deepcopy(model), "int4"), model), val)
    rule = kernels.QUANTIZERS["int4"]
    kernels.QUANTIZERS["int4"] = least_squares_int4  # every int4 conversion's quantizer, this row only
    try:
        rows["int4, least-squares scales"] = score(to_precision(copy.deepcopy(model), "int4"), val)
    finally:
        kernels.QUANTIZERS["int4"] = rule
    save("int4_grid", {"model": "smollm2-135m", "held_out_blocks": 2, "ppl": rows})
    for name, ppl in rows.items():
        print(f"{name:28s} {ppl}")


if __name__ == "__main__":
    main()
