"""One trainer for continued training: loss terms, schedules, stages, callbacks, exact resume, torchrun."""

from upcycle.train import grow as _grow  # noqa: F401  registers the grow stage (growth steps inside a schedule)
from upcycle.train import lora as _lora  # noqa: F401  registers the lora stage (peft imported on use)
from upcycle.train import moe as _moe  # noqa: F401  registers the balance and router_z losses, the top_k stage
from upcycle.train import mtp as _mtp  # noqa: F401  registers the mtp loss
from upcycle.train import seft as _seft  # noqa: F401  registers the seft stage and callbacks seft, masked
from upcycle.train import slim as _slim  # noqa: F401  registers the slim stage (cuts inside a schedule)
from upcycle.train import sparsify as _sparsify  # noqa: F401  registers the router loss, anneal_keep, the sparsify stage
from upcycle.train.config import GroupConfig, LossTerm, StageConfig, TrainConfig
from upcycle.train.losses import LOSSES, LossInputs, register_loss
from upcycle.train.registry import CALLBACKS, TRANSFORMS, register_callback, register_transform
from upcycle.train.trainer import Callback, Trainer, TrainingDiverged

__all__ = [
    "Trainer",
    "TrainConfig",
    "StageConfig",
    "LossTerm",
    "GroupConfig",
    "Callback",
    "LOSSES",
    "LossInputs",
    "register_loss",
    "TRANSFORMS",
    "register_transform",
    "CALLBACKS",
    "register_callback",
    "TrainingDiverged",
    "train",
]


def train(config: TrainConfig | dict | str, *, resume: bool = False, **kwargs) -> dict:
    """Run a training config (a TrainConfig, a dict, or a YAML path) and return its summary."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    elif not isinstance(config, TrainConfig):
        config = TrainConfig.from_yaml(config)
    return Trainer(config, **kwargs).fit(resume=resume)
