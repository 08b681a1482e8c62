"""zero most of a model's weights, one-shot — magnitude, Wanda or SparseGPT; unstructured or N:M"""

from __future__ import annotations

import json
from dataclasses import replace

from upcycle import hub
from upcycle.commands import quiet_transformers
from upcycle.config import RunOptions
from upcycle.ops.prune import PruneReport, PruneSpec, sparsity_of
from upcycle.pipelines import prune as pipeline
from upcycle.pipelines.prune import PruneConfig
from upcycle.report import RunFolder, markdown_table


def run(
    model: str,
    out: str,
    config: PruneConfig = PruneConfig(),
    spec: PruneSpec = PruneSpec(),
    options: RunOptions = RunOptions(),
) -> dict:
    """Load MODEL, prune every linear layer of its decoder layers (Wanda's and SparseGPT's statistics from
    calibration text, layer by layer on the already-pruned layers' outputs), measure the one-shot cost on
    held-out text, save OUT as a stock Hugging Face folder (zeros in the weights; the pruning described in
    config.json under `upcycle_pruning`), reload it and check every matrix's sparsity, and write
    prune_report.{md,json}."""
    quiet_transformers()
    out_path = hub.check_out(out, options.overwrite)
    source, tokenizer = hub.load(model, trust_remote_code=options.trust_remote_code)
    # in place: one model in memory, as a user pruning a large model needs
    config = replace(config, spec=spec, inplace=True)
    pruned, report = pipeline.run(source, tokenizer, config, progress=options.progress)
    print(f"pruned: {report.line()}", flush=True)
    folder, reload_check = hub.save_verified(pruned, tokenizer, out_path, overwrite=options.overwrite)
    reloaded, _ = hub.load(folder)
    counted = sparsity_of(reloaded)  # counted again on what a user will load, not on what we held
    kept = all(round(counted[name] * m["numel"]) == m["zeros"] for name, m in report.matrices.items())
    result = write_report(folder, model, report, config)
    print(
        f"saved {folder} ({type(pruned).__name__}); reloaded: {reload_check.summary()}; every matrix's zeros "
        f"{'as reported' if kept else 'DIFFER from the report'}\nreport: {folder / 'prune_report.md'}"
    )
    return result


def write_report(folder, source: str, report: PruneReport, config: PruneConfig) -> dict:
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
    flat = {k: v for k, v in config.to_dict().items() if k not in ("spec", "inplace")} | config.spec.to_dict()
    run_folder.metrics.update(
        {"source": source, "config": json.loads(json.dumps(flat, default=str)), **report.as_dict()}
    )
    run_folder.write(f"prune {source}")
    return run_folder.metrics
