"""Evaluation: perplexity on a split, and the equivalence check between two models."""

from upcycle.eval.equivalence import Equivalence, compare
from upcycle.eval.perplexity import Perplexity, perplexity

__all__ = ["Equivalence", "compare", "Perplexity", "perplexity"]
