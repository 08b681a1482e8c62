"""upcycle: turn the language-model checkpoint you have into the model you need, then keep training it."""

from upcycle.errors import UpcycleError
from upcycle.hub import load, save, tiny

__all__ = ["UpcycleError", "load", "save", "tiny"]
__version__ = "0.1.0"
