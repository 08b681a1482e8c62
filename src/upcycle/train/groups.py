"""Parameter groups chosen by name patterns: which parameters learn, and at what LR multiplier."""

from __future__ import annotations

import re

from torch import nn

from upcycle.errors import ConfigError
from upcycle.train.config import GroupConfig

REST = GroupConfig("rest", [".*"])


def assign_groups(model: nn.Module, groups: list[GroupConfig]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter goes to the first group whose pattern matches its name; the rest to `rest`.
    Tied parameters (one tensor, several names) are listed once."""
    compiled = [(g, [re.compile(p) for p in g.patterns]) for g in groups]
    members: dict[str, list] = {g.name: [] for g in groups} | {"rest": []}
    for name, param in model.named_parameters():  # named_parameters already skips tied duplicates
        owner = next((g.name for g, pats in compiled if any(p.search(name) for p in pats)), "rest")
        members[owner].append((name, param))
    for g in groups:
        if not members[g.name]:
            raise ConfigError(f"group {g.name!r}: patterns {g.patterns} match no parameter of this model")
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
            param_groups.append({"params": [p for _, p in params], "lr_mult": cfg.lr_mult, "group": name,
                                 "names": [n for n, _ in params]})
    if not param_groups:
        raise ConfigError("no parameter is trainable in this stage: check the groups and the stage's `train` list")
    return param_groups
