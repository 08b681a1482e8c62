"""upcycle: turn the language-model checkpoint you have into the model you need, then keep training it."""

from upcycle.errors import UpcycleError
from upcycle.hub import load, save, save_verified, tiny
from upcycle import modules  # registers the sparse model type with transformers' Auto classes
from upcycle.ops import densify, narrow_ffn
from upcycle.commands.sparsify import sparsify
from upcycle.commands.grow import grow
from upcycle.ops.grow import GrowStep
from upcycle.ops.slim import SlimStep
from upcycle.ops.slim import apply_cut as slim
from upcycle import train  # registers the trainer's losses, callbacks and stage transforms

__all__ = ["UpcycleError", "load", "save", "save_verified", "tiny", "sparsify", "densify", "narrow_ffn", "grow",
           "GrowStep", "slim", "SlimStep", "modules", "train"]
__version__ = "0.1.0"
