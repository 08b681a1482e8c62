"""Transforms: functions from a model to a model plus a report of what they did and measured."""

from upcycle.ops.narrow import NarrowReport, narrow_ffn
from upcycle.ops.sparsify import SparsifyConfig, SparsifyReport, densify, selection_stats, set_keep, sparsify

__all__ = ["sparsify", "SparsifyConfig", "SparsifyReport", "selection_stats", "set_keep", "densify",
           "narrow_ffn", "NarrowReport"]
