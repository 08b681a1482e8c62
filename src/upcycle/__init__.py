"""upcycle: turn the language-model checkpoint you have into the model you need, then keep training it.

Every verb has one call shape, the pipeline `upcycle <verb>` runs too:

    model, report = upcycle.<verb>(model, tokenizer, config)   # a Result: .model, .report; prints nothing
"""

from upcycle import (
    modules,  # registers the sparse model type with transformers' Auto classes
    train,  # registers the trainer's losses, callbacks and stage transforms
)
from upcycle.config import RunOptions
from upcycle.errors import UpcycleError
from upcycle.hub import load, save, save_verified, tiny
from upcycle.ops import densify, narrow_ffn
from upcycle.ops.grow import GrowChecks, GrowStep
from upcycle.ops.prune import PruneSpec
from upcycle.ops.slim import SlimStep
from upcycle.pipelines import Result
from upcycle.pipelines.finetune import FinetuneConfig
from upcycle.pipelines.finetune import run as finetune
from upcycle.pipelines.grow import GrowConfig
from upcycle.pipelines.grow import run as grow
from upcycle.pipelines.prune import PruneConfig
from upcycle.pipelines.prune import run as prune
from upcycle.pipelines.repair import RepairConfig
from upcycle.pipelines.repair import run as repair
from upcycle.pipelines.slim import SlimConfig, SlimStage
from upcycle.pipelines.slim import run as slim
from upcycle.pipelines.sparsify import SparsifyConfig
from upcycle.pipelines.sparsify import run as sparsify
from upcycle.train import TrainConfig, Trainer

__all__ = [
    "UpcycleError",
    "load",
    "save",
    "save_verified",
    "tiny",
    "densify",
    "narrow_ffn",
    "modules",
    "train",
    "Result",
    "RunOptions",
    "Trainer",
    "TrainConfig",
    "sparsify",
    "SparsifyConfig",
    "grow",
    "GrowConfig",
    "GrowStep",
    "GrowChecks",
    "slim",
    "SlimConfig",
    "SlimStage",
    "SlimStep",
    "prune",
    "PruneConfig",
    "PruneSpec",
    "finetune",
    "FinetuneConfig",
    "repair",
    "RepairConfig",
]
__version__ = "0.1.0"
