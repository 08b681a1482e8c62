"""save any loadable model as a plain Hugging Face folder (safetensors), in another dtype or shard size"""

from __future__ import annotations

from pathlib import Path

from upcycle import hub
from upcycle.commands import quiet_transformers
from upcycle.config import RunOptions
from upcycle.eval import Equivalence
from upcycle.pipelines.streaming import LayerPass, open_source, probe_tokens, reloaded_equivalence, shard_bytes


def run(model: str, out: str, options: RunOptions = RunOptions()) -> tuple[Path, Equivalence]:
    """Stream MODEL layer by layer into OUT (in --dtype, shards of --shard-size), then read what was
    written back and compare it with the source on random tokens: the conversion states whether it
    preserved the function."""
    quiet_transformers()
    hub.check_out(out, options.overwrite)
    lazy, tokenizer = open_source(model, options)
    probe = probe_tokens(lazy)
    with LayerPass(lazy, output={"probe": probe}, out=out, shard_bytes=shard_bytes(options), tokenizer=tokenizer,
                   progress=options.progress, desc="convert") as p:  # fmt: skip
        for _ in p.layers():
            pass
        expected = list(p.logits(p.output["probe"]))
        folder = p.finish()
    check = reloaded_equivalence(folder, expected, probe, lazy)
    print(f"saved {folder} ({p.report.dtype}); {p.report.line()}; reloaded: {check.summary()}")
    return folder, check
