"""upcycle: turn the language-model checkpoint you have into the model you need, then keep training it."""

from upcycle.errors import UpcycleError
from upcycle.hub import load, save, tiny
from upcycle import modules  # registers the sparse model type with transformers' Auto classes
from upcycle.ops import densify, narrow_ffn, sparsify

__all__ = ["UpcycleError", "load", "save", "tiny", "sparsify", "densify", "narrow_ffn", "modules"]
__version__ = "0.1.0"
