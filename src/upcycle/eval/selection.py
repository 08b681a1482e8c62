"""How well a bank-sparse FFN chooses its channels: recall of the oracle's top-k per bank, and density."""

from __future__ import annotations

import torch

from upcycle.arch import adapter_for
from upcycle.hooks import hooked, run_blocks
from upcycle.modules import BankSparseFFN


@torch.no_grad()
def oracle_masks(ffn: BankSparseFFN, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The oracle's kept channels (top-k of |act(gate) * up| per bank) for the FFN inputs x, as booleans."""
    return torch.cat([ffn.oracle_mask(x[s : s + chunk]) for s in range(0, len(x), chunk)]).bool()


@torch.no_grad()
def predictor_recall(ffn: BankSparseFFN, x: torch.Tensor) -> float:
    """Fraction of the oracle's kept channels (top-k of |act(gate) * up| per bank) that the
    predictor also keeps, over the tokens x (their FFN inputs)."""
    oracle = oracle_masks(ffn, x)
    predicted = torch.cat([ffn.predicted_mask(x[s : s + 4096]) for s in range(0, len(x), 4096)]).bool()
    return float((oracle & predicted).sum() / oracle.sum())


@torch.no_grad()
def selection_stats(model, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """Per sparse layer, on the model's own inputs: recall of the predictor against this model's
    oracle (its own FFN's true top-k per bank) and the density actually kept."""
    adapter = adapter_for(model)
    sparse_layers = [i for i in range(adapter.num_layers) if adapter.ffn_kind(i) == BankSparseFFN.ffn_kind]
    hits = {i: [0.0, 0.0, 0.0, 0.0] for i in sparse_layers}  # matched, oracle total, kept, entries

    def count(i, module: BankSparseFFN, args):
        x = args[0]
        h = module.activation(x)
        gate = module.gate_values(x, h)
        kept = torch.ones_like(h, dtype=torch.bool) if gate is None else gate.detach() != 0
        oracle = module.oracle_mask(x, h).bool()
        hits[i][0] += float((oracle & kept).sum())
        hits[i][1] += float(oracle.sum())
        hits[i][2] += float(kept.sum())
        hits[i][3] += h.numel()

    with hooked({i: adapter.ffn(i) for i in sparse_layers}, pre=count):
        run_blocks(model, blocks, batch_size=batch_size)
    return {
        "layers": sparse_layers,
        "recall": [hits[i][0] / hits[i][1] for i in sparse_layers],
        "density": [hits[i][2] / hits[i][3] for i in sparse_layers],
    }
