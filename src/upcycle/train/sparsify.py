"""sparsify's training glue: the predictor warm-up (layer-local), the router loss, k annealing, the stage transform.

    warm_up_predictors(sparse, inputs, held_tokens, config, report)   # each layer's predictor on its cached inputs
    stages: [{transform: sparsify, ...}]                               # in a run config
    losses: [{name: router}]    callbacks: [{name: anneal_keep}]
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from upcycle.arch import adapter_for
from upcycle.errors import check
from upcycle.eval.selection import oracle_masks, predictor_recall
from upcycle.modules import BankSparseFFN
from upcycle.modules.bank_sparse import oracle_ranking_loss
from upcycle.train.layerwise import fit
from upcycle.train.losses import LossInputs, register_loss
from upcycle.train.trainer import Callback, register_callback, register_transform


def fit_predictor(ffn: BankSparseFFN, x: torch.Tensor, steps: int, lr: float, batch: int,
                  generator: torch.Generator) -> list[float]:
    """Fit the predictor to the oracle mask with the FFN frozen (see oracle_ranking_loss)."""
    oracle = oracle_masks(ffn, x)
    params = list(ffn.predictor.parameters())

    def loss(index):
        z = ffn.predictor(x[index].to(params[0].dtype))
        return oracle_ranking_loss(z, oracle[index].to(z.dtype), ffn.bank, ffn.keep)

    return fit([{"params": params, "lr": lr}], loss, steps=steps, rows=len(x), batch=batch, generator=generator,
               optimizer="adam")


def warm_up_predictors(sparse, inputs: dict[int, torch.Tensor], held_tokens: int, config, report) -> None:
    """Per layer with calibration inputs: recall before, fit the predictor on the rows after the
    first `held_tokens` (warmup_steps of them), recall after on the held-out rows; into `report`.
    The inputs are freed layer by layer."""
    adapter = adapter_for(sparse)
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(report.layers, desc="predictors", disable=not config.progress, leave=False)
    for i in bar:
        x = inputs.pop(i, None)
        if x is None:
            continue
        ffn = adapter.ffn(i)
        x_held, x_fit = x[:held_tokens], x[held_tokens:]
        report.recall_init.append(predictor_recall(ffn, x_held))
        if config.warmup_steps and any(True for _ in ffn.predictor.parameters()):
            fit_predictor(ffn, x_fit, config.warmup_steps, config.warmup_lr, config.warmup_batch, generator)
        report.recall.append(predictor_recall(ffn, x_held))
        bar.set_postfix(layer=i, recall=f"{report.recall[-1]:.3f}")
    sparse.eval()


@register_transform("sparsify")
def _sparsify_stage(model, tokenizer=None, **options):
    from upcycle.commands.sparsify import sparsify  # the verb's whole in-memory pipeline

    return sparsify(model, tokenizer, **options)


@register_callback("anneal_keep")
class AnnealKeep(Callback):
    """k goes linearly from `start` (default: the whole bank, i.e. dense) down to each layer's target
    over the first `fraction` of the stage's steps, and stays there. Set from the step count, so a
    resumed run continues with the k it had."""

    def __init__(self, start: int | None = None, fraction: float = 0.5):
        check(start is None or start >= 1, "anneal_keep start", start, "None or >= 1")
        check(0 < fraction <= 1, "anneal_keep fraction", fraction, "in (0, 1]")
        self.start, self.fraction = start, fraction

    def on_stage_start(self, trainer) -> None:
        stage = trainer.config.stages[trainer.progress.stage_index]
        ramp = max(1.0, self.fraction * trainer.stage_steps(stage))
        t = min(1.0, trainer.progress.stage_step / ramp)
        for module in trainer.model.modules():
            if isinstance(module, BankSparseFFN):
                start = module.bank if self.start is None else min(self.start, module.bank)
                module.keep = max(module.sparsity.keep, round(start + (module.sparsity.keep - start) * t))

    def on_step_end(self, trainer, record: dict) -> None:
        self.on_stage_start(trainer)



@register_loss("router")
def router_loss(inputs: LossInputs) -> torch.Tensor:
    """Keeps every predictor tracking its own FFN's top-k per bank as the FFN trains (the warm-up's
    ranking loss, on the live activations): mean over the bank-sparse layers of the last forward."""
    values = [m.router_loss() for m in inputs.model.modules() if isinstance(m, BankSparseFFN)]
    values = [v for v in values if v is not None]
    if not values:
        raise ValueError("the router loss needs bank-sparse FFNs with a predictor, in training mode")
    return torch.stack(values).mean()
