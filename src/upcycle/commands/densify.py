"""export a bank-sparse model as its stock dense family (predictors dropped)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from upcycle import hub
from upcycle.commands import quiet_transformers
from upcycle.config import Config, RunOptions
from upcycle.eval import Equivalence
from upcycle.ops import densify


@dataclass
class DensifyConfig(Config):
    """Nothing to choose: every channel is computed, the predictors dropped."""


def run(
    model: str, out: str, config: DensifyConfig = DensifyConfig(), options: RunOptions = RunOptions()
) -> tuple[Path, Equivalence]:
    """Load the bank-sparse MODEL, save its stock dense twin to OUT, and say how far the dense
    outputs (every channel computed) are from the sparse ones."""
    quiet_transformers()
    hub.check_out(out, options.overwrite)
    sparse, tokenizer = hub.load(model, trust_remote_code=options.trust_remote_code)
    dense = densify(sparse)
    folder, check = hub.save_verified(dense, tokenizer, out, overwrite=options.overwrite, reference=sparse)
    print(
        f"saved {folder} ({dense.config.model_type}, every channel computed); dense vs sparse on random tokens: "
        f"{check.summary()}"
    )
    return folder, check
