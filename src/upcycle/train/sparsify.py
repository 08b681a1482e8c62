"""sparsify's training glue: the predictor warm-up and the layer-wise conversion (both layer-local),
the router loss, k annealing (the `sparsify` stage transform is the pipeline's: upcycle.pipelines.sparsify).

    warm_up_predictors(sparse, inputs, held_tokens, config, report)   # each layer's predictor on its cached inputs
    convert_layerwise(sparse, dense, fit_blocks, held_blocks, config, report)   # each sparse FFN fitted to its dense one
    losses: [{name: router}]    callbacks: [{name: anneal_keep}]
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from upcycle.arch import adapter_for
from upcycle.errors import ConfigError, check
from upcycle.eval.selection import oracle_masks, predictor_recall
from upcycle.modules import BankSparseFFN
from upcycle.modules.bank_sparse import oracle_ranking_loss
from upcycle.ops.calibrate import LayerStream
from upcycle.train.layerwise import fit
from upcycle.train.losses import LossInputs, register_loss
from upcycle.train.registry import register_callback
from upcycle.train.trainer import Callback


def fit_predictor(
    ffn: BankSparseFFN, x: torch.Tensor, steps: int, lr: float, batch: int, generator: torch.Generator
) -> list[float]:
    """Fit the predictor to the oracle mask with the FFN frozen (see oracle_ranking_loss)."""
    oracle = oracle_masks(ffn, x)
    params = list(ffn.predictor.parameters())

    def loss(index):
        z = ffn.predictor(x[index].to(params[0].dtype))
        return oracle_ranking_loss(z, oracle[index].to(z.dtype), ffn.bank, ffn.keep)

    return fit(
        [{"params": params, "lr": lr}],
        loss,
        steps=steps,
        rows=len(x),
        batch=batch,
        generator=generator,
        optimizer="adam",
    )


def warm_up_predictors(
    sparse, inputs: dict[int, torch.Tensor], held_tokens: int, config, report, *, progress: bool = False
) -> None:
    """Per layer with calibration inputs: recall before, fit the predictor on the rows after the
    first `held_tokens` (warmup_steps of them), recall after on the held-out rows; into `report`.
    The inputs are freed layer by layer."""
    adapter = adapter_for(sparse)
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(report.layers, desc="predictors", disable=not progress, leave=False)
    for i in bar:
        x = inputs.pop(i, None)
        if x is None:
            continue
        warm_up_predictor(adapter.ffn(i), x, held_tokens, config, report, generator)
        bar.set_postfix(layer=i, recall=f"{report.recall[-1]:.3f}")
    sparse.eval()


def warm_up_predictor(ffn: BankSparseFFN, x: torch.Tensor, held_tokens: int, config, report, generator) -> None:
    """One layer's: recall on the first `held_tokens` rows of its FFN inputs `x`, the predictor fitted to
    the oracle on the rest (a shadow has nothing to fit), recall again; both into `report`."""
    x_held, x_fit = x[:held_tokens], x[held_tokens:]
    report.recall_init.append(predictor_recall(ffn, x_held))
    if config.warmup_steps and any(True for _ in ffn.predictor.parameters()):
        fit_predictor(ffn, x_fit, config.warmup_steps, config.warmup_lr, config.warmup_batch, generator)
    report.recall.append(predictor_recall(ffn, x_held))


# ---- distilling a sparse FFN into its dense one, on cached rows ------------------------------------


def ffn_groups(ffn: BankSparseFFN, lr: float, *, train_ffn: bool = True, ffn_lr_scale: float = 0.1) -> list[dict]:
    """The predictor (lr; none for a shadow) and, with train_ffn, the FFN weights (lr * ffn_lr_scale)."""
    groups = [{"params": list(ffn.predictor.parameters()), "lr": lr}]
    if train_ffn:
        groups.append(
            {"params": [ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight], "lr": lr * ffn_lr_scale}
        )
    return groups


def distillation_loss(ffn: BankSparseFFN, rows: torch.Tensor, targets: torch.Tensor, router_weight: float = 1.0):
    """loss(index) = ||ffn(rows) - targets||^2 / ||targets||^2 on the sampled rows, + the router loss
    (the predictor tracking its own FFN's top-k; a shadow has none): layer-local KD of a dense FFN."""

    def loss(pick):
        target = targets[pick]
        error = ffn.reference_forward(rows[pick]) - target
        router = ffn.router_loss()
        return error.pow(2).mean() / target.pow(2).mean() + (router_weight * router if router is not None else 0.0)

    return loss


@torch.no_grad()
def relative_error(ffn: torch.nn.Module, rows: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> float:
    """||ffn(rows) - targets||^2 / ||targets||^2, in eval mode, the rows in the FFN's dtype."""
    was_training = ffn.training
    ffn.eval()
    dtype = ffn.down_proj.weight.dtype
    error = sum(
        float((ffn(r.to(dtype)).float() - t).pow(2).sum()) for r, t in zip(rows.split(chunk), targets.split(chunk))
    )
    ffn.train(was_training)
    return error / float(targets.pow(2).sum())


@torch.no_grad()
def _dense_outputs(dense_ffn: torch.nn.Module, rows: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([dense_ffn(r) for r in rows.split(chunk)])


def convert_layerwise(
    sparse, dense, fit_blocks: torch.Tensor, held_blocks: torch.Tensor, config, report, *, progress: bool = False
) -> None:
    """Layer by layer, bottom up: take the rows the layer's FFN sees in the sparse model as converted so
    far (the layers below already fitted; carried up one layer at a time, ops.calibrate.LayerStream),
    and fit its predictor and FFN weights so that its output reproduces the dense model's FFN of that
    layer on those rows (`convert_steps` steps of `convert_rows` rows). The relative output error on
    held-out rows, before and after, goes into the report (`convert_error_before`, `convert_error_after`)."""
    sparse_adapter, dense_adapter = adapter_for(sparse), adapter_for(dense)
    generator = torch.Generator().manual_seed(config.seed)
    fit_stream, held_stream = LayerStream(sparse, fit_blocks), LayerStream(sparse, held_blocks)
    converting, top = set(report.layers), max(report.layers)
    bar = tqdm(range(top + 1), desc="layer-wise conversion", disable=not progress, leave=False)
    for i in bar:
        if i in converting:
            ffn = sparse_adapter.ffn(i)
            rows, held = fit_stream.module_inputs(ffn), held_stream.module_inputs(ffn)
            convert_layer(ffn, dense_adapter.ffn(i), rows, held, config, report, generator, model=sparse)
            bar.set_postfix(
                layer=i, error=f"{report.convert_error_before[-1]:.3f}->{report.convert_error_after[-1]:.3f}"
            )
        if i < top:  # the layer as converted feeds the next one
            fit_stream.advance(), held_stream.advance()
    sparse.eval()


def convert_layer(ffn, dense_ffn, rows, held, config, report, generator, *, model=None, kept=None) -> None:
    """Fit one sparse FFN (predictor and weights) so that its output on `rows`, its inputs in the model as
    converted below it, reproduces `dense_ffn`'s; relative error on `held` rows before and after into
    `report`. `model`: the one the FFN sits in (frozen but for the FFN while fitting); `kept()`: puts the
    FFN in the form it is kept in (fitted in fp32, kept in bf16), before the error after is measured."""
    targets, held_targets = _dense_outputs(dense_ffn, rows), _dense_outputs(dense_ffn, held)
    report.convert_error_before.append(relative_error(ffn, held, held_targets))
    fit(
        ffn_groups(ffn, config.convert_lr, ffn_lr_scale=config.convert_ffn_lr_scale),
        distillation_loss(ffn, rows, targets),
        steps=config.convert_steps,
        rows=len(rows),
        batch=config.convert_rows,
        generator=generator,
        optimizer="adamw",
        weight_decay=0.0,
        model=model if model is not None else ffn,
        train_mode=True,
    )
    ffn.router_inputs = None
    if kept is not None:
        kept()
    report.convert_error_after.append(relative_error(ffn, held, held_targets))


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
        raise ConfigError(
            "the router loss needs bank-sparse FFNs with a trained (low-rank) predictor, in training "
            "mode; a shadow predictor has nothing to train: drop `router` from the losses"
        )
    return torch.stack(values).mean()
