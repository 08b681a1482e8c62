"""make a model smaller — fewer layers, hidden channels, FFN neurons, heads or experts — and recover it by distillation"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from upcycle import hub
from upcycle.commands import keep_run, quiet_transformers, training_run
from upcycle.config import RunOptions
from upcycle.errors import ConfigError
from upcycle.ops.slim import SlimStep
from upcycle.pipelines import slim as pipeline
from upcycle.pipelines.slim import SlimConfig, SlimReport, SlimStage
from upcycle.report import RunFolder, markdown_table
from upcycle.summary import parameter_count

CutOptions = SlimStep.command_line("slim")


def run(
    model: str,
    out: str,
    config: SlimConfig = SlimConfig(),
    cut: CutOptions = CutOptions(),
    options: RunOptions = RunOptions(),
) -> dict:
    """Load MODEL, make the plan's cuts (each chosen by importance on calibration text and measured one
    shot on held-out text), recover with the one trainer where the plan asks for tokens (KD from the
    source + LM by default), save OUT as a stock Hugging Face folder of the source's family, reload it
    and compare, and write slim_report.{md,json} (the recovery run in OUT/recovery)."""
    quiet_transformers()
    one = cut.step()
    if one is not None and (config.plan is not None or config.stages):
        raise ConfigError("slim: give one of --op (a single cut), --plan FILE or stages in a --config")
    if one is not None:
        config = replace(config, stages=[SlimStage(name="cut", cuts=[one], tokens=config.tokens)])
    stages = config.plan_stages()  # a bad plan is refused before the model is loaded
    out_path = hub.check_out(out, options.overwrite)
    if pipeline.streamable(stages):  # one cut, no recovery: layer by layer from the checkpoint
        return run_streamed(model, out_path, config, options)
    source, tokenizer = hub.load(model, trust_remote_code=options.trust_remote_code)
    with training_run(out_path) as run_dir:
        slim, report = pipeline.run(source, tokenizer, config, progress=options.progress, run_dir=run_dir)
        for r in report.cuts:
            print(f"cut: {r.line()}", flush=True)
        folder, reload_check = hub.save_verified(
            slim, tokenizer, out_path, overwrite=True, report=lambda tmp: _report(tmp, run_dir, model, report)
        )
    final = report.final
    print(
        f"saved {folder} ({type(slim).__name__}, {parameter_count(source) / 1e6:.1f}M → {parameter_count(slim) / 1e6:.1f}M "
        f"parameters); held-out ppl {math.exp(final.loss_reference):.2f} (source) → {math.exp(final.loss_candidate):.2f}"
        f"; reloaded: {reload_check.summary()}\nreport: {folder / 'slim_report.md'}"
    )
    return {"source": model, **report.as_dict()}


def run_streamed(model: str, out: Path, config: SlimConfig, options: RunOptions) -> dict:
    """The one cut made on the checkpoint one layer at a time (never the model in memory), measured one shot
    with source and slimmed model streamed side by side."""
    result: dict = {}

    def report_files(folder, report, stream):
        result.update(write_report(folder, model, report, [stream]))

    folder, report, streams = pipeline.run_streamed(model, out, config, options=options, report_files=report_files)
    cut, final = report.cuts[0], report.final
    print(
        f"cut: {cut.line()}\n" + "\n".join(s.line() for s in streams) + f"\nsaved {folder}; held-out ppl "
        f"{math.exp(final.loss_reference):.2f} (source) → {math.exp(final.loss_candidate):.2f}\n"
        f"report: {folder / 'slim_report.md'}"
    )
    return result


def _report(folder: Path, run_dir: Path, source: str, report: SlimReport) -> None:
    """The report, and the recovery run's metrics, report and curve in OUT/recovery (its checkpoints and
    final copy are OUT itself)."""
    if report.recovery_dir is not None:
        keep_run(run_dir, folder, "recovery")
    write_report(folder, source, report)


def write_report(folder: Path, source: str, report: SlimReport, streams: list | None = None) -> dict:
    run_folder = RunFolder(folder, report="slim_report.md", metrics="slim_report.json")
    rows = [
        [
            n,
            r.step,
            f"{r.params_before / 1e6:.2f}M → {r.params_after / 1e6:.2f}M",
            f"{r.ppl_before:.2f}",
            f"{r.ppl_after:.2f}",
            f"{r.kl:.3g}",
            f"{r.top1:.3f}",
            f"{r.seconds:.1f}",
        ]
        for n, r in enumerate(report.cuts, 1)
    ]
    run_folder.section(
        None,
        f"Slimmed from `{source}`. Each cut is chosen by importance on calibration text and "
        "measured one shot (before any training) against the model it was cut from, on held-out text.",
    )
    run_folder.section(
        "Cuts",
        markdown_table(["#", "cut", "parameters", "ppl before", "ppl after (one shot)", "mean KL", "top-1", "s"], rows),
    )
    final = report.final
    run_folder.section(
        "Result",
        f"Recovery: {report.recovery_tokens} tokens ({report.recovery}); `recovery/` holds "
        f"the run. Held-out perplexity: source {math.exp(final.loss_reference):.3f}, slimmed "
        f"{math.exp(final.loss_candidate):.3f}; mean KL {final.mean_kl:.4g}, top-1 agreement "
        f"{final.top1_agreement:.4f}.",
    )
    if streams:
        run_folder.section("Memory and time", "\n".join(f"- {s.line()}" for s in streams))
    run_folder.metrics.update({"source": source, **report.as_dict()})
    if streams:
        run_folder.metrics["streams"] = [s.as_dict() for s in streams]
    run_folder.write(f"slim {source}")
    return run_folder.metrics
