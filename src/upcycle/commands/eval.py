"""perplexity (and bits per token) on a corpus split"""

from __future__ import annotations

import json
from dataclasses import dataclass

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

    def validate(self):
        if self.max_blocks == 0:
            self.max_blocks = None
        check(self.seq_len >= 2, "seq_len", self.seq_len, "an integer >= 2")
        check(self.max_blocks is None or self.max_blocks >= 1, "max_blocks", self.max_blocks, "None or >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")


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
    if config.json:
        facts = {"model": model, "data": config.data, "split": config.split, **result.as_dict()}
        print(json.dumps(facts | {"stream": p.report.as_dict()}, indent=2))
    else:
        print(
            f"{model} on {config.data} {config.split}: ppl {result.ppl:.3f}, bits/token {result.bits_per_token:.3f}, "
            f"nll {result.nll:.4f} ({result.tokens} tokens)\n{p.report.line()}"
        )
    return result
