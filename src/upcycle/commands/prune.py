"""zero most of a model's weights, one-shot — magnitude, Wanda or SparseGPT; unstructured or N:M"""

from __future__ import annotations

import json
from dataclasses import replace

from upcycle import hub
from upcycle.checkpoint import Checkpoint
from upcycle.commands import quiet_transformers
from upcycle.config import RunOptions
from upcycle.ops.prune import PruneReport, PruneSpec, zeros_in
from upcycle.pipelines import prune as pipeline
from upcycle.pipelines.prune import PruneConfig
from upcycle.pipelines.streaming import StreamReport
from upcycle.report import RunFolder, markdown_table


def run(
    model: str,
    out: str,
    config: PruneConfig = PruneConfig(),
    spec: PruneSpec = PruneSpec(),
    options: RunOptions = RunOptions(),
) -> dict:
    """Prune MODEL layer by layer from its checkpoint (one layer in memory at a time; Wanda's and SparseGPT's
    statistics from calibration text, each layer's on the inputs the already-pruned layers below give it),
    measure the one-shot cost on held-out text (source and pruned model streamed side by side), write OUT
    as a stock Hugging Face folder in shards (zeros in the weights; the pruning described in config.json
    under `upcycle_pruning`), count every matrix's zeros again in the files written, and write
    prune_report.{md,json} with the run's memory and time."""
    quiet_transformers()
    out_path = hub.check_out(out, options.overwrite)
    config = replace(config, spec=spec)
    result: dict = {}

    def report_files(folder, report, stream):
        result.update(write_report(folder, model, report, config, stream))

    folder, report, stream = pipeline.run_streamed(model, out_path, config, options=options, report_files=report_files)
    print(f"pruned: {report.line()}\n{stream.line()}", flush=True)
    written = Checkpoint(folder)
    kept = True
    for name, m in report.matrices.items():  # counted again in the files a user will load
        tensor = written.read([f"model.{name}.weight"])[f"model.{name}.weight"]
        kept &= zeros_in(tensor) == m["zeros"]
    print(
        f"saved {folder}; every matrix's zeros {'as reported' if kept else 'DIFFER from the report'} in the "
        f"files written\nreport: {folder / 'prune_report.md'}"
    )
    return result


def write_report(folder, source: str, report: PruneReport, config: PruneConfig, stream: StreamReport) -> dict:
    run_folder = RunFolder(folder, report="prune_report.md", metrics="prune_report.json")
    run_folder.section(None, f"Pruned from `{source}`: {report.line()}.")
    by_kind: dict = {}
    for name, m in report.matrices.items():
        kind = name.split(".", 2)[2]
        zeros, numel = by_kind.get(kind, (0, 0))
        by_kind[kind] = (zeros + m["zeros"], numel + m["numel"])
    rows = [[kind, f"{numel:,}", f"{zeros:,}", f"{zeros / numel:.4%}"] for kind, (zeros, numel) in by_kind.items()]
    run_folder.section(
        "Sparsity by matrix kind (every layer; per matrix in prune_report.json)",
        markdown_table(["matrix", "weights", "zeros", "sparsity"], rows),
    )
    if report.ppl_after is not None:
        run_folder.section(
            "One-shot cost",
            f"Held-out perplexity {report.ppl_before:.3f} → {report.ppl_after:.3f}; "
            f"({config.calibration}, validation split).",
        )
    else:
        run_folder.section("One-shot cost", "Not measured (`--held-tokens 0`): score OUT with `upcycle eval`.")
    run_folder.section("Memory and time", stream.line())
    flat = {k: v for k, v in config.to_dict().items() if k not in ("spec", "inplace")} | config.spec.to_dict()
    run_folder.metrics.update(
        {"source": source, "config": json.loads(json.dumps(flat, default=str)), **report.as_dict()}
        | {"stream": stream.as_dict()}
    )
    run_folder.write(f"prune {source}")
    return run_folder.metrics
