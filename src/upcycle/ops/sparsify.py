"""sparsify, the transform: a dense SwiGLU model -> a predictor-gated bank-sparse one (modules.BankSparseFFN).

    sparse, report = to_bank_sparse(model, SparsifyConfig(bank=64, keep=16), inputs)

Checks that the chosen layers hold dense SwiGLU FFNs; (optionally) pads the width to a multiple of
the bank; (optionally) permutes channels so that co-active ones share a bank (the function is
unchanged), from calibration statistics (each layer's FFN inputs); swaps in the sparse FFNs around the
same weights; initialises the predictors (`svd` of W_gate or `random`) and, for the TEAL baseline,
calibrates thresholds. The input model is not modified. Nothing here trains: the predictor warm-up is
upcycle.train.sparsify, and the whole verb (calibrate -> transform -> warm up -> verify) is
upcycle.pipelines.sparsify.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch

from upcycle.arch import SwiGLUWeights, adapter_for
from upcycle.config import Config, option
from upcycle.errors import ConfigError, check
from upcycle.modules import BankSparsity, UpcycleSparseForCausalLM
from upcycle.modules.bank_sparse import QUANTIZERS
from upcycle.ops.calibrate import magnitude_quantile, swiglu_activation

INITS = ("svd", "random")
_MODULE = BankSparsity()  # the sparse FFN's own settings have their defaults there, declared once


@dataclass
class SparsifyConfig(Config):
    bank: int = option(_MODULE.bank, "channels per bank (must divide the FFN width, or --pad)")
    keep: int = option(_MODULE.keep, "channels kept in every bank per token")
    predictor: str = option(
        _MODULE.predictor,
        "how channels are scored: shadow (the FFN's own activation from "
        "low-bit copies of its gate/up weights) or lowrank (z = x A B, trained: the paper's)",
        choices=("lowrank", "shadow"),
    )
    rank: int = option(_MODULE.rank, "rank of the low-rank predictor")
    bits: int = option(_MODULE.bits, "shadow predictor: bits per weight of the gate/up copies (2-8)")
    group: int = option(_MODULE.group, "shadow predictor: inputs per quantization scale")
    quantizer: str = option(
        _MODULE.quantizer,
        "shadow predictor: how the copies are rounded: gptq (weighted by the layer's "
        "calibration inputs) or rtn (to nearest)",
        choices=QUANTIZERS,
    )
    gate: str = option(_MODULE.gate, "how kept channels are gated", choices=("hard", "sigmoid", "softmax"))
    selection: str = option(_MODULE.selection, "predictor | oracle | threshold (TEAL-style, a baseline)")
    init: str = option("svd", "predictor initialisation", choices=INITS)
    warmup_steps: int = option(200, "predictor fitting steps per layer on the dense oracle (0: none)")
    warmup_lr: float = option(1e-2, "learning rate of the predictor warm-up")
    warmup_batch: int = option(1024, "tokens per warm-up step")
    calibration: str = option("shakespeare+pystdlib", "text for calibration and the warm-up ('a+b' mixes)")
    calibration_tokens: int = option(32768, "calibration tokens (1/8 held out to measure recall)")
    seq_len: int = option(256, "length of the calibration blocks")
    convert_steps: int = option(
        60,
        "layer-wise conversion: fitting steps per layer of the sparse FFN (predictor "
        "and weights) to the dense FFN's output, bottom up (0: none)",
    )
    convert_rows: int = option(1024, "layer-wise conversion: rows per step")
    convert_lr: float = option(1e-3, "layer-wise conversion: predictor learning rate")
    convert_ffn_lr_scale: float = option(
        1.0,
        "layer-wise conversion: FFN weights' learning rate / the predictor's "
        "(1.0 measured best for the shadow: benchmarks/sparsify_quality.py)",
    )
    fit_fp32: bool = option(
        True,
        "fit each layer (warm-up, conversion) in fp32 whatever --dtype (AdamW then holds 16 bytes per "
        "parameter of one FFN); off: in the run's dtype, half that",
    )
    layers: list[int] | None = option(None, "comma-separated layer indices (default: all)")
    permute: bool = option(False, "co-activation clustering of channels before banking")
    pad: bool = option(False, "pad the FFN width with zero channels to a multiple of BANK")
    seed: int = option(0, "seed of the predictor initialisation and warm-up sampling")

    def validate(self):
        self.sparsity  # validates bank, keep, rank, gate, selection
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check(self.warmup_lr > 0, "warmup_lr", self.warmup_lr, "> 0")
        check(self.warmup_batch >= 1, "warmup_batch", self.warmup_batch, ">= 1")
        check(self.convert_steps >= 0, "convert_steps", self.convert_steps, ">= 0")
        check(self.convert_rows >= 1, "convert_rows", self.convert_rows, ">= 1")
        check(self.convert_lr > 0, "convert_lr", self.convert_lr, "> 0")
        check(self.convert_ffn_lr_scale >= 0, "convert_ffn_lr_scale", self.convert_ffn_lr_scale, ">= 0")
        check(self.seq_len >= 2, "seq_len", self.seq_len, ">= 2")
        check(
            self.calibration_tokens >= 2 * self.seq_len,
            "calibration_tokens",
            self.calibration_tokens,
            f">= two blocks of seq_len ({2 * self.seq_len})",
        )
        check(self.layers is None or bool(self.layers), "layers", self.layers, "at least one layer")

    @property
    def sparsity(self) -> BankSparsity:
        return BankSparsity(
            self.bank,
            self.keep,
            self.rank,
            self.gate,
            self.selection,
            self.predictor,
            self.bits,
            self.group,
            self.quantizer,
        )

    @property
    def gptq(self) -> bool:
        return self.predictor == "shadow" and self.quantizer == "gptq"

    @property
    def needs_calibration(self) -> bool:
        return (
            (self.warmup_steps > 0 and self.selection == "predictor")
            or self.permute
            or self.gptq
            or self.selection == "threshold"
            or self.convert_steps > 0
        )


@dataclass
class SparsifyReport:
    config: dict
    layers: list[int]
    width: int
    recall_init: list[float] = field(default_factory=list)  # per layer, held-out calibration tokens
    recall: list[float] = field(default_factory=list)  # after warm-up
    density: list[float] = field(default_factory=list)  # fraction of channels kept, per layer
    convert_error_before: list[float] = field(default_factory=list)  # per layer, held-out rows: relative
    convert_error_after: list[float] = field(default_factory=list)  # output error vs the dense FFN
    equivalence: dict | None = None  # sparse vs dense outputs on held-out calibration blocks

    @property
    def recall_mean(self) -> float | None:
        return sum(self.recall) / len(self.recall) if self.recall else None

    def to_dict(self) -> dict:
        return {**asdict(self), "recall_mean": self.recall_mean}


def sparse_layers(model, config: SparsifyConfig) -> list[int]:
    """The layers to make sparse (default: all), each checked to hold a dense SwiGLU FFN whose width
    the bank divides (unless the config pads it), and the shadow's group checked against the hidden
    size: all before any calibration runs."""
    adapter = adapter_for(model)  # UnsupportedArchitecture for a family upcycle does not know
    layers = sorted(set(config.layers)) if config.layers is not None else list(range(adapter.num_layers))
    for i in layers:
        adapter.layer(i)  # range check
        if adapter.ffn_kind(i) != "dense":
            raise ConfigError(f"sparsify needs a dense SwiGLU FFN: layer {i}'s FFN is {adapter.ffn_kind(i)}")
        if not config.pad:
            config.sparsity.check_width(adapter.ffn_weights(i).width)
    config.sparsity.check_hidden(adapter.hidden_size)
    return layers


@torch.no_grad()
def to_bank_sparse(model, config: SparsifyConfig, inputs: dict[int, torch.Tensor] | None = None, held_tokens: int = 0):
    """A bank-sparse copy of `model` and a SparsifyReport (layers, width, density). `inputs`: each
    layer's calibrated FFN inputs, the first `held_tokens` rows held out (permutation and thresholds
    need them)."""
    cfg, inputs = config, inputs or {}
    layers = sparse_layers(model, cfg)
    if (cfg.permute or cfg.selection == "threshold") and not all(i in inputs for i in layers):
        raise ConfigError("sparsify: permute and threshold selection need calibration inputs for every layer")
    dense = copy.deepcopy(model).eval()
    dense_adapter = adapter_for(dense)
    width = dense_adapter.ffn_weights(layers[0]).width
    if width % cfg.bank:  # sparse_layers has refused this unless the config pads
        width = _pad_width(dense_adapter, layers, cfg.bank)
    if cfg.permute:
        for i in layers:
            permute_layer(dense_adapter, i, inputs[i][held_tokens:], cfg.bank, cfg.keep)

    sparse = UpcycleSparseForCausalLM.from_dense(dense, cfg.sparsity, layers)
    sparse_adapter = adapter_for(sparse)
    report = SparsifyReport(asdict(cfg), layers, width)
    generator = torch.Generator().manual_seed(cfg.seed)
    for i in layers:
        x = inputs.get(i)
        fit_rows = x[held_tokens:] if x is not None else None
        report.density.append(init_sparse_ffn(sparse_adapter.ffn(i), cfg, x, fit_rows, generator))
    return sparse.eval(), report


@torch.no_grad()
def init_sparse_ffn(
    ffn, cfg: SparsifyConfig, x: torch.Tensor | None, fit_rows: torch.Tensor | None, generator
) -> float:
    """Ready one layer's new BankSparseFFN (its dense weights already in it): a GPTQ shadow's input moment
    from the calibration rows held for fitting, or a low-rank predictor's initialisation, or the TEAL
    threshold from all of `x` (its FFN's calibrated inputs; None: no calibration). Returns the fraction
    of channels it keeps."""
    if cfg.predictor == "shadow":  # derived from the FFN's weights: nothing to initialise, but GPTQ
        if cfg.gptq and fit_rows is not None:  # weights its rounding by the inputs (none: rounds to nearest)
            ffn.predictor.set_input_moment(fit_rows)
    elif cfg.init == "svd":
        ffn.predictor.init_svd(ffn.gate_proj.weight)
    else:
        ffn.predictor.init_random(generator)
    if cfg.selection != "threshold":
        return cfg.keep / cfg.bank
    weights = SwiGLUWeights(ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight)
    h = swiglu_activation(weights, x)
    ffn.threshold.fill_(magnitude_quantile(h, 1 - cfg.keep / cfg.bank, seed=cfg.seed))
    return float((h.abs() > ffn.threshold).float().mean())


# ---- layout: padding and channel permutation -----------------------------------------------------


@torch.no_grad()
def _pad_width(adapter, layers: list[int], bank: int) -> int:
    for i in layers:
        pad_layer(adapter, i, bank)
    width = adapter.ffn_weights(layers[0]).width
    if len(layers) == adapter.num_layers:
        adapter.set_config(ffn_size=width)
    return width


@torch.no_grad()
def pad_layer(adapter, i: int, bank: int) -> None:
    """Append zero channels to layer i's FFN (zero gate/up rows, zero down columns: act(0) * 0 = 0, so the
    function is unchanged) up to a multiple of bank."""
    w = adapter.ffn_weights(i)
    extra = -w.width % bank
    pad_rows = w.gate.new_zeros(extra, w.gate.shape[1])
    adapter.set_ffn_weights(
        i,
        SwiGLUWeights(
            torch.cat([w.gate, pad_rows]),
            torch.cat([w.up, pad_rows]),
            torch.cat([w.down, w.down.new_zeros(w.down.shape[0], extra)], 1),
        ),
    )


@torch.no_grad()
def coactivation_order(h: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """A channel order in which channels that are active together sit together: spectral ordering
    (the Fiedler vector of the normalised co-activation graph) of which channels are in each token's
    top keep_fraction by |activation|."""
    width = h.shape[1]
    top = h.abs().topk(max(1, round(width * keep_fraction)), dim=1).indices
    active = torch.zeros_like(h).scatter_(1, top, 1.0)
    co = (active.T @ active).double() / len(h)
    co.fill_diagonal_(0)
    degree = co.sum(1).clamp_min(1e-12)
    norm = co / degree.sqrt()[:, None] / degree.sqrt()[None, :]
    return _second_eigenvector(norm).argsort()  # second-largest eigenvector of the affinity = Fiedler vector


# Widths above this find the two leading eigenvectors iteratively: a full eigh costs O(width^3) (98 s at
# 6,656 on one core, hours a layer at a 28k-wide FFN) where LOBPCG took 12 s for the same ordering
# (measured: the same argsort). At and below it eigh is exact and cheaper (1.6 s at 1,536 against 6.7 s).
EIGH_WIDTH = 4096


def _second_eigenvector(affinity: torch.Tensor) -> torch.Tensor:
    if len(affinity) > EIGH_WIDTH:
        start = torch.randn(len(affinity), 3, dtype=affinity.dtype, generator=torch.Generator().manual_seed(0))
        try:
            _, vectors = torch.lobpcg(affinity, k=3, X=start, largest=True, tol=1e-8, niter=500)
            return vectors[:, 1]
        except RuntimeError:  # LOBPCG's Cholesky can fail on a degenerate affinity: the exact route then
            pass
    return torch.linalg.eigh(affinity)[1][:, -2]


@torch.no_grad()
def permute_layer(adapter, i: int, x: torch.Tensor, bank: int, keep: int) -> None:
    """Reorder layer i's FFN channels so that co-active ones share a bank (the function is unchanged)."""
    w = adapter.ffn_weights(i)
    order = coactivation_order(swiglu_activation(w, x), keep / bank)
    adapter.set_ffn_weights(i, SwiGLUWeights(w.gate[order].clone(), w.up[order].clone(), w.down[:, order].clone()))
