"""SEFT (arXiv 2505.24037): fine-tune a pruned model through sparse deltas whose positions evolve, and
end at exactly the sparsity it started with. Three pieces of the one trainer:

  stage transform `seft`   every pruned linear of the decoder layers becomes a SparseDeltaLinear with a
                           delta budget (a density, or a LoRA rank's parameter count)
  callback `seft`          every `every` steps, from the dense weight gradient summed over the `window`
                           steps before: (1) prune back to the target count by sensitivity |θ·g|,
                           (2) drop the fraction of deltas with the smallest |δ| (cosine-decayed;
                           a dropped δ is folded into the frozen weight — the paper resets it — so
                           an update leaves the function unchanged),
                           (3) grow as many at the largest |g| — pruned positions included
                           ("resurrection"; in N:M mode growth stays on live positions, so the pattern
                           never breaks); a regrown entry starts at δ = 0 with zero Adam moments
  callback `masked`        the baseline: full fine-tuning with the mask fixed (pruned gradients zeroed)

`merge_deltas(model)` turns the SparseDeltaLinears back into stock nn.Linear layers after a last
prune-back, so the saved model holds exactly the pruned model's count of zeros in every matrix.

Order within an update, and why: a position resurrected at update u starts at θ = 0, so its
sensitivity is 0 there; pruning back first, at update u + 1, judges it after `every` steps of training.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from upcycle.errors import ConfigError, check
from upcycle.ops.prune import prunable_linears
from upcycle.ops.prune.masks import check_nm
from upcycle.train.registry import register_callback, register_transform
from upcycle.train.sparse_delta import SparseDeltaLinear
from upcycle.train.trainer import Callback


@register_transform("seft")
def attach_deltas(model, density: float | None = None, lora_rank: int | None = None, seed: int = 0):
    """Every linear of the decoder layers that holds zeros becomes a SparseDeltaLinear. Budget per matrix:
    `density` × its weights, or `lora_rank` × (in + out) — the parameter count of a LoRA of that rank."""
    check(
        (density is None) != (lora_rank is None),
        "seft budget",
        (density, lora_rank),
        "exactly one of density or lora_rank",
    )
    check(density is None or 0 < density < 1, "density", density, "in (0, 1)")
    check(lora_rank is None or lora_rank >= 1, "lora_rank", lora_rank, ">= 1")
    linears = prunable_linears(model)
    if not any(bool((m.weight == 0).any()) for m in linears.values()):
        raise ConfigError(
            "SEFT fine-tunes a pruned model, and this one has no zero weights in its linear layers: "
            "run `upcycle prune` first"
        )
    model.requires_grad_(False)
    for n, (name, linear) in enumerate(linears.items()):
        budget = (
            round(density * linear.weight.numel())
            if density
            else lora_rank * (linear.in_features + linear.out_features)
        )
        _replace(model, linear, SparseDeltaLinear(linear, budget, seed=seed * 100_003 + n))
    return model


def _replace(model, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is old:
                setattr(parent, child_name, new)
                return
    raise ValueError("module not found in the model")


def delta_layers(model) -> list[SparseDeltaLinear]:
    return [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]


@torch.no_grad()
def prune_back(layer: SparseDeltaLinear, target_live: int, nm: tuple[int, int] | None = None) -> int:
    """Prune the live positions down to `target_live` by the lowest sensitivity |θ · g| (g: the window's
    gradient; |θ| alone without one). Deltas at pruned positions are freed (their δ reset). Returns how many."""
    live = layer.live.view(-1)
    excess = int(live.sum()) - target_live
    if excess <= 0 or nm is not None:  # N:M growth never adds live positions
        return 0
    theta = layer.effective_weight().view(-1)
    score = (theta * layer.window.view(-1)).abs() if layer.window is not None else theta.abs()
    score = torch.where(live, score, torch.full_like(score, math.inf))
    victims = score.topk(excess, largest=False).indices
    live[victims] = False
    layer.weight.view(-1)[victims] = 0.0
    dead_slots = (~live[layer.index]).nonzero().flatten()
    layer.delta[dead_slots] = 0.0  # freed: the grow step of this update moves them
    return excess


@torch.no_grad()
def evolve(
    layer: SparseDeltaLinear,
    drop_fraction: float,
    target_live: int,
    nm: tuple[int, int] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    resurrect: bool = True,
) -> dict:
    """One SEFT topology update of one layer from its window gradient: prune back, drop, grow (into pruned
    positions too unless `resurrect` is off — the paper's ablation — or the model is N:M)."""
    if layer.window is None:
        raise RuntimeError("a SEFT update needs the window's gradient: collect was not on")
    grad = layer.window.view(-1).abs()
    resurrected_before = int(layer.live.sum()) - target_live
    pruned = prune_back(layer, target_live, nm)
    live = layer.live.view(-1)
    freed = ~live[layer.index]  # slots whose position was just pruned
    n_drop = min(int(round(drop_fraction * layer.budget)), int((~freed).sum()))
    if n_drop:
        magnitude = torch.where(freed, torch.full_like(layer.delta, math.inf), layer.delta.abs())
        dropped = magnitude.topk(n_drop, largest=False).indices
        # folded into the frozen weight, not discarded: an update leaves the function as it was, and a
        # resurrected weight stays alive with its value instead of becoming a live zero
        layer.weight.view(-1).index_add_(0, layer.index[dropped], layer.delta[dropped].to(layer.weight.dtype))
        freed[dropped] = True
    slots = freed.nonzero().flatten()
    taken = torch.zeros_like(live)
    taken[layer.index] = True  # the positions held now, the just-freed ones included: no ping-pong
    allowed = ~taken if nm is None and resurrect else (~taken & live)
    candidates = torch.where(allowed, grad, torch.full_like(grad, -1.0))
    new = candidates.topk(len(slots)).indices if len(slots) else slots
    new = new[candidates[new] >= 0]  # a matrix with fewer free positions than slots keeps the rest in place
    slots = slots[: len(new)]
    resurrected = int((~live[new]).sum())
    layer.delta[slots] = 0.0
    layer.index[slots] = new
    live[new] = True
    if optimizer is not None:
        state = optimizer.state.get(layer.delta, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][slots] = 0.0
    order = layer.index.argsort()  # positions kept sorted: the same state whatever the history
    layer.index.copy_(layer.index[order])
    layer.delta.copy_(layer.delta[order])
    if optimizer is not None:
        for key in ("exp_avg", "exp_avg_sq"):
            if key in optimizer.state.get(layer.delta, {}):
                optimizer.state[layer.delta][key].copy_(optimizer.state[layer.delta][key][order])
    layer.window = None
    return {
        "pruned_back": pruned,
        "dropped": n_drop,
        "grown": len(new),
        "resurrected": resurrected,
        "excess_before": resurrected_before,
    }


@register_callback("seft")
class SEFT(Callback):
    """Topology updates every `every` steps from the gradient summed over the `window` steps before each;
    the drop fraction decays from `drop` to 0 (cosine) over the stage; a last prune-back at the stage's
    end (from the gradient of its last `window` steps) leaves every matrix at its starting count of zeros."""

    def __init__(
        self, every: int = 20, window: int = 5, drop: float = 0.2, nm: str | None = None, resurrect: bool = True
    ):
        check(every >= 1, "seft every", every, ">= 1")
        check(1 <= window <= every, "seft window", window, f"in [1, every={every}]")
        check(0 <= drop <= 1, "seft drop", drop, "in [0, 1]")
        self.every, self.window, self.drop, self.resurrect = every, window, drop, resurrect
        self.nm = None
        if nm:
            n, m = (int(x) for x in str(nm).split(":"))
            check_nm(n, m)
            self.nm = (n, m)
        self.history: list[dict] = []

    def _updates(self, steps: int) -> list[int]:
        """Stage steps (1-based, after the optimizer step) at which an update happens; the last is the end."""
        return [s for s in range(self.every, steps, self.every)] + [steps]

    def _collect_for(self, step: int, steps: int) -> bool:
        """Whether the backward of stage step `step` (1-based) feeds the next update's window."""
        upcoming = next(u for u in self._updates(steps) if u >= step)
        return upcoming - self.window < step

    def on_stage_start(self, trainer) -> None:
        self.layers = delta_layers(trainer.model)
        if not self.layers:
            raise ConfigError("the seft callback needs SparseDeltaLinear layers: put the `seft` transform on the stage")
        for layer in self.layers:
            if not hasattr(layer, "target_live"):
                layer.target_live = int(layer.live.sum())
        stage = trainer.config.stages[trainer.progress.stage_index]
        self.steps = trainer.stage_steps(stage)
        self._set_collect(trainer.progress.stage_step + 1)

    def _set_collect(self, step: int) -> None:
        on = step <= self.steps and self._collect_for(step, self.steps)
        for layer in self.layers:
            layer.collect = on

    def on_step_end(self, trainer, record: dict) -> None:
        step = trainer.progress.stage_step
        updates = self._updates(self.steps)
        if step in updates[:-1]:
            k = updates.index(step)
            fraction = self.drop * 0.5 * (1 + math.cos(math.pi * k / max(1, len(updates) - 1)))
            stats = [
                evolve(layer, fraction, layer.target_live, self.nm, trainer.optimizer, self.resurrect)
                for layer in self.layers
            ]
            summary = {key: sum(s[key] for s in stats) for key in stats[0]}
            self._log(trainer, {"step": trainer.progress.step, "drop_fraction": fraction, **summary})
        self._set_collect(step + 1)

    def on_stage_end(self, trainer) -> None:
        pruned = sum(prune_back(layer, layer.target_live, self.nm) for layer in self.layers)
        live = sum(int(layer.live.sum()) for layer in self.layers)
        self._log(
            trainer,
            {
                "step": trainer.progress.step,
                "final_pruned_back": pruned,
                "live": live,
                "target_live": sum(layer.target_live for layer in self.layers),
            },
        )
        for layer in self.layers:
            layer.collect, layer.window = False, None

    def _log(self, trainer, entry: dict) -> None:
        """The topology updates, one line each, in the run's folder (seft.jsonl)."""
        self.history.append(entry)
        if trainer.world.is_main:
            with open(trainer.out / "seft.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")


def merge_deltas(model) -> nn.Module:
    """Every SparseDeltaLinear replaced by the stock nn.Linear it computes (zeros where pruned)."""
    for layer in delta_layers(model):
        _replace(model, layer, layer.merged())
    return model


@register_callback("masked")
class Masked(Callback):
    """Full fine-tuning that keeps the pruned model's zeros: the gradient of every pruned position of the
    decoder layers' linears is zeroed before the optimizer step (AdamW then leaves them at zero: zero
    gradient, zero moments, and decoupled weight decay of a zero is zero)."""

    def on_stage_start(self, trainer) -> None:
        self.masks = {}
        for linear in prunable_linears(trainer.model).values():
            zero = linear.weight == 0
            if bool(zero.any()):
                self.masks[linear.weight] = ~zero
        if not self.masks:
            raise ConfigError(
                "masked fine-tuning keeps a pruned model's zeros, and this one has none in its linear layers"
            )

    def on_after_backward(self, trainer) -> None:
        for weight, keep in self.masks.items():
            if weight.grad is not None:
                weight.grad.mul_(keep)
