"""prune: zero most of a model's weights, one-shot — magnitude, Wanda or SparseGPT; unstructured or N:M —
layer by layer, each layer's statistics taken from the inputs the already-pruned layers below give it
(as SparseGPT does), so memory stays at one layer's statistics.

    pruned, report = prune(model, PruneSpec(method="sparsegpt", sparsity=0.5), calibration, held)
    pruned, report = prune(model, PruneSpec(method="wanda", nm="2:4"), calibration)

masks.py (scores and masks), sparsegpt.py (the reconstruction). The zeros are in a stock model's weights;
`report.matrices` says exactly how many each matrix holds.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from upcycle.arch import adapter_for
from upcycle.config import Config, option
from upcycle.errors import ConfigError, check
from upcycle.eval import compare, perplexity
from upcycle.kernels.linalg import InverseHessianFactor
from upcycle.ops.calibrate import LayerStream, _rows, hooked
from upcycle.ops.prune.masks import (
    magnitude_scores,
    nm_holds,
    nm_mask,
    parse_nm,
    pruned_count,
    unstructured_mask,
    wanda_scores,
    zeros_in,
)
from upcycle.ops.prune.sparsegpt import sparsegpt

__all__ = [
    "PruneSpec",
    "PruneReport",
    "prune",
    "prune_layer",
    "check_pattern",
    "pruning_record",
    "prunable_linears",
    "sparsity_of",
    "zeros_in",
]

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class PruneSpec(Config):
    method: str = option(
        "wanda",
        "magnitude (|W|), wanda (|W|·‖X‖ per output row) or sparsegpt (OBS reconstruction with the inputs' Hessian)",
        choices=METHODS,
    )
    sparsity: float = option(0.5, "fraction of each matrix's weights set to zero, in [0, 1) (unstructured)")
    nm: str | None = option(None, "N:M instead: at most N nonzeros in every M consecutive inputs (2:4, 4:8)")
    per: str = option(
        "row",
        "magnitude/wanda unstructured: compare weights within each output row (Wanda's "
        "choice) or across the whole matrix",
        choices=("row", "layer"),
    )
    block: int = option(128, "sparsegpt: columns per block of lazy updates")
    damp: float = option(0.01, "sparsegpt: Hessian dampening, a fraction of its mean diagonal")

    def validate(self) -> None:
        check(0.0 <= self.sparsity < 1.0, "sparsity", self.sparsity, "in [0, 1)")
        if self.nm is not None:
            parse_nm(self.nm)
        check(self.block >= 1, "block", self.block, ">= 1")
        check(self.damp > 0, "damp", self.damp, "> 0")

    @property
    def pattern(self) -> tuple[int, int] | None:
        return parse_nm(self.nm) if self.nm else None

    def describe(self) -> str:
        target = f"{self.nm} (N:M)" if self.nm else f"{self.sparsity:.0%} unstructured"
        return f"{self.method}, {target}" + (f" per {self.per}" if self.method != "sparsegpt" and not self.nm else "")


@dataclass
class PruneReport:
    spec: str
    seconds: float
    matrices: dict = field(default_factory=dict)  # name -> {"zeros", "numel", "sparsity"}
    target_zeros: int = 0  # what the spec promises over the pruned matrices
    zeros: int = 0  # what they hold
    ppl_before: float | None = None
    ppl_after: float | None = None
    kl: float | None = None
    top1: float | None = None
    skipped: list = field(default_factory=list)  # parameters left dense, and why
    # N:M: whether every pruned matrix holds the pattern. Its zeros can exceed the target count: a group of M
    # that already held more than M - N zeros keeps them (unstructured pruning counts them in its target)
    pattern_holds: bool | None = None

    @property
    def sparsity(self) -> float:
        numel = sum(m["numel"] for m in self.matrices.values())
        return self.zeros / numel if numel else 0.0

    @property
    def exact(self) -> bool:
        """Unstructured: exactly the target count of zeros. N:M: the pattern in every matrix, at least the
        target count (the weights' own zeros are kept)."""
        if self.pattern_holds is None:
            return self.zeros == self.target_zeros
        return self.pattern_holds and self.zeros >= self.target_zeros

    def line(self) -> str:
        quality = f"; one-shot ppl {self.ppl_before:.2f} → {self.ppl_after:.2f}" if self.ppl_after is not None else ""
        quality += f", mean KL {self.kl:.3g}" if self.kl is not None else ""
        return (
            f"{self.spec}: {len(self.matrices)} matrices, {self.zeros:,} of "
            f"{sum(m['numel'] for m in self.matrices.values()):,} weights zero ({self.sparsity:.4%}; "
            f"{self._target_words()}), "
            f"{self.seconds:.1f} s{quality}"
        )

    def _target_words(self) -> str:
        if self.pattern_holds is not None:
            return "the pattern in every matrix" if self.exact else "PATTERN BROKEN"
        return "exactly the target" if self.exact else f"target {self.target_zeros:,}"

    def as_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity, "exact": self.exact}


def prune(
    model,
    spec: PruneSpec,
    calibration: torch.Tensor | None = None,
    held: torch.Tensor | None = None,
    *,
    progress: bool = False,
    inplace: bool = False,
):
    """(pruned copy, PruneReport). `calibration` (n, T) token blocks feed Wanda's and SparseGPT's statistics
    (magnitude needs none); `held` blocks, when given, measure the one-shot cost (perplexity before and after,
    and KL and top-1 against the source). The input model is left alone, unless `inplace`: then it is the
    one pruned (memory: one model, as llm-compressor works; perplexity before/after only, no KL)."""
    if spec.method != "magnitude" and calibration is None:
        raise ConfigError(f"method {spec.method} needs calibration text (magnitude does not)")
    before = perplexity(model, held, progress=False).ppl if inplace and held is not None else None
    start = time.perf_counter()
    pruned = model.eval() if inplace else copy.deepcopy(model).eval()
    adapter = adapter_for(pruned)
    check_pattern(adapter, spec)
    report = PruneReport(spec.describe(), 0.0)
    stream = LayerStream(pruned, calibration) if spec.method != "magnitude" else None
    for i in tqdm(range(adapter.num_layers), desc=f"prune ({spec.method})", disable=not progress, leave=False):
        prune_layer(adapter, i, spec, stream, report)
        if stream is not None:
            stream.advance()
    pruned.config.upcycle_pruning = pruning_record(spec, report)
    report.seconds = time.perf_counter() - start
    if held is not None and inplace:
        report.ppl_before, report.ppl_after = before, perplexity(pruned, held, progress=False).ppl
    elif held is not None:
        eq = compare(model, pruned, held)
        report.ppl_before, report.ppl_after = math.exp(eq.loss_reference), math.exp(eq.loss_candidate)
        report.kl, report.top1 = eq.mean_kl, eq.top1_agreement
    return pruned, report


def check_pattern(adapter, spec: PruneSpec) -> None:
    """N:M: every matrix must hold the pattern before any is changed (nothing half-pruned). Reads shapes
    only, so a model whose layers are still on disk is checked too."""
    nm = spec.pattern
    if nm is None:
        return
    for i in range(adapter.num_layers):
        for name, linear in adapter.linears(i).items():
            if linear.in_features % nm[1]:
                raise ConfigError(
                    f"N:M = {spec.nm} needs input widths divisible by {nm[1]}: layer {i} {name} has {linear.in_features}"
                )


def prune_layer(adapter, i: int, spec: PruneSpec, stream: LayerStream | None, report: PruneReport) -> None:
    """Prune every computing linear of layer i in place, its statistics from `stream` (at layer i: the
    inputs the layers below, already pruned, give it; None for magnitude), and count it in `report`."""
    nm = spec.pattern
    linears = adapter.linears(i)
    stats = _layer_statistics(stream, linears, spec.method) if stream is not None else {}
    for name, linear in linears.items():
        stat = stats.pop(name, None)  # freed with the last linear of the group that reads its input
        if spec.method == "sparsegpt" and isinstance(stat, torch.Tensor):
            factor = InverseHessianFactor(stat, spec.damp)  # made in XᵀX's own storage, shared by the group
            stats = {k: factor if v is stat else v for k, v in stats.items()}
            stat = factor
        weight, count = _prune_matrix(linear.weight, stat, spec, nm)
        with torch.no_grad():
            linear.weight.copy_(weight)
        zeros = zeros_in(linear.weight)
        report.matrices[f"layers.{i}.{name}"] = {
            "zeros": zeros,
            "numel": linear.weight.numel(),
            "sparsity": zeros / linear.weight.numel(),
        }
        report.zeros += zeros
        report.target_zeros += count
        if nm is not None:
            report.pattern_holds = report.pattern_holds is not False and nm_holds(linear.weight, *nm)
    if adapter.ffn_kind(i) == "moe":
        report.skipped.append(f"layer {i}: routed experts (fused expert tensors) and router left dense")


def pruning_record(spec: PruneSpec, report: PruneReport) -> dict:
    """What the pruned model's config.json records under `upcycle_pruning`."""
    return {
        "method": spec.method,
        "sparsity": report.sparsity,
        "nm": spec.nm,
        "target": None if spec.nm else spec.sparsity,
        "per": spec.per if not spec.nm and spec.method != "sparsegpt" else None,
        "matrices": "every nn.Linear of every decoder layer (not routers, embeddings "
        "or the LM head); zeros stored in the weights",
    }


def _layer_statistics(stream: LayerStream, linears: dict, method: str) -> dict:
    """Per linear of the current layer: the sums of squares of its inputs (Wanda) or XᵀX (SparseGPT)."""
    stats: dict = {}  # the first linear of each group that reads one input -> the group's statistic
    reads: dict = {}  # linear -> the first linear of its group: q/k/v (and gate/up) share one statistic
    last: dict = {}

    def gather(name, module, args):
        if last.get("input") is not args[0]:
            x = _rows(args[0])
            last.update(input=args[0], first=name)
            if method == "sparsegpt":  # XᵀX in float64: its inverse factor is made in this storage (kernels.linalg)
                gram = stats.setdefault(name, torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64))
                for r0 in range(0, x.shape[1], 2048):  # fp32 products a slab at a time: no full-size fp32 copy
                    gram[r0 : r0 + 2048] += x[:, r0 : r0 + 2048].T @ x
            else:
                value = (x * x).sum(0)
                stats[name] = stats[name] + value if name in stats else value
        reads[name] = last["first"]

    with hooked(linears, pre=gather):
        stream.run()
    last.clear()
    return {name: stats[first] for name, first in reads.items()}  # one tensor per group, read, never changed


def _prune_matrix(weight: torch.Tensor, stat, spec: PruneSpec, nm) -> tuple[torch.Tensor, int]:
    """(new weight, the zeros it promises)."""
    rows, cols = weight.shape
    target = (
        rows * (cols // nm[1]) * (nm[1] - nm[0])
        if nm
        else (
            rows * pruned_count(cols, spec.sparsity)
            if spec.per == "row" and spec.method != "sparsegpt"
            else pruned_count(rows * cols, spec.sparsity)
        )
    )
    if spec.method == "sparsegpt":
        new, _ = sparsegpt(weight, factor=stat, sparsity=spec.sparsity, nm=nm, block=spec.block)
        return new, target
    if not nm and spec.per == "layer":  # one comparison group: the whole matrix's scores at once
        scores = magnitude_scores(weight) if spec.method == "magnitude" else wanda_scores(weight, stat)
        return weight.detach().masked_fill(unstructured_mask(scores, spec.sparsity, per="layer"), 0.0), target
    # rows are compared within themselves: a block of rows at a time, zeroed in place, so the fp32 scores and
    # top-k indices (int64) never exist for the whole matrix — 1.2 GB for a 7B's down projection, 3.6 GB a 70B's
    new, step = weight.detach(), max(1, _CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        block = new[start : start + step]
        scores = magnitude_scores(block) if spec.method == "magnitude" else wanda_scores(block, stat)
        block.masked_fill_(nm_mask(scores, *nm) if nm else unstructured_mask(scores, spec.sparsity, per="row"), 0.0)
    return new, target


_CHUNK_ELEMENTS = 1 << 22  # weights scored at once where rows are their own comparison group (16 MB of fp32 scores)


def prunable_linears(model) -> dict:
    """{"layers.i.name": nn.Linear} for every computing linear of every decoder layer (what prune sparsifies)."""
    adapter = adapter_for(model)
    return {
        f"layers.{i}.{name}": linear for i in range(adapter.num_layers) for name, linear in adapter.linears(i).items()
    }


def sparsity_of(model) -> dict:
    """{name: fraction of zeros} for every prunable linear: an independent count."""
    return {name: zeros_in(linear.weight) / linear.weight.numel() for name, linear in prunable_linears(model).items()}


def holds_nm(model, n: int, m: int) -> bool:
    return all(nm_holds(linear.weight, n, m) for linear in prunable_linears(model).values())
