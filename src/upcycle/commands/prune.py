"""zero most of a model's weights, one-shot — magnitude, Wanda or SparseGPT; unstructured or N:M"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from upcycle import data, hub
from upcycle.commands import quiet_transformers
from upcycle.config import option
from upcycle.errors import check
from upcycle.ops.prune import PruneReport, PruneSpec, prune, sparsity_of
from upcycle.report import RunFolder, markdown_table


@dataclass
class PruneConfig(PruneSpec):
    calibration: str = option("shakespeare+pystdlib", "text for Wanda's and SparseGPT's statistics (train split) "
                              "and for the one-shot measurement (validation split)")
    calibration_tokens: int = option(32768, "tokens of calibration text (the papers use 128 × 2048; the held-out "
                                     "measurement reads 8192)")
    seq_len: int = option(256, "length of the text blocks")
    progress: bool = option(True, "progress bars")
    overwrite: bool = option(False, "replace a non-empty OUT")
    trust_remote_code: bool = option(False, "run the model folder's own code (only for a source you trust)")

    def validate(self) -> None:
        PruneSpec.validate(self)
        check(self.calibration_tokens >= self.seq_len, "calibration_tokens", self.calibration_tokens,
              f"at least seq_len={self.seq_len}")


def run(model: str, out: str, config: PruneConfig = PruneConfig()) -> dict:
    """Load MODEL, prune every linear layer of its decoder layers (Wanda's and SparseGPT's statistics from
    calibration text, layer by layer on the already-pruned layers' outputs), measure the one-shot cost on
    held-out text, save OUT as a stock Hugging Face folder (zeros in the weights; the pruning described in
    config.json under `upcycle_pruning`), reload it and check every matrix's sparsity, and write
    prune_report.{md,json}."""
    quiet_transformers()
    out_path = hub.check_out(out, config.overwrite)
    source, tokenizer = hub.load(model, trust_remote_code=config.trust_remote_code)
    calibration = None
    if config.method != "magnitude":
        n_blocks = max(1, config.calibration_tokens // config.seq_len)
        calibration = data.blocks(config.calibration, tokenizer, "train", config.seq_len, max_blocks=n_blocks)
    held = data.blocks(config.calibration, tokenizer, "validation", config.seq_len, max_blocks=8192 // config.seq_len)
    spec = PruneSpec(**{f.name: getattr(config, f.name) for f in dataclasses.fields(PruneSpec)})
    # in place: one model in memory, as a user pruning a large model needs (the one-shot cost is then
    # perplexity before/after; the Python API's copy adds KL against the source)
    pruned, report = prune(source, spec, calibration, held, progress=config.progress, inplace=True)
    print(f"pruned: {report.line()}", flush=True)
    folder, reload_check = hub.save_verified(pruned, tokenizer, out_path, overwrite=config.overwrite)
    reloaded, _ = hub.load(folder)
    counted = sparsity_of(reloaded)  # counted again on what a user will load, not on what we held
    kept = all(round(counted[name] * m["numel"]) == m["zeros"] for name, m in report.matrices.items())
    result = write_report(folder, model, report, config)
    print(f"saved {folder} ({type(pruned).__name__}); reloaded: {reload_check.summary()}; every matrix's zeros "
          f"{'as reported' if kept else 'DIFFER from the report'}\nreport: {folder / 'prune_report.md'}")
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
    run_folder.section("Sparsity by matrix kind (every layer; per matrix in prune_report.json)",
                       markdown_table(["matrix", "weights", "zeros", "sparsity"], rows))
    if report.ppl_after is not None:
        run_folder.section("One-shot cost", f"Held-out perplexity {report.ppl_before:.3f} → {report.ppl_after:.3f}; "
                           f"({config.calibration}, validation split).")
    run_folder.metrics.update({"source": source, "config": json.loads(json.dumps(config.to_dict(), default=str)),
                               **report.as_dict()})
    run_folder.write(f"prune {source}")
    return run_folder.metrics
