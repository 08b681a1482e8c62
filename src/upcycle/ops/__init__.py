"""Transforms: pure functions from a model (+ calibration statistics) to a model plus a report. No training here."""

from upcycle.ops.densify import densify
from upcycle.ops.narrow import NarrowReport, narrow_ffn
from upcycle.ops.sparsify import SparsifyConfig, SparsifyReport, to_bank_sparse

__all__ = ["to_bank_sparse", "SparsifyConfig", "SparsifyReport", "densify", "narrow_ffn", "NarrowReport"]
