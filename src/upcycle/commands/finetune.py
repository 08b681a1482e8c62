"""fine-tune a model on a task — SEFT or masked to keep a pruned model's zeros, or the LoRA baselines"""

from __future__ import annotations

import json
from pathlib import Path

from upcycle import hub
from upcycle.commands import keep_run, quiet_transformers, training_run
from upcycle.config import RunOptions
from upcycle.pipelines import finetune as pipeline
from upcycle.pipelines.finetune import FinetuneConfig
from upcycle.report import RunFolder, markdown_table


def run(model: str, out: str, config: FinetuneConfig = FinetuneConfig(), options: RunOptions = RunOptions()) -> dict:
    """Load MODEL, score it (task exact match, held-out perplexity), fine-tune it with the one trainer —
    SEFT, masked, LoRA, LoRA* or full — merge what it trained into stock linear layers, score it again,
    check every matrix's zeros against the source's, save OUT (a stock Hugging Face folder) and write
    finetune_report.{md,json} (the run in OUT/run)."""
    quiet_transformers()
    out_path = hub.check_out(out, options.overwrite)
    source, tokenizer = hub.load(model, trust_remote_code=options.trust_remote_code)
    with training_run(out_path) as run_dir:
        tuned, report = pipeline.run(source, tokenizer, config, progress=options.progress, run_dir=run_dir)
        print(f"before: {_line(report.before)}\nafter:  {_line(report.after)}", flush=True)
        result = {"source": model, **report.as_dict(), "config": json.loads(json.dumps(config.to_dict(), default=str))}
        folder, reload_check = hub.save_verified(
            tuned, tokenizer, out_path, overwrite=True, report=lambda tmp: _report(tmp, run_dir, result)
        )
    print(
        f"saved {folder}; every matrix's zeros {'as in the source' if result['sparsity_exact'] else 'CHANGED'} "
        f"(sparsity {result['sparsity_before']:.4f} → {result['sparsity_after']:.4f}); reloaded: "
        f"{reload_check.summary()}\nreport: {folder / 'finetune_report.md'}"
    )
    return result


def _report(folder: Path, run_dir: Path, result: dict) -> None:
    """The report, and the run's metrics, report and curve in OUT/run (its checkpoints and final copy are
    OUT itself)."""
    keep_run(run_dir, folder, "run")
    write_report(folder, result)


def _line(score: dict) -> str:
    task = f"task exact match {score['task_accuracy']:.3f}, " if score["task_accuracy"] is not None else ""
    return f"{task}held-out ppl {score['ppl']:.3f}"


def write_report(folder: Path, result: dict) -> None:
    run_folder = RunFolder(folder, report="finetune_report.md", metrics="finetune_report.json")
    b, a = result["before"], result["after"]
    rows = [
        ["task exact match", _fmt(b["task_accuracy"]), _fmt(a["task_accuracy"])],
        ["held-out perplexity", f"{b['ppl']:.3f}", f"{a['ppl']:.3f}"],
        ["sparsity of the decoder's linears", f"{result['sparsity_before']:.4%}", f"{result['sparsity_after']:.4%}"],
    ]
    run_folder.section(
        None,
        f"Fine-tuned `{result['source']}` with {result['method']} on {result['tokens']} tokens "
        f"({result['steps']} steps, {result['s_per_step']:.2f} s a step, {result['trainable_params']:,} "
        f"trainable parameters, peak memory {result['train_peak_rss_mb']:.0f} MB while training, "
        f"{result['peak_rss_mb']:.0f} MB in all). Every matrix's zeros "
        f"{'are exactly the source' + chr(39) + 's' if result['sparsity_exact'] else 'changed'}.",
    )
    run_folder.section("Before and after", markdown_table(["", "before", "after"], rows))
    run_folder.metrics.update(result)
    run_folder.write(f"finetune {result['source']}")


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"
