"""sparsify: a dense SwiGLU model -> a predictor-gated bank-sparse one, close to dense before any training.

    sparse, report = upcycle.sparsify(model, tokenizer, SparsifyConfig(bank=64, keep=16))

calibrate (each chosen layer's FFN inputs on calibration text, 1/8 held out) -> transform
(ops.sparsify.to_bank_sparse) -> warm up each predictor on the dense model's own oracle, base frozen
-> (convert_steps) fit each layer's sparse FFN to the dense one, bottom up (train.sparsify) -> verify
(recall@k on the held-out tokens; sparse vs dense outputs). The input model is left unchanged.
"""

from __future__ import annotations

from dataclasses import asdict

from upcycle import data
from upcycle.errors import ConfigError
from upcycle.eval import compare
from upcycle.ops.calibrate import ffn_inputs
from upcycle.ops.sparsify import SparsifyConfig, SparsifyReport, sparse_layers, to_bank_sparse
from upcycle.pipelines import Result, configured
from upcycle.train.registry import register_transform
from upcycle.train.sparsify import convert_layerwise, warm_up_predictors

__all__ = ["SparsifyConfig", "SparsifyReport", "run"]


def run(
    model, tokenizer=None, config: SparsifyConfig | None = None, *, progress: bool = True, **overrides
) -> Result[SparsifyReport]:
    """A bank-sparse copy of `model` and its SparsifyReport; `overrides` are SparsifyConfig fields."""
    cfg = configured(SparsifyConfig, config, overrides)
    layers = sparse_layers(model, cfg)  # refuse a model or layer choice that cannot work before any calibration
    inputs, held_blocks, held_tokens, blocks = {}, None, 0, None
    if cfg.needs_calibration:
        if tokenizer is None:
            raise ConfigError(
                "sparsify: calibration (warm-up, GPTQ shadow, conversion, permute or threshold) needs "
                "the model's tokenizer"
            )
        blocks = data.blocks(
            cfg.calibration, tokenizer, "train", cfg.seq_len, max_blocks=max(2, cfg.calibration_tokens // cfg.seq_len)
        )
        n_held = max(1, len(blocks) // 8)  # held out from fitting: recall is measured on them
        held_blocks, held_tokens = blocks[:n_held], n_held * cfg.seq_len
        inputs = ffn_inputs(model, blocks, layers, progress=progress)
    sparse, report = to_bank_sparse(model, cfg, inputs, held_tokens)
    if cfg.selection == "predictor":
        warm_up_predictors(sparse, inputs, held_tokens, cfg, report, progress=progress)
    if cfg.convert_steps:
        convert_layerwise(sparse, model, blocks[len(held_blocks) :], held_blocks, cfg, report, progress=progress)
    if held_blocks is not None:
        report.equivalence = asdict(compare(model, sparse, held_blocks))
    return Result(sparse, report)


@register_transform("sparsify", options=SparsifyConfig)
def sparsify_stage(model, tokenizer=None, **options):
    """A training stage's transform: the whole pipeline on the model as the stage finds it."""
    return run(model, tokenizer, SparsifyConfig(**options), progress=False).model
