"""`upcycle sparsify MODEL OUT`: convert, save as a Hugging Face folder, prove the reload, report."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from upcycle import hub
from upcycle.eval import compare
from upcycle.ops.sparsify import SparsifyConfig, SparsifyReport, sparsify
from upcycle.report import markdown_table, plot_per_layer


def sparsify_to_folder(model, tokenizer, config: SparsifyConfig, out: str | Path, *, overwrite: bool = False,
                       source: str = "") -> str:
    """Sparsify, save to `out` (safetensors + a config of model_type upcycle_sparse), reload it and
    check the logits are identical, and write sparsify_report.{md,json} and recall.png beside it.
    Returns a short summary."""
    sparse, report = sparsify(model, tokenizer, config)
    out = hub.save(sparse, tokenizer, out, overwrite=overwrite)
    reloaded, _ = hub.load(out)
    probe = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    reload_check = compare(sparse, reloaded, probe)
    write_report(report, out, source=source, reload_check=reload_check.summary())
    lines = [f"saved {out} (bank-sparse {config.keep} of {config.bank}, rank {config.rank}, gate {config.gate}, "
             f"{len(report.layers)} layers); reloaded: {reload_check.summary()}"]
    if report.recall:
        lines.append(f"predictor recall of the oracle's top-{config.keep} per bank (held-out calibration): "
                     f"{report.recall_mean:.3f} mean (before warm-up {sum(report.recall_init) / len(report.recall_init):.3f})")
    if report.equivalence:
        eq = report.equivalence
        lines.append(f"vs the dense model: mean KL {eq['mean_kl']:.3g}, top-1 agreement {eq['top1_agreement']:.3f}")
    lines.append(f"report: {out / 'sparsify_report.md'}")
    return "\n".join(lines)


def write_report(report: SparsifyReport, folder: Path, *, source: str = "", reload_check: str = "") -> Path:
    cfg = report.config
    rows = []
    for n, layer in enumerate(report.layers):
        rows.append([layer, report.recall_init[n] if report.recall_init else "-",
                     report.recall[n] if report.recall else "-", report.density[n] if report.density else "-"])
    parts = [f"# sparsify {source}\n",
             f"Keep {cfg['keep']} of every {cfg['bank']} FFN channels per token ({cfg['selection']} selection, "
             f"gate {cfg['gate']}), predictor rank {cfg['rank']}, init {cfg['init']}, warm-up {cfg['warmup_steps']} "
             f"steps per layer on {cfg['calibration']} ({cfg['calibration_tokens']} tokens, 1/8 held out for recall); "
             f"channel permutation: {cfg['permute']}.\n"]
    if reload_check:
        parts.append(f"Saved and reloaded: {reload_check}.\n")
    if report.equivalence:
        eq = report.equivalence
        parts.append(f"Sparse vs dense on held-out calibration text: mean KL {eq['mean_kl']:.4g}, top-1 agreement "
                     f"{eq['top1_agreement']:.4f}, max |Δlogit| {eq['max_abs_logit']:.3g} ({eq['tokens']} tokens). "
                     "A sparse model is not function-preserving by design; continual training closes this gap.\n")
    if report.recall:
        parts.append(f"Mean recall after warm-up: **{report.recall_mean:.3f}**.\n")
        plot = plot_per_layer({"before warm-up": report.recall_init, "after warm-up": report.recall},
                              folder / "recall.png", ylabel=f"recall of oracle top-{cfg['keep']}",
                              title="predictor recall per layer (held-out calibration tokens)", layers=report.layers)
        parts.append(f"![recall per layer]({plot.name})\n")
    parts.append(markdown_table(["layer", "recall (init)", "recall (warm-up)", "density"], rows))
    (folder / "sparsify_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    path = folder / "sparsify_report.md"
    path.write_text("\n".join(parts) + "\n")
    return path
