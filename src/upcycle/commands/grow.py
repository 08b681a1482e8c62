"""make a model larger — dense → MoE, more experts, deeper, wider — verified at every step"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from upcycle import hub
from upcycle.commands import quiet_transformers
from upcycle.config import RunOptions
from upcycle.errors import ConfigError
from upcycle.ops.grow import GrowChecks, GrowStep
from upcycle.pipelines import grow as pipeline
from upcycle.pipelines.grow import GrowConfig, GrowReport
from upcycle.report import RunFolder, markdown_table
from upcycle.summary import parameter_count

GrowStepOptions = GrowStep.command_line("grow")


def run(
    model: str,
    out: str,
    config: GrowConfig = GrowConfig(),
    step: GrowStepOptions = GrowStepOptions(),
    checks: GrowChecks = GrowChecks(),
    options: RunOptions = RunOptions(),
) -> dict:
    """Load MODEL, apply the growth plan (or the one step given), verify each step on held-out text,
    save OUT (a stock Hugging Face folder: Qwen2-MoE / Qwen3-MoE / Mixtral, or the source's family),
    reload it and compare, and write grow_report.{md,json} beside it. Steps marked `save` are written
    to OUT/step-<n>. Nothing is written when a step fails its check."""
    quiet_transformers()
    one = step.step()
    if one is not None and (config.plan is not None or config.steps):
        raise ConfigError("grow: give one of --op (a single step), --plan FILE or steps in a --config")
    config = replace(config, steps=[one] if one is not None else config.steps, checks=checks)
    steps = config.plan_steps()  # a bad plan is refused before the model is loaded
    out_path = hub.check_out(out, options.overwrite)
    if all(s.op in pipeline.STREAMED_OPS and not s.save for s in steps):  # layer by layer from the checkpoint
        return run_streamed(model, out_path, config, options)
    source, tokenizer = hub.load(model, trust_remote_code=options.trust_remote_code)
    grown, report = pipeline.run(source, tokenizer, config, progress=options.progress)
    for n, r in enumerate(report.reports, 1):
        print(f"step {n}/{len(steps)}: {r.line()}", flush=True)
    extra = {f"step-{n}": m for n, m in enumerate(report.saved, 1) if m is not None}
    folder, reload_check = hub.save_verified(
        grown, tokenizer, out_path, overwrite=True, extra=extra, report=lambda tmp: write_report(tmp, model, report)
    )
    eq = report.equivalence
    print(
        f"saved {folder} ({grown.config.architectures[0]}, {parameter_count(grown) / 1e6:.1f}M "
        f"parameters); vs the source: max |Δlogit| {eq['max_abs_logit']:.3g}, mean KL {eq['mean_kl']:.3g}, top-1 "
        f"{eq['top1_agreement']:.4f}; reloaded: {reload_check.summary()}\nreport: {folder / 'grow_report.md'}"
    )
    return {"source": model, **report.as_dict()}


def run_streamed(model: str, out: Path, config: GrowConfig, options: RunOptions) -> dict:
    """The plan's steps streamed from the checkpoint one layer at a time (never the model in memory), the
    written model streamed against the source on held-out text."""
    folder, report, streams = pipeline.run_streamed(
        model, out, config, options=options, report_files=lambda f, r, s: write_report(f, model, r, s)
    )
    for n, (r, s) in enumerate(zip(report.reports, streams), 1):
        print(f"step {n}/{len(streams)}: {r.line()}\n  {s.line()}", flush=True)
    eq = report.equivalence
    print(
        f"saved {folder} ({report.reports[-1].model_type}, {report.reports[-1].params_after / 1e6:.1f}M "
        f"parameters); written model vs the source (both streamed): max |Δlogit| {eq['max_abs_logit']:.3g}, "
        f"mean KL {eq['mean_kl']:.3g}, top-1 {eq['top1_agreement']:.4f}\nreport: {folder / 'grow_report.md'}"
    )
    return {"source": model, **report.as_dict(), "streams": [s.as_dict() for s in streams]}


def write_report(folder: Path, source: str, report: GrowReport, streams: list | None = None) -> dict:
    run_folder = RunFolder(folder, report="grow_report.md", metrics="grow_report.json")
    rows = []
    for n, r in enumerate(report.reports, 1):
        p = r.preservation
        if p is None:  # a streamed step: the written model is compared with the source once, below
            rows.append([n, r.step, r.kind, f"{r.params_before / 1e6:.1f}M → {r.params_after / 1e6:.1f}M",
                         f"{r.seconds:.1f}"] + ["—"] * 7)  # fmt: skip
            continue
        rows.append(
            [
                n,
                r.step,
                r.kind,
                f"{r.params_before / 1e6:.1f}M → {r.params_after / 1e6:.1f}M",
                f"{r.seconds:.1f}",
                f"{p.max_dlogit:.3g}",
                f"{p.kl:.3g}",
                f"{p.top1:.4f}",
                f"{p.logit_cosine:.6f}",
                f"{100 * p.loss_change:+.2f} %",
                "-" if p.router_kl is None else f"{p.router_kl:.3g}",
                "pass" if p.passed else "FAIL",
            ]
        )
    run_folder.section(
        None,
        (
            f"Grown from `{source}` in {len(report.steps)} step(s), each compared with the model before it on "
            f"{report.reports[0].preservation.tokens} held-out tokens."
            if report.reports and report.reports[0].preservation is not None
            else f"Grown from `{source}` in {len(report.steps)} streamed step(s), one layer in memory at a time; "
            "the written model compared with the source on held-out text (both streamed)."
        )
        + " Kinds: exact (held to the tolerance), diversity (held to the thresholds), changed (the "
        "step asks for a different function: reported).",
    )
    run_folder.section(
        "Steps",
        markdown_table(
            [
                "#",
                "step",
                "kind",
                "parameters",
                "s",
                "max \\|Δlogit\\|",
                "mean KL",
                "top-1",
                "logit cosine",
                "loss change",
                "router KL",
                "check",
            ],
            rows,
        ),
    )
    eq = report.equivalence
    run_folder.section(
        "Grown vs source",
        f"max |Δlogit| {eq['max_abs_logit']:.3g}, mean KL {eq['mean_kl']:.3g}, "
        f"top-1 agreement {eq['top1_agreement']:.4f}, logit cosine {eq['logit_cosine']:.6f}, loss "
        f"{eq['loss_reference']:.4f} → {eq['loss_candidate']:.4f}.",
    )
    run_folder.section(
        "Why each step preserves (or not)",
        "\n".join(f"{n}. {r.step} — {r.why}" for n, r in enumerate(report.reports, 1)),
    )
    if streams:
        run_folder.section("Memory and time", "\n".join(f"- step {n}: {s.line()}" for n, s in enumerate(streams, 1)))
    run_folder.metrics.update({"source": source, **report.as_dict()})
    if streams:
        run_folder.metrics["streams"] = [s.as_dict() for s in streams]
    run_folder.write(f"grow {source}")
    return run_folder.metrics
