"""export a bank-sparse model as its stock dense family (predictors dropped)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from upcycle import hub
from upcycle.commands import quiet_transformers
from upcycle.config import Config, RunOptions
from upcycle.errors import ConfigError
from upcycle.eval import Equivalence
from upcycle.modules import UpcycleSparseForCausalLM
from upcycle.ops.densify import is_dense_tensor
from upcycle.pipelines.streaming import LayerPass, open_source, probe_tokens, reloaded_equivalence, shard_bytes


@dataclass
class DensifyConfig(Config):
    """Nothing to choose: every channel is computed, the predictors dropped."""


def run(
    model: str, out: str, config: DensifyConfig = DensifyConfig(), options: RunOptions = RunOptions()
) -> tuple[Path, Equivalence]:
    """Stream the bank-sparse MODEL layer by layer into OUT as its stock dense twin (predictors dropped),
    then stream what was written and say how far its outputs (every channel computed) are from the sparse
    model's on random tokens."""
    quiet_transformers()
    hub.check_out(out, options.overwrite)
    lazy, tokenizer = open_source(model, options)
    if not isinstance(lazy.model, UpcycleSparseForCausalLM):
        raise ConfigError(
            f"densify needs a bank-sparse model (model_type upcycle_sparse), got {lazy.config.model_type}"
        )
    probe = probe_tokens(lazy)
    with LayerPass(lazy, source={"probe": probe}, out=out, shard_bytes=shard_bytes(options), tokenizer=tokenizer,
                   progress=options.progress, desc="densify") as p:  # fmt: skip
        for i in p.layers():
            # nothing bound to the layer's tensors here: a name left bound keeps the layer alive beside the next
            p.emit({k: v for k, v in lazy.adapter.layer(i).state_dict().items() if is_dense_tensor(k)}, index=i)
        p.set_outer({k: v for k, v in lazy.outer_state().items() if is_dense_tensor(k)})
        expected = list(p.logits(p.source["probe"]))
        p.output_config = lazy.config.base_config()
        folder = p.finish()
    check = reloaded_equivalence(folder, expected, probe, lazy)
    print(
        f"saved {folder} ({p.output_config.model_type}, every channel computed); {p.report.line()}; dense vs "
        f"sparse on random tokens: {check.summary()}"
    )
    return folder, check
