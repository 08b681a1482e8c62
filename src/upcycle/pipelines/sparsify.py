"""sparsify: a dense SwiGLU model -> a predictor-gated bank-sparse one, close to dense before any training.

    sparse, report = upcycle.sparsify(model, tokenizer, SparsifyConfig(bank=64, keep=16))

calibrate (each chosen layer's FFN inputs on calibration text, 1/8 held out) -> transform
(ops.sparsify.to_bank_sparse) -> warm up each predictor on the dense model's own oracle, base frozen
-> (convert_steps) fit each layer's sparse FFN to the dense one, bottom up (train.sparsify) -> verify
(recall@k on the held-out tokens; sparse vs dense outputs). The input model is left unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from upcycle import data
from upcycle.config import RunOptions
from upcycle.errors import ConfigError
from upcycle.eval import Equivalence, compare
from upcycle.modules.sparse_model import UpcycleSparseConfig, UpcycleSparseForCausalLM, make_sparse_ffn
from upcycle.ops.calibrate import ffn_inputs
from upcycle.ops.sparsify import (
    SparsifyConfig,
    SparsifyReport,
    init_sparse_ffn,
    pad_layer,
    permute_layer,
    sparse_layers,
    to_bank_sparse,
)
from upcycle.pipelines import Result, configured
from upcycle.pipelines.streaming import (
    LayerPass,
    StreamReport,
    open_source,
    probe_tokens,
    reloaded_equivalence,
    shard_bytes,
)
from upcycle.train.registry import register_transform
from upcycle.train.sparsify import convert_layer, convert_layerwise, warm_up_predictor, warm_up_predictors

__all__ = ["SparsifyConfig", "SparsifyReport", "run", "run_streamed"]


def calibration_blocks(cfg: SparsifyConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(all calibration blocks, the first 1/8 of them: held out from fitting, recall is measured on them)."""
    if tokenizer is None:
        raise ConfigError(
            "sparsify: calibration (warm-up, GPTQ shadow, conversion, permute or threshold) needs the model's tokenizer"
        )
    blocks = data.blocks(
        cfg.calibration, tokenizer, "train", cfg.seq_len, max_blocks=max(2, cfg.calibration_tokens // cfg.seq_len)
    )
    return blocks, blocks[: max(1, len(blocks) // 8)]


def run(
    model, tokenizer=None, config: SparsifyConfig | None = None, *, progress: bool = True, **overrides
) -> Result[SparsifyReport]:
    """A bank-sparse copy of `model` and its SparsifyReport; `overrides` are SparsifyConfig fields."""
    cfg = configured(SparsifyConfig, config, overrides)
    layers = sparse_layers(model, cfg)  # refuse a model or layer choice that cannot work before any calibration
    inputs, held_blocks, held_tokens, blocks = {}, None, 0, None
    if cfg.needs_calibration:
        blocks, held_blocks = calibration_blocks(cfg, tokenizer)
        held_tokens = held_blocks.numel()
        inputs = ffn_inputs(model, blocks, layers, progress=progress)
    sparse, report = to_bank_sparse(model, cfg, inputs, held_tokens)
    if cfg.selection == "predictor":
        warm_up_predictors(sparse, inputs, held_tokens, cfg, report, progress=progress)
    if cfg.convert_steps:
        convert_layerwise(sparse, model, blocks[len(held_blocks) :], held_blocks, cfg, report, progress=progress)
    if held_blocks is not None:
        report.equivalence = asdict(compare(model, sparse, held_blocks))
    return Result(sparse, report)


def run_streamed(
    source, out, config: SparsifyConfig | None = None, *, options: RunOptions = RunOptions(), report_files=None
) -> tuple[Path, SparsifyReport, StreamReport, Equivalence]:
    """Sparsify a checkpoint on disk layer by layer into OUT (shards), one layer in memory at a time: the
    same steps as `run`, each layer's on the dense model's FFN inputs (for GPTQ, the warm-up, permutation,
    thresholds) and, for the conversion, on the inputs the converted layers below give it. Each layer's
    statistics and fitting are in fp32 whatever the run's dtype. Returns (folder, report, the pass's
    memory and time, the written model read back against the one held on random tokens)."""
    cfg = configured(SparsifyConfig, config, {})
    lazy, tokenizer = open_source(source, options)
    adapter = lazy.adapter
    chosen = sparse_layers(lazy.model, cfg)
    width = adapter.ffn_weights(chosen[0]).width
    report = SparsifyReport(asdict(cfg), chosen, width + (-width % cfg.bank if cfg.pad else 0))
    probe = probe_tokens(lazy)
    sources, outputs, held_tokens = {}, {"probe": probe}, 0
    if cfg.needs_calibration:
        blocks, held_blocks = calibration_blocks(cfg, tokenizer)
        held_tokens = held_blocks.numel()
        sources["calibration"] = blocks  # the dense model's FFN inputs, layer by layer
        outputs["held"] = held_blocks
        if cfg.convert_steps:
            outputs["fit"] = blocks[len(held_blocks) :]
    seeded = [torch.Generator().manual_seed(cfg.seed) for _ in range(3)]  # as `run`: init, warm-up, conversion
    init_rng, warm_up_rng, convert_rng = seeded
    taken_out = None  # (layer, its dense FFN): put back once the layer is written, freeing the sparse one's copies
    pass_ = LayerPass(lazy, source=sources, output=outputs, out=out, shard_bytes=shard_bytes(options),
                      tokenizer=tokenizer, progress=options.progress, desc="sparsify")  # fmt: skip
    with pass_ as p:
        for i in p.layers():
            if taken_out is not None:
                adapter.set_ffn(*taken_out)
                taken_out = None
            if i not in chosen:
                continue
            x = p.source["calibration"].module_inputs(adapter.ffn(i), previous=True) if sources else None
            with _fitting_dtype(adapter, i, cfg.fit_fp32) as (as_fitted, kept):
                x = as_fitted(x)
                if cfg.pad:
                    pad_layer(adapter, i, cfg.bank)
                if cfg.permute:
                    permute_layer(adapter, i, x[held_tokens:], cfg.bank, cfg.keep)
                ffn, dense = make_sparse_ffn(adapter, i, cfg.sparsity)
                taken_out = (i, dense)
                fit_rows = x[held_tokens:] if x is not None else None
                report.density.append(init_sparse_ffn(ffn, cfg, x, fit_rows, init_rng))
                if cfg.selection == "predictor" and x is not None:
                    warm_up_predictor(ffn, x, held_tokens, cfg, report, warm_up_rng)
                if cfg.convert_steps:
                    rows, held = (as_fitted(p.output[k].module_inputs(ffn)) for k in ("fit", "held"))
                    convert_layer(ffn, dense, rows, held, cfg, report, convert_rng, kept=kept)
                    del rows, held
                ffn.eval()
            del x, fit_rows  # this layer's calibration rows: not to be held beside the next layer's
        if taken_out is not None:
            adapter.set_ffn(*taken_out)
        if cfg.pad and len(chosen) == adapter.num_layers:
            adapter.set_config(ffn_size=report.width)
        if sources:
            report.equivalence = asdict(p.equivalence("held", reference="calibration"))
        expected = list(p.logits(p.output["probe"]))
        p.output_config = UpcycleSparseConfig.from_base(lazy.config, {**cfg.sparsity.to_dict(), "layers": chosen})
        p.output_config.architectures = [UpcycleSparseForCausalLM.__name__]
        folder = p.finish(report=None if report_files is None else lambda tmp: report_files(tmp, report, p.report))
    return folder, report, p.report, reloaded_equivalence(folder, expected, probe, lazy)


@contextmanager
def _fitting_dtype(adapter, i: int, fp32: bool):
    """Layer i's FFN in fp32 (`fp32`) or in the run's dtype while its statistics are taken and it is
    fitted, back in the run's dtype after (the module put in its place, whichever it is then). Yields (what
    casts calibration rows, fp32 as captured, to the dtype the FFN is fitted in; what casts it back)."""
    dtype = adapter.ffn_weights(i).gate.dtype
    fitted = torch.float32 if fp32 else dtype
    adapter.ffn(i).to(fitted)
    yield (lambda rows: rows if rows is None else rows.to(fitted)), lambda: adapter.ffn(i).to(dtype)
    adapter.ffn(i).to(dtype)


@register_transform("sparsify", options=SparsifyConfig)
def sparsify_stage(model, tokenizer=None, **options):
    """A training stage's transform: the whole pipeline on the model as the stage finds it."""
    return run(model, tokenizer, SparsifyConfig(**options), progress=False).model
