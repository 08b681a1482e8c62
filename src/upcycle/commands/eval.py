"""perplexity (and bits per token) on a corpus split, or lm-evaluation-harness tasks (--harness)"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from upcycle import data
from upcycle.commands import quiet_transformers
from upcycle.config import Config, RunOptions, option
from upcycle.data import SPLITS
from upcycle.errors import ConfigError, check
from upcycle.eval import Perplexity, perplexity
from upcycle.pipelines.streaming import LayerPass, open_source


@dataclass
class EvalConfig(Config):
    data: str = option("shakespeare", "shakespeare, pystdlib, or a .txt/.jsonl file or folder ('a+b' mixes)")
    split: str = option("validation", "which split to score", choices=SPLITS)
    seq_len: int = option(512, "tokens per scored block")
    max_blocks: int | None = option(32, "blocks to score; 0 or none = the whole split")
    batch_size: int = option(4, "blocks per forward pass")
    val_fraction: float = option(0.1, "share of the documents held out for validation")
    seed: int = option(0, "seed of the document split")
    json: bool = option(False, "print the result as JSON")
    harness: str | None = option(
        None,
        "lm-evaluation-harness tasks to run instead of perplexity, comma-separated (as lm-eval's --tasks): "
        "upcycle's offline pack (upcycle_shakespeare_next_line, upcycle_python_next_line), lm-eval's own, or "
        "yours (--harness-include)",
    )
    harness_include: str | None = option(None, "a folder of your own lm-eval task YAML files")
    harness_limit: int | None = option(None, "examples per harness task (none: all)")
    report: str | None = option(None, "also write the result as JSON to this file (the run's report)")

    def validate(self):
        if self.max_blocks == 0:
            self.max_blocks = None
        check(self.seq_len >= 2, "seq_len", self.seq_len, "an integer >= 2")
        check(self.max_blocks is None or self.max_blocks >= 1, "max_blocks", self.max_blocks, "None or >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(
            self.harness_limit is None or self.harness_limit >= 1, "harness_limit", self.harness_limit, "None or >= 1"
        )


def evaluate(model, tokenizer, config: EvalConfig, *, progress: bool = True) -> Perplexity:
    """Perplexity of a loaded model on the config's corpus split."""
    blocks = data.blocks(
        config.data,
        tokenizer,
        config.split,
        config.seq_len,
        max_blocks=config.max_blocks,
        val_fraction=config.val_fraction,
        seed=config.seed,
    )
    return perplexity(
        model, blocks, batch_size=config.batch_size, progress=progress, desc=f"{config.data} {config.split}"
    )


def run(model: str, config: EvalConfig = EvalConfig(), options: RunOptions = RunOptions()) -> Perplexity:
    """Score MODEL on the split, streamed from its checkpoint one layer at a time (on --device, in
    --dtype), and print the result with the run's memory and time."""
    quiet_transformers()
    if config.harness:
        return run_harness(model, config, options)
    lazy, tokenizer = open_source(model, options)
    if tokenizer is None:
        raise ConfigError(f"{model}: the folder has no tokenizer to read the text with")
    blocks = data.blocks(config.data, tokenizer, config.split, config.seq_len, max_blocks=config.max_blocks,
                         val_fraction=config.val_fraction, seed=config.seed)  # fmt: skip
    desc = f"{config.data} {config.split}"
    with LayerPass(
        lazy, output={"eval": blocks}, batch_size=config.batch_size, progress=options.progress, desc=desc
    ) as p:
        for _ in p.layers():
            pass
        result = p.perplexity("eval")
    facts = {"model": model, "data": config.data, "split": config.split, **result.as_dict()}
    _write_report(config, facts | {"stream": p.report.as_dict()})
    if config.json:
        print(json.dumps(facts | {"stream": p.report.as_dict()}, indent=2))
    else:
        print(
            f"{model} on {config.data} {config.split}: ppl {result.ppl:.3f}, bits/token {result.bits_per_token:.3f}, "
            f"nll {result.nll:.4f} ({result.tokens} tokens)\n{p.report.line()}"
        )
    return result


def run_harness(model: str, config: EvalConfig, options: RunOptions) -> dict:
    """MODEL loaded whole (lm-eval runs the model's own forward) and scored by lm-eval on the tasks."""
    from upcycle import hub
    from upcycle.devices import resolve_device, resolve_dtype
    from upcycle.eval.harness import harness

    loaded, tokenizer = hub.load(model, trust_remote_code=options.trust_remote_code)
    if tokenizer is None:
        raise ConfigError(f"{model}: the folder has no tokenizer to read the tasks with")
    loaded = loaded.to(resolve_device(options.device), resolve_dtype(options.dtype, next(loaded.parameters()).dtype))
    tasks = [t.strip() for t in config.harness.split(",") if t.strip()]
    include = [config.harness_include] if config.harness_include else None
    scores = harness(
        loaded, tokenizer, tasks, limit=config.harness_limit, batch_size=config.batch_size, include=include
    )
    facts = {"model": model, "harness": scores}
    _write_report(config, facts)
    if config.json:
        print(json.dumps(facts, indent=2))
    else:
        for task, metrics in scores.items():
            if task.startswith("_"):
                continue
            shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{model} on {task}: {shown}")
    return facts


def _write_report(config: EvalConfig, facts: dict) -> None:
    if config.report:
        path = Path(config.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(facts, indent=2))
