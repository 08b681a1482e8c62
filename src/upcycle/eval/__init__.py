"""Evaluation: perplexity, the equivalence check between two models (and the one KL), selection
recall, long-context probes and localisation, speed."""

from upcycle.eval.equivalence import Equivalence, compare, kl_divergence
from upcycle.eval.perplexity import Perplexity, perplexity

__all__ = ["Equivalence", "compare", "kl_divergence", "Perplexity", "perplexity"]
