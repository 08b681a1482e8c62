"""How high can a cheap predictor's recall of the oracle's top-16 of 64 go on smollm2-135m?

    python benchmarks/predictor_ceiling.py      # ~3 minutes on 2 CPU cores

On cached FFN inputs of a few layers (shakespeare + pystdlib calibration text, 1/8 held out), the
recall of the true top-16 of |act(x W_gate) * (x W_up)| in each bank of 64 reached by:
  svd64            the rank-64 SVD of W_gate, unfitted (upcycle's predictor init)
  fit64 / fit576   a linear predictor (rank 64 / full rank) fitted with the warm-up's ranking loss
  twobranch128/256 act(x G_r) * (x U_r) with G_r, U_r the best rank-r maps on these inputs
  int4             the exact product from W_gate, W_up rounded to 4 bits (per-row scale)
  noise20          the oracle's own scores times exp(0.2 * N(0, 1)): how precise a score must be
Results: benchmarks/results/predictor_ceiling.json.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from harness import save

import upcycle
from upcycle import data
from upcycle.arch import adapter_for
from upcycle.eval.selection import predictor_recall
from upcycle.modules import BankSparseFFN, BankSparsity, bank_topk_mask
from upcycle.ops.calibrate import ffn_inputs
from upcycle.train.sparsify import fit_predictor

BANK, KEEP = 64, 16
LAYERS = [0, 10, 20, 29]


def recall(scores: torch.Tensor, oracle: torch.Tensor) -> float:
    kept = bank_topk_mask(scores, BANK, KEEP).bool()
    return float((kept & oracle).sum() / oracle.sum())


def whitened_low_rank(weight: torch.Tensor, x: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-r map closest to x -> x W^T in mean squared error over these inputs."""
    cov = x.T @ x / len(x) + 1e-6 * torch.eye(x.shape[1])
    chol = torch.linalg.cholesky(cov)
    u, s, vh = torch.linalg.svd(weight @ chol, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(chol)


def int4(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().amax(1, keepdim=True) / 7
    return (weight / scale).round().clamp(-8, 7) * scale


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.manual_seed(0)
    model, tok = upcycle.load("smollm2-135m")
    adapter = adapter_for(model)
    blocks = data.blocks("shakespeare+pystdlib", tok, "train", 256, max_blocks=64)
    inputs = ffn_inputs(model, blocks, LAYERS)
    gen = torch.Generator().manual_seed(0)
    results = {}
    for i in LAYERS:
        w = adapter.ffn_weights(i)
        g, u = w.gate.detach(), w.up.detach()
        x = inputs[i]
        held, fit = x[: len(x) // 8], x[len(x) // 8 :]
        act = (F.silu(held @ g.T) * (held @ u.T)).abs()
        oracle = bank_topk_mask(act, BANK, KEEP).bool()
        row = {}
        for rank in (64, 576):
            ffn = BankSparseFFN(x.shape[1], g.shape[0], BankSparsity(BANK, KEEP, rank))
            with torch.no_grad():
                ffn.gate_proj.weight.copy_(g)
                ffn.up_proj.weight.copy_(u)
            ffn.predictor.init_svd(g)
            if rank == 64:
                row["svd64"] = predictor_recall(ffn, held)
            fit_predictor(ffn, fit, 600, 1e-2, 1024, gen)
            row[f"fit{rank}"] = predictor_recall(ffn, held)
        for rank in (128, 256):
            g_r, u_r = whitened_low_rank(g, fit, rank), whitened_low_rank(u, fit, rank)
            row[f"twobranch{rank}"] = recall((F.silu(held @ g_r.T) * (held @ u_r.T)).abs(), oracle)
        row["int4"] = recall((F.silu(held @ int4(g).T) * (held @ int4(u).T)).abs(), oracle)
        row["noise20"] = recall(act * torch.exp(0.2 * torch.randn(act.shape, generator=gen)), oracle)
        results[str(i)] = {k: round(v, 3) for k, v in row.items()}
        print(i, results[str(i)], flush=True)
    save(
        "predictor_ceiling",
        {
            "model": "smollm2-135m",
            "bank": BANK,
            "keep": KEEP,
            "layers": results,
            "held_out_tokens": len(held),
            "fit_tokens": len(fit),
        },
        indent=1,
    )


if __name__ == "__main__":
    main()
