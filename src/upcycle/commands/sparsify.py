"""make the FFNs predictor-gated bank-sparse (keep K of every BANK channels)"""

from __future__ import annotations

from pathlib import Path

from upcycle import hub
from upcycle.commands import quiet_transformers
from upcycle.config import RunOptions
from upcycle.ops.sparsify import SparsifyConfig, SparsifyReport
from upcycle.pipelines import sparsify as pipeline
from upcycle.report import RunFolder, markdown_table, plot_per_layer


def run(
    model: str, out: str, config: SparsifyConfig = SparsifyConfig(), options: RunOptions = RunOptions()
) -> SparsifyReport:
    """Sparsify MODEL layer by layer from its checkpoint (one layer in memory at a time) into OUT
    (safetensors shards + a config of model_type upcycle_sparse), stream what was written back and check
    its logits against the model as it was held, and write sparsify_report.{md,json} and recall.png
    beside it."""
    quiet_transformers()
    out_path = hub.check_out(out, options.overwrite)

    def report_files(folder, report, stream):
        write_report(report, folder, source=model, stream=stream.line())

    folder, report, stream, reload_check = pipeline.run_streamed(
        model, out_path, config, options=options, report_files=report_files
    )
    predictor = (
        f"shadow {config.bits}-bit/{config.group} {config.quantizer}"
        if config.predictor == "shadow"
        else f"rank {config.rank}"
    )
    lines = [
        f"saved {folder} (bank-sparse {config.keep} of {config.bank}, {predictor}, gate {config.gate}, "
        f"{len(report.layers)} layers); reloaded: {reload_check.summary()}",
        stream.line(),
    ]
    if report.recall:
        before = f" (before warm-up {_mean(report.recall_init):.3f})" if config.predictor == "lowrank" else ""
        lines.append(
            f"predictor recall of the oracle's top-{config.keep} per bank (held-out calibration): "
            f"{report.recall_mean:.3f} mean{before}"
        )
    if report.convert_error_after:
        lines.append(
            f"layer-wise conversion: relative FFN output error {_mean(report.convert_error_before):.3f} -> "
            f"{_mean(report.convert_error_after):.3f} (mean over layers, held-out rows)"
        )
    if report.equivalence:
        eq = report.equivalence
        lines.append(f"vs the dense model: mean KL {eq['mean_kl']:.3g}, top-1 agreement {eq['top1_agreement']:.3f}")
    lines.append(f"report: {folder / 'sparsify_report.md'}")
    print("\n".join(lines))
    return report


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def write_report(report: SparsifyReport, folder: Path, *, source: str = "", stream: str = "") -> Path:
    cfg = report.config
    run_folder = RunFolder(folder, report="sparsify_report.md", metrics="sparsify_report.json")
    run_folder.section(
        None,
        f"Keep {cfg['keep']} of every {cfg['bank']} FFN channels per token ({cfg['selection']} "
        f"selection, gate {cfg['gate']}), predictor rank {cfg['rank']}, init {cfg['init']}, warm-up "
        f"{cfg['warmup_steps']} steps per layer on {cfg['calibration']} ({cfg['calibration_tokens']} "
        f"tokens, 1/8 held out for recall); channel permutation: {cfg['permute']}.",
    )
    if stream:
        run_folder.section("Memory and time", stream)
    if report.equivalence:
        eq = report.equivalence
        run_folder.section(
            None,
            f"Sparse vs dense on held-out calibration text: mean KL {eq['mean_kl']:.4g}, top-1 "
            f"agreement {eq['top1_agreement']:.4f}, max |Δlogit| {eq['max_abs_logit']:.3g} "
            f"({eq['tokens']} tokens). A sparse model is not function-preserving by design; "
            "continual training closes this gap.",
        )
    if report.recall:
        run_folder.section(None, f"Mean recall after warm-up: **{report.recall_mean:.3f}**.")
        plot = plot_per_layer(
            {"before warm-up": report.recall_init, "after warm-up": report.recall},
            run_folder.figure("recall.png"),
            ylabel=f"recall of oracle top-{cfg['keep']}",
            title="predictor recall per layer (held-out calibration tokens)",
            layers=report.layers,
        )
        run_folder.section(None, f"![recall per layer]({plot.name})")
    if report.convert_error_after:
        run_folder.section(
            None,
            f"Layer-wise conversion ({cfg['convert_steps']} steps per layer): relative output error "
            f"vs the dense FFN on held-out rows, mean {_mean(report.convert_error_before):.3f} -> "
            f"**{_mean(report.convert_error_after):.3f}**.",
        )
        plot = plot_per_layer(
            {"before": report.convert_error_before, "after": report.convert_error_after},
            run_folder.figure("conversion.png"),
            ylabel="relative output error",
            title="sparse FFN vs dense FFN, per layer (held-out rows)",
            layers=report.layers,
        )
        run_folder.section(None, f"![conversion error per layer]({plot.name})")

    def column(values, n):
        return values[n] if values else "-"

    rows = [
        [
            layer,
            column(report.recall_init, n),
            column(report.recall, n),
            column(report.density, n),
            column(report.convert_error_before, n),
            column(report.convert_error_after, n),
        ]
        for n, layer in enumerate(report.layers)
    ]
    run_folder.section(
        None,
        markdown_table(
            ["layer", "recall (init)", "recall (warm-up)", "density", "error before conversion", "error after"], rows
        ),
    )
    run_folder.metrics.update(report.to_dict())
    return run_folder.write(f"sparsify {source}")
