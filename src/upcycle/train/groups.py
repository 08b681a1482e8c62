"""Parameter groups: which parameters learn, and at what LR multiplier.

A group names a canonical part of the model (upcycle.arch's `embeddings`, `ffn`, `router`, ...),
several of them (`parts`), or regular expressions on parameter names (`patterns`). Every parameter
belongs to the first group that holds it; the rest to `rest`.
"""

from __future__ import annotations

import re

from torch import nn

from upcycle.arch import adapter_for
from upcycle.errors import ConfigError
from upcycle.train.config import GroupConfig

REST = GroupConfig("rest", [".*"])


def _matcher(group: GroupConfig, canonical: dict[str, list[str]] | None):
    if group.patterns is not None:
        patterns = [re.compile(p) for p in group.patterns]
        return lambda name: any(p.search(name) for p in patterns)
    if canonical is None:
        raise ConfigError(f"group {group.name!r}: canonical groups need a model family upcycle.arch knows")
    names = {n for part in (group.parts or [group.name]) for n in canonical[part]}
    return names.__contains__


def assign_groups(model: nn.Module, groups: list[GroupConfig]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter goes to the first group that holds it; the rest to `rest`.
    Tied parameters (one tensor, several names) are listed once."""
    needs_arch = any(g.patterns is None for g in groups)
    canonical = adapter_for(model).parameter_groups() if needs_arch else None
    compiled = [(g, _matcher(g, canonical)) for g in groups]
    members: dict[str, list] = {g.name: [] for g in groups} | {"rest": []}
    for name, param in model.named_parameters():  # named_parameters already skips tied duplicates
        owner = next((g.name for g, holds in compiled if holds(name)), "rest")
        members[owner].append((name, param))
    for g in groups:
        if not members[g.name]:
            what = f"patterns {g.patterns}" if g.patterns is not None else f"parts {g.parts or [g.name]}"
            raise ConfigError(f"group {g.name!r}: {what} match no parameter of this model")
    return members


def configure_trainable(model: nn.Module, groups: list[GroupConfig], train: list[str] | None):
    """Set requires_grad for a stage and return the optimizer's param groups with their LR multipliers."""
    by_name = {g.name: g for g in groups} | {"rest": next((g for g in groups if g.name == "rest"), REST)}
    members = assign_groups(model, [g for g in groups if g.name != "rest"])
    param_groups = []
    for name, params in members.items():
        cfg = by_name[name]
        learns = (name in train) if train is not None else not cfg.frozen
        for _, p in params:
            p.requires_grad_(learns)
        if learns and params:
            param_groups.append(
                {
                    "params": [p for _, p in params],
                    "lr_mult": cfg.lr_mult,
                    "group": name,
                    "names": [n for n, _ in params],
                }
            )
    if not param_groups:
        raise ConfigError("no parameter is trainable in this stage: check the groups and the stage's `train` list")
    return param_groups
