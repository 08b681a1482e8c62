"""greedy text from a model, timed — a bank-sparse model side by side with its dense twin

`upcycle generate MODEL --prompt "..."`: the lean decoder (static KV cache, one compiled step;
upcycle.infer.decode) at fp32, bf16 or int8; for a bank-sparse MODEL (or a dense one with --sparsify)
the dense model runs the same way, so the two texts and tokens/s read side by side.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

from upcycle import hub
from upcycle.commands import quiet_transformers
from upcycle.commands.bench import sparse_and_dense
from upcycle.config import Config, RunOptions, option
from upcycle.errors import ConfigError, check
from upcycle.infer.calibrate import CALIBRATION_TOKENS, TOKENS_HELP, calibration_blocks
from upcycle.infer.decode import GreedyDecoder
from upcycle.infer.precision import PRECISIONS, to_precision
from upcycle.modules import BankSparseFFN, BankSparsity


@dataclass
class GenerateConfig(Config):
    prompt: str = option("The king said to the queen:", "the text to continue")
    new_tokens: int = option(64, "tokens to generate")
    precision: str = option(
        "fp32", "weights and activations: fp32, bf16, or int8 / int4 weights with bf16 activations", choices=PRECISIONS
    )
    int4_calibration_tokens: int = option(CALIBRATION_TOKENS, TOKENS_HELP)
    sparsify: bool = option(False, "for a dense MODEL: also sparsify it (16 of 64, shadow predictor, no training)")
    compile: bool = option(True, "compile the decoding step (the first run compiles: about a minute a model)")
    repeats: int = option(3, "timed runs per model after the first (median)")

    def validate(self):
        check(self.new_tokens >= 1, "new_tokens", self.new_tokens, ">= 1")
        check(self.repeats >= 1, "repeats", self.repeats, ">= 1")
        check(self.int4_calibration_tokens >= 0, "int4_calibration_tokens", self.int4_calibration_tokens, ">= 0")
        check(bool(self.prompt), "prompt", self.prompt, "some text")


def run(model: str, config: GenerateConfig = GenerateConfig(), options: RunOptions = RunOptions()) -> dict:
    """Generate from MODEL (and its dense or sparse twin); print each text and tokens/s; return them."""
    quiet_transformers()
    loaded, tokenizer = hub.load(model, trust_remote_code=options.trust_remote_code)
    if tokenizer is None:
        raise ConfigError(f"{model} has no tokenizer: nothing to generate text with")
    is_sparse = any(isinstance(m, BankSparseFFN) for m in loaded.modules())
    if is_sparse or config.sparsify:
        dense, sparse = sparse_and_dense(loaded, tokenizer, BankSparsity(64, 16, predictor="shadow"), warmup_steps=0)
        models = {"dense": dense, "sparse": sparse}
    else:
        models = {"dense": loaded}
    ids = tokenizer(config.prompt, return_tensors="pt").input_ids
    blocks = calibration_blocks(tokenizer, config.int4_calibration_tokens) if config.precision == "int4" else None
    results = {}
    for name, m in models.items():
        m = to_precision(copy.deepcopy(m) if len(models) > 1 else m, config.precision, blocks).eval()
        decoder = GreedyDecoder(m, ids.shape[1] + config.new_tokens + 1, compiled=config.compile)
        decoder.generate(ids, min(4, config.new_tokens))  # kernel plans, then the compiled step
        runs = [decoder.tokens_per_second(ids, config.new_tokens) for _ in range(config.repeats + 1)][1:]
        tokens = runs[-1][1]
        results[name] = {
            "tok_s": statistics.median(r for r, _ in runs),
            "text": tokenizer.decode(tokens),
            "tokens": tokens.tolist(),
        }
        print(
            f"--- {name} ({config.precision}{', compiled' if config.compile else ''}): "
            f"{results[name]['tok_s']:.1f} tokens/s\n{config.prompt}{results[name]['text']}",
            flush=True,
        )
    if len(results) == 2:
        same = sum(a == b for a, b in zip(results["dense"]["tokens"], results["sparse"]["tokens"]))
        print(
            f"--- sparse ÷ dense: {results['sparse']['tok_s'] / results['dense']['tok_s']:.2f}× the tokens/s; "
            f"{same} of {config.new_tokens} tokens the same",
            flush=True,
        )
    return results
