"""sparsify: a dense SwiGLU model -> a predictor-gated bank-sparse one (upcycle.modules.BankSparseFFN).

    sparse, report = upcycle.sparsify(model, tokenizer, bank=64, keep=16, rank=64)

Steps: check that the chosen layers hold dense SwiGLU FFNs; (optionally) pad the width to a multiple
of the bank; collect each layer's FFN inputs on calibration text; (optionally) permute channels so
that co-active ones share a bank (the function is unchanged); swap in the sparse FFNs around the
same weights; initialise the predictors (`svd` of W_gate or `random`); warm them up on the dense
model's own oracle (the top-k of |act(gate) * up| in every bank), each layer from its cached inputs
with the base frozen; measure recall@k on held-out calibration tokens and how far the sparse model's
outputs are from the dense model's. The input model is not modified.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm

from upcycle import data
from upcycle.arch import SwiGLUWeights, adapter_for
from upcycle.errors import ConfigError, check
from upcycle.eval import compare
from upcycle.modules import BankSparseFFN, BankSparsity, UpcycleSparseForCausalLM, bank_topk_mask
from upcycle.modules.bank_sparse import oracle_ranking_loss
from upcycle.train.losses import LossInputs, register_loss
from upcycle.ops.importance import ffn_inputs, magnitude_quantile, swiglu_activation
from upcycle.train.trainer import Callback, register_callback, register_transform

INITS = ("svd", "random")


@dataclass
class SparsifyConfig:
    bank: int = 64
    keep: int = 16
    rank: int = 64
    gate: str = "hard"  # hard | sigmoid | softmax
    selection: str = "predictor"  # predictor | oracle | threshold (TEAL-style, a baseline)
    init: str = "svd"  # svd | random
    warmup_steps: int = 200  # predictor fitting steps per layer on the dense oracle; 0 = none
    warmup_lr: float = 1e-2
    warmup_batch: int = 1024  # tokens per fitting step
    calibration: str = "shakespeare+pystdlib"
    calibration_tokens: int = 32768
    seq_len: int = 256
    layers: list[int] | None = None  # default: every layer
    permute: bool = False  # co-activation clustering of channels before banking
    pad: bool = False  # pad the FFN width with zero channels to a multiple of bank
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        self.sparsity  # validates bank, keep, rank, gate, selection
        check(self.init in INITS, "init", self.init, " | ".join(INITS))
        check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check(self.warmup_lr > 0, "warmup_lr", self.warmup_lr, "> 0")
        check(self.warmup_batch >= 1, "warmup_batch", self.warmup_batch, ">= 1")
        check(self.calibration_tokens >= 2 * self.seq_len, "calibration_tokens", self.calibration_tokens,
              f">= two blocks of seq_len ({2 * self.seq_len})")

    @property
    def sparsity(self) -> BankSparsity:
        return BankSparsity(self.bank, self.keep, self.rank, self.gate, self.selection)

    @property
    def needs_calibration(self) -> bool:
        return (self.warmup_steps > 0 and self.selection == "predictor") or self.permute or self.selection == "threshold"


@dataclass
class SparsifyReport:
    config: dict
    layers: list[int]
    width: int
    recall_init: list[float] = field(default_factory=list)  # per layer, held-out calibration tokens
    recall: list[float] = field(default_factory=list)  # after warm-up
    density: list[float] = field(default_factory=list)  # fraction of channels kept, per layer
    equivalence: dict | None = None  # sparse vs dense outputs on held-out calibration blocks

    @property
    def recall_mean(self) -> float | None:
        return sum(self.recall) / len(self.recall) if self.recall else None

    def to_dict(self) -> dict:
        return {**asdict(self), "recall_mean": self.recall_mean}


def sparsify(model, tokenizer=None, config: SparsifyConfig | None = None, **options):
    """A bank-sparse copy of `model` and a SparsifyReport. `options` are SparsifyConfig fields."""
    cfg = replace(config, **options) if config is not None else SparsifyConfig(**options)
    adapter = adapter_for(model)  # UnsupportedArchitecture for a family upcycle does not know
    layers = sorted(set(cfg.layers)) if cfg.layers is not None else list(range(adapter.num_layers))
    check(bool(layers), "layers", cfg.layers, "at least one layer")
    for i in layers:
        adapter.layer(i)  # range check
        if adapter.ffn_kind(i) != "dense":
            raise ConfigError(f"sparsify needs a dense SwiGLU FFN: layer {i}'s FFN is {adapter.ffn_kind(i)}")
    dense = copy.deepcopy(model).eval()
    dense_adapter = adapter_for(dense)
    width = dense_adapter.ffn_weights(layers[0]).width
    if width % cfg.bank:
        if not cfg.pad:
            cfg.sparsity.check_width(width)
        width = _pad_width(dense_adapter, layers, cfg.bank)

    inputs, held_blocks, held_tokens = {}, None, 0
    if cfg.needs_calibration:
        if tokenizer is None:
            raise ConfigError("sparsify: calibration (warm-up, permute or threshold) needs the model's tokenizer")
        blocks = data.blocks(cfg.calibration, tokenizer, "train", cfg.seq_len,
                             max_blocks=max(2, cfg.calibration_tokens // cfg.seq_len))
        n_held = max(1, len(blocks) // 8)  # held out from fitting: recall is measured on them
        held_blocks = blocks[:n_held]
        held_tokens = n_held * cfg.seq_len
        inputs = ffn_inputs(dense, blocks, layers, progress=cfg.progress)
    if cfg.permute:
        for i in layers:
            _permute_channels(dense_adapter, i, inputs[i][held_tokens:], cfg.bank, cfg.keep)

    sparse = UpcycleSparseForCausalLM.from_dense(dense, cfg.sparsity, layers)
    sparse_adapter = adapter_for(sparse)
    report = SparsifyReport(asdict(cfg), layers, width)
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(layers, desc="predictors", disable=not cfg.progress, leave=False)
    for i in bar:
        ffn: BankSparseFFN = sparse_adapter.ffn(i)
        if cfg.init == "svd":
            ffn.predictor.init_svd(ffn.gate_proj.weight)
        else:
            ffn.predictor.init_random(generator)
        if cfg.selection == "threshold":
            h = swiglu_activation(sparse_adapter.ffn_weights(i), inputs[i])
            ffn.threshold.fill_(magnitude_quantile(h, 1 - cfg.keep / cfg.bank, seed=cfg.seed))
            report.density.append(float((h.abs() > ffn.threshold).float().mean()))
            continue
        report.density.append(cfg.keep / cfg.bank)
        if cfg.selection == "predictor" and i in inputs:
            x_held, x_fit = inputs[i][:held_tokens], inputs[i][held_tokens:]
            report.recall_init.append(predictor_recall(ffn, x_held))
            if cfg.warmup_steps:
                fit_predictor(ffn, x_fit, cfg.warmup_steps, cfg.warmup_lr, cfg.warmup_batch, generator)
            report.recall.append(predictor_recall(ffn, x_held))
            bar.set_postfix(layer=i, recall=f"{report.recall[-1]:.3f}")
        inputs.pop(i, None)
    sparse.eval()
    if held_blocks is not None:
        report.equivalence = asdict(compare(model, sparse, held_blocks))
    return sparse, report


# ---- predictor warm-up ---------------------------------------------------------------------------

@torch.no_grad()
def _oracle_masks(ffn: BankSparseFFN, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([ffn.oracle_mask(x[s:s + chunk]) for s in range(0, len(x), chunk)]).bool()


@torch.no_grad()
def predictor_recall(ffn: BankSparseFFN, x: torch.Tensor) -> float:
    """Fraction of the oracle's kept channels (top-k of |act(gate) * up| per bank) that the
    predictor also keeps, over the tokens x (their FFN inputs)."""
    oracle = _oracle_masks(ffn, x)
    predicted = torch.cat([ffn.predicted_mask(x[s:s + 4096]) for s in range(0, len(x), 4096)]).bool()
    return float((oracle & predicted).sum() / oracle.sum())


def fit_predictor(ffn: BankSparseFFN, x: torch.Tensor, steps: int, lr: float, batch: int,
                  generator: torch.Generator) -> None:
    """Fit the predictor to the oracle mask with the FFN frozen (see oracle_ranking_loss)."""
    oracle = _oracle_masks(ffn, x)
    bank, keep = ffn.bank, ffn.keep
    params = list(ffn.predictor.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            index = torch.randint(0, len(x), (min(batch, len(x)),), generator=generator)
            z = ffn.predictor(x[index].to(params[0].dtype))
            loss = oracle_ranking_loss(z, oracle[index].to(z.dtype), bank, keep)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    ffn.predictor.zero_grad(set_to_none=True)


# ---- layout: padding and channel permutation -----------------------------------------------------

@torch.no_grad()
def _pad_width(adapter, layers: list[int], bank: int) -> int:
    """Append zero channels (zero gate/up rows, zero down columns: act(0) * 0 = 0, so the function is
    unchanged) up to a multiple of bank."""
    for i in layers:
        w = adapter.ffn_weights(i)
        extra = -w.width % bank
        pad_rows = w.gate.new_zeros(extra, w.gate.shape[1])
        adapter.set_ffn_weights(i, SwiGLUWeights(torch.cat([w.gate, pad_rows]), torch.cat([w.up, pad_rows]),
                                                 torch.cat([w.down, w.down.new_zeros(w.down.shape[0], extra)], 1)))
    width = adapter.ffn_weights(layers[0]).width
    if len(layers) == adapter.num_layers:
        adapter.set_config(ffn_size=width)
    return width


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
    _, vectors = torch.linalg.eigh(norm)
    return vectors[:, -2].argsort()  # second-largest eigenvector of the affinity = Fiedler vector


@torch.no_grad()
def _permute_channels(adapter, i: int, x: torch.Tensor, bank: int, keep: int) -> None:
    w = adapter.ffn_weights(i)
    order = coactivation_order(swiglu_activation(w, x), keep / bank)
    adapter.set_ffn_weights(i, SwiGLUWeights(w.gate[order].clone(), w.up[order].clone(), w.down[:, order].clone()))


# ---- measurement on a sparse model ---------------------------------------------------------------

@torch.no_grad()
def selection_stats(model, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """Per sparse layer, on the model's own inputs: recall of the predictor against this model's
    oracle (its own FFN's true top-k per bank) and the density actually kept."""
    adapter = adapter_for(model)
    sparse_layers = [i for i in range(adapter.num_layers) if adapter.ffn_kind(i) == BankSparseFFN.ffn_kind]
    hits = {i: [0.0, 0.0, 0.0, 0.0] for i in sparse_layers}  # matched, oracle total, kept, entries

    def hook(i):
        def fn(module: BankSparseFFN, args):
            x = args[0]
            h = module.activation(x)
            gate = module.gate_values(x, h)
            kept = torch.ones_like(h, dtype=torch.bool) if gate is None else gate.detach() != 0
            oracle = module.oracle_mask(x, h).bool()
            hits[i][0] += float((oracle & kept).sum())
            hits[i][1] += float(oracle.sum())
            hits[i][2] += float(kept.sum())
            hits[i][3] += h.numel()
        return fn

    handles = [adapter.ffn(i).register_forward_pre_hook(hook(i)) for i in sparse_layers]
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(blocks), batch_size):
            model(input_ids=blocks[s:s + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {"layers": sparse_layers,
            "recall": [hits[i][0] / hits[i][1] for i in sparse_layers],
            "density": [hits[i][2] / hits[i][3] for i in sparse_layers]}


def set_keep(model, keep: int | None = None) -> None:
    """Set k in every bank-sparse FFN (None: back to each module's configured target)."""
    for module in model.modules():
        if isinstance(module, BankSparseFFN):
            module.keep = module.sparsity.keep if keep is None else min(keep, module.bank)


# ---- the trainer's view: a stage transform and a k-annealing callback ------------------------------

@register_transform("sparsify")
def _sparsify_stage(model, tokenizer=None, **options):
    return sparsify(model, tokenizer, **options)


@register_callback("anneal_keep")
class AnnealKeep(Callback):
    """k goes linearly from `start` (default: the whole bank, i.e. dense) down to each layer's target
    over the first `fraction` of the stage's steps, and stays there. Set from the step count, so a
    resumed run continues with the k it had."""

    def __init__(self, start: int | None = None, fraction: float = 0.5):
        check(start is None or start >= 1, "anneal_keep start", start, "None or >= 1")
        check(0 < fraction <= 1, "anneal_keep fraction", fraction, "in (0, 1]")
        self.start, self.fraction = start, fraction

    def on_stage_start(self, trainer) -> None:
        stage = trainer.config.stages[trainer.progress.stage_index]
        ramp = max(1.0, self.fraction * trainer.stage_steps(stage))
        t = min(1.0, trainer.progress.stage_step / ramp)
        for module in trainer.model.modules():
            if isinstance(module, BankSparseFFN):
                start = module.bank if self.start is None else min(self.start, module.bank)
                module.keep = max(module.sparsity.keep, round(start + (module.sparsity.keep - start) * t))

    def on_step_end(self, trainer, record: dict) -> None:
        self.on_stage_start(trainer)


def densify(model):
    """The base family's stock model with the sparse model's weights, predictors dropped: what
    tools that do not know the sparse type can load. It computes every channel, so its outputs are
    the sparse model's with nothing masked (compare them to see how much the masking changes)."""
    from transformers import AutoModelForCausalLM

    if not isinstance(model, UpcycleSparseForCausalLM):
        raise ConfigError(f"densify needs a bank-sparse model (model_type upcycle_sparse), got {type(model).__name__}")
    dense = AutoModelForCausalLM.from_config(model.config.base_config())
    state = {k: v for k, v in model.state_dict().items() if ".predictor." not in k and not k.endswith(".threshold")}
    dense.load_state_dict(state, strict=True)
    return dense.to(next(model.parameters()).dtype).eval()


@register_loss("router")
def router_loss(inputs: LossInputs) -> torch.Tensor:
    """Keeps every predictor tracking its own FFN's top-k per bank as the FFN trains (the warm-up's
    ranking loss, on the live activations): mean over the bank-sparse layers of the last forward."""
    values = [m.router_loss() for m in inputs.model.modules() if isinstance(m, BankSparseFFN)]
    values = [v for v in values if v is not None]
    if not values:
        raise ValueError("the router loss needs bank-sparse FFNs with a predictor, in training mode")
    return torch.stack(values).mean()
