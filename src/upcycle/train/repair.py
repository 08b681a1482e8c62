"""Repair one layer of a bank-sparse model: retrain its predictor (and optionally its FFN), all else frozen.

The default objective is layer-local KD: distil the reference's dense FFN of that layer on the rows
the layer sees when the model reads long sequences (output error relative to the dense output, + that
layer's router loss, its predictor tracking its own FFN's top-k); "end_to_end" is LM + KD on the logits
through the whole model (slow on a CPU). Both run through the layer-local fitter (layerwise.fit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from upcycle.arch import adapter_for
from upcycle.errors import ConfigError
from upcycle.eval import kl_divergence
from upcycle.eval.localise import sparse_ffns
from upcycle.modules import BankSparseFFN
from upcycle.ops.calibrate import module_inputs
from upcycle.train.layerwise import fit
from upcycle.train.sparsify import distillation_loss, ffn_groups

OBJECTIVES = ("local", "end_to_end")


def _end_to_end_loss(model, reference, ffn, ids: torch.Tensor, router_weight: float) -> torch.Tensor:
    with torch.no_grad():
        ref = F.log_softmax(reference(input_ids=ids).logits[0, :-1].float(), dim=-1)
    logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    lm = F.nll_loss(logp, ids[0, 1:])
    kd = kl_divergence(ref, logp).mean()
    router = ffn.router_loss()
    return lm + kd + (router_weight * router if router is not None else 0.0)


def repair_layer(
    model,
    reference,
    layer: int,
    blocks: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 1e-3,
    train_ffn: bool = True,
    ffn_lr_scale: float = 0.1,
    router_weight: float = 1.0,
    objective: str = "local",
    rows_per_step: int = 2048,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Retrain one layer: its predictor (lr) and, with train_ffn, its FFN weights (lr * ffn_lr_scale);
    every other parameter untouched. Returns the losses.

    objective "local" (default): distil the reference's dense FFN of the same layer on the rows this
    layer sees when the model reads the long `blocks` [n, T]: loss = ||out - dense||^2 / ||dense||^2
    + router loss. "end_to_end": LM + KD(reference logits) + router loss on whole blocks, the gradient
    through every layer above: on a CPU several seconds a step at 1024 tokens for a 135M model, which is
    why the local objective is the default; kept for comparison."""
    ffn = sparse_ffns(model).get(layer)
    if ffn is None:
        raise ConfigError(f"layer {layer} has no bank-sparse FFN (sparse layers: {sorted(sparse_ffns(model))})")
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective {objective!r}: expected local or end_to_end")
    groups = ffn_groups(ffn, lr, train_ffn=train_ffn, ffn_lr_scale=ffn_lr_scale)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=generator)  # drawn for both objectives: same row samples as before
    reference.eval()
    if objective == "local":
        rows = module_inputs(model, {layer: ffn}, blocks, batch_size=1)[layer]
        dense = adapter_for(reference).ffn(layer)
        with torch.no_grad():
            targets = torch.cat([dense(chunk) for chunk in rows.split(4096)])
        loss, n_rows = distillation_loss(ffn, rows, targets, router_weight), len(rows)
    else:

        def loss(step):
            return _end_to_end_loss(model, reference, ffn, blocks[order[step % len(blocks)]][None], router_weight)

        n_rows = None
    try:
        return fit(
            groups,
            loss,
            steps=steps,
            rows=n_rows,
            batch=rows_per_step,
            generator=generator,
            optimizer="adamw",
            weight_decay=0.0,
            model=model,
            train_mode=True,
            progress=progress,
            desc=f"repair layer {layer}",
        )
    finally:
        model.eval()
        for module in model.modules():
            if isinstance(module, BankSparseFFN):
                module.router_inputs = None
