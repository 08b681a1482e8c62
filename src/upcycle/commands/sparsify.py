"""make the FFNs predictor-gated bank-sparse (keep K of every BANK channels)"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from upcycle import data, hub
from upcycle.commands import quiet_transformers
from upcycle.config import option
from upcycle.errors import ConfigError
from upcycle.eval import compare
from upcycle.ops.calibrate import ffn_inputs
from upcycle.ops.sparsify import SparsifyConfig, SparsifyReport, sparse_layers, to_bank_sparse
from upcycle.report import RunFolder, markdown_table, plot_per_layer
from upcycle.train.sparsify import convert_layerwise, warm_up_predictors


@dataclass
class SparsifyCommandConfig(SparsifyConfig):
    # the verb runs the whole pipeline: the conversion is what makes the sparse model close to dense
    # (the Python transform keeps 0, so that it needs no calibration text unless asked)
    convert_steps: int = option(60, "layer-wise conversion: fitting steps per layer of the sparse FFN (predictor "
                                "and weights) to the dense FFN's output, bottom up (0: none)")
    progress: bool = option(True, "progress bars")
    overwrite: bool = option(False, "replace a non-empty OUT")
    trust_remote_code: bool = option(False, "run the model folder's own code (only for a source you trust)")


def sparsify(model, tokenizer=None, config: SparsifyConfig | None = None, **options):
    """A bank-sparse copy of `model` and a SparsifyReport; `options` are SparsifyConfig fields.

    calibrate (each chosen layer's FFN inputs on calibration text, 1/8 held out) -> transform
    (ops.sparsify.to_bank_sparse) -> warm up each predictor on the dense model's own oracle, base
    frozen -> (convert_steps) fit each layer's sparse FFN to the dense one, bottom up (train.sparsify)
    -> verify (recall@k on the held-out tokens; sparse vs dense outputs)."""
    cfg = replace(config, **options) if config is not None else SparsifyConfig(**options)
    layers = sparse_layers(model, cfg)  # refuse a model or layer choice that cannot work before any calibration
    inputs, held_blocks, held_tokens = {}, None, 0
    if cfg.needs_calibration:
        if tokenizer is None:
            raise ConfigError("sparsify: calibration (warm-up, permute or threshold) needs the model's tokenizer")
        blocks = data.blocks(cfg.calibration, tokenizer, "train", cfg.seq_len,
                             max_blocks=max(2, cfg.calibration_tokens // cfg.seq_len))
        n_held = max(1, len(blocks) // 8)  # held out from fitting: recall is measured on them
        held_blocks, held_tokens = blocks[:n_held], n_held * cfg.seq_len
        inputs = ffn_inputs(model, blocks, layers, progress=cfg.progress)
    sparse, report = to_bank_sparse(model, cfg, inputs, held_tokens)
    if cfg.selection == "predictor":
        warm_up_predictors(sparse, inputs, held_tokens, cfg, report)
    if cfg.convert_steps:
        convert_layerwise(sparse, model, blocks[len(held_blocks):], held_blocks, cfg, report)
    if held_blocks is not None:
        report.equivalence = asdict(compare(model, sparse, held_blocks))
    return sparse, report


def run(model: str, out: str, config: SparsifyCommandConfig = SparsifyCommandConfig()) -> SparsifyReport:
    """Load MODEL, sparsify it, save OUT (safetensors + a config of model_type upcycle_sparse),
    reload it and check the logits are identical, and write sparsify_report.{md,json} and
    recall.png beside it."""
    quiet_transformers()
    hub.check_out(out, config.overwrite)
    loaded, tokenizer = hub.load(model, trust_remote_code=config.trust_remote_code)
    sparse, report = sparsify(loaded, tokenizer, config)
    folder, reload_check = hub.save_verified(sparse, tokenizer, out, overwrite=config.overwrite)
    write_report(report, folder, source=model, reload_check=reload_check.summary())
    predictor = (f"shadow {config.bits}-bit/{config.group} {config.quantizer}" if config.predictor == "shadow" else f"rank {config.rank}")
    lines = [f"saved {folder} (bank-sparse {config.keep} of {config.bank}, {predictor}, gate {config.gate}, "
             f"{len(report.layers)} layers); reloaded: {reload_check.summary()}"]
    if report.recall:
        before = (f" (before warm-up {_mean(report.recall_init):.3f})" if config.predictor == "lowrank" else "")
        lines.append(f"predictor recall of the oracle's top-{config.keep} per bank (held-out calibration): "
                     f"{report.recall_mean:.3f} mean{before}")
    if report.convert_error_after:
        lines.append(f"layer-wise conversion: relative FFN output error {_mean(report.convert_error_before):.3f} -> "
                     f"{_mean(report.convert_error_after):.3f} (mean over layers, held-out rows)")
    if report.equivalence:
        eq = report.equivalence
        lines.append(f"vs the dense model: mean KL {eq['mean_kl']:.3g}, top-1 agreement {eq['top1_agreement']:.3f}")
    lines.append(f"report: {folder / 'sparsify_report.md'}")
    print("\n".join(lines))
    return report


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def write_report(report: SparsifyReport, folder: Path, *, source: str = "", reload_check: str = "") -> Path:
    cfg = report.config
    run_folder = RunFolder(folder, report="sparsify_report.md", metrics="sparsify_report.json")
    run_folder.section(None, f"Keep {cfg['keep']} of every {cfg['bank']} FFN channels per token ({cfg['selection']} "
                       f"selection, gate {cfg['gate']}), predictor rank {cfg['rank']}, init {cfg['init']}, warm-up "
                       f"{cfg['warmup_steps']} steps per layer on {cfg['calibration']} ({cfg['calibration_tokens']} "
                       f"tokens, 1/8 held out for recall); channel permutation: {cfg['permute']}.")
    if reload_check:
        run_folder.section(None, f"Saved and reloaded: {reload_check}.")
    if report.equivalence:
        eq = report.equivalence
        run_folder.section(None, f"Sparse vs dense on held-out calibration text: mean KL {eq['mean_kl']:.4g}, top-1 "
                           f"agreement {eq['top1_agreement']:.4f}, max |Δlogit| {eq['max_abs_logit']:.3g} "
                           f"({eq['tokens']} tokens). A sparse model is not function-preserving by design; "
                           "continual training closes this gap.")
    if report.recall:
        run_folder.section(None, f"Mean recall after warm-up: **{report.recall_mean:.3f}**.")
        plot = plot_per_layer({"before warm-up": report.recall_init, "after warm-up": report.recall},
                              run_folder.figure("recall.png"), ylabel=f"recall of oracle top-{cfg['keep']}",
                              title="predictor recall per layer (held-out calibration tokens)", layers=report.layers)
        run_folder.section(None, f"![recall per layer]({plot.name})")
    if report.convert_error_after:
        run_folder.section(None, f"Layer-wise conversion ({cfg['convert_steps']} steps per layer): relative output error "
                           f"vs the dense FFN on held-out rows, mean {_mean(report.convert_error_before):.3f} -> "
                           f"**{_mean(report.convert_error_after):.3f}**.")
        plot = plot_per_layer({"before": report.convert_error_before, "after": report.convert_error_after},
                              run_folder.figure("conversion.png"), ylabel="relative output error",
                              title="sparse FFN vs dense FFN, per layer (held-out rows)", layers=report.layers)
        run_folder.section(None, f"![conversion error per layer]({plot.name})")

    def column(values, n):
        return values[n] if values else "-"

    rows = [[layer, column(report.recall_init, n), column(report.recall, n), column(report.density, n),
             column(report.convert_error_before, n), column(report.convert_error_after, n)]
            for n, layer in enumerate(report.layers)]
    run_folder.section(None, markdown_table(["layer", "recall (init)", "recall (warm-up)", "density",
                                             "error before conversion", "error after"], rows))
    run_folder.metrics.update(report.to_dict())
    return run_folder.write(f"sparsify {source}")
