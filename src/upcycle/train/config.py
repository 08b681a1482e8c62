"""Typed, validated configuration of a training run; a YAML file is a dump of TrainConfig.

    model: smollm2-135m
    data: shakespeare
    out: runs/my-run
    seq_len: 256
    global_batch: 8          # sequences per optimizer step, over all processes
    micro_batch: 2           # sequences per forward pass; accumulation = global / (micro * world)
    losses: [{name: lm, weight: 1.0}, {name: kd, weight: {from: 1.0, to: 0.75, shape: linear}}]
    teacher: self            # a frozen copy of the starting model, or any model source
    groups: [{name: router, patterns: ['\\.gate\\.'], lr_mult: 1.0}, {name: rest, patterns: ['.*'], lr_mult: 0.01}]
    stages: [{name: main, tokens: 200000}]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from upcycle.errors import ConfigError, check
from upcycle.yamlfile import read_mapping

SCHEDULES = ("cosine", "linear", "constant")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class LossTerm:
    """One term of the loss. `weight` is a number or a schedule {from, to, shape: linear|cosine}
    that runs over the stage's steps. `options` go to the loss function (e.g. temperature, top_k)."""

    name: str
    weight: float | dict = 1.0
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.weight, dict):
            extra = set(self.weight) - {"from", "to", "shape"}
            check(not extra and {"from", "to"} <= set(self.weight), "loss weight", self.weight,
                  "a number or {from: x, to: y, shape: linear|cosine}")
            check(self.weight.get("shape", "linear") in ("linear", "cosine"), "loss weight shape",
                  self.weight.get("shape"), "linear or cosine")
        else:
            check(isinstance(self.weight, (int, float)), "loss weight", self.weight, "a number or a schedule")


@dataclass
class GroupConfig:
    """Parameters whose names match any of `patterns` (regular expressions, re.search). The first
    group that matches a parameter owns it. Frozen groups get no gradient and stay bit-identical."""

    name: str
    patterns: list[str]
    lr_mult: float = 1.0
    frozen: bool = False

    def __post_init__(self):
        check(bool(self.patterns), f"group {self.name!r} patterns", self.patterns, "at least one pattern")
        check(self.lr_mult >= 0, f"group {self.name!r} lr_mult", self.lr_mult, ">= 0")


@dataclass
class StageConfig:
    """A stretch of training with its own token budget, trainable groups and LR schedule.
    `train` lists the groups that learn in this stage (default: every group not frozen);
    `transform` names a registered transform applied to the model when the stage starts;
    `callbacks` are registered callbacks active during this stage: [{name, options}]."""

    name: str
    tokens: int
    train: list[str] | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    transform: str | None = None
    transform_options: dict = field(default_factory=dict)
    callbacks: list[dict] = field(default_factory=list)

    def __post_init__(self):
        check(isinstance(self.tokens, int) and self.tokens > 0, f"stage {self.name!r} tokens", self.tokens,
              "a positive number of tokens")
        for cb in self.callbacks:
            check(isinstance(cb, dict) and "name" in cb and set(cb) <= {"name", "options"},
                  f"stage {self.name!r} callbacks", cb, "{name: registered callback, options: {...}}")


@dataclass
class TrainConfig:
    model: str
    data: str = "shakespeare"
    out: str = "runs/train"
    seq_len: int = 256
    global_batch: int = 8
    micro_batch: int = 2
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float | None = 1.0
    bf16: bool = False
    seed: int = 0
    losses: list[LossTerm] = field(default_factory=lambda: [LossTerm("lm")])
    teacher: str | None = None
    groups: list[GroupConfig] = field(default_factory=list)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig("main", 100_000)])
    log_every: int = 1
    val_every: int = 0  # steps; 0 = only at the end of each stage
    val_blocks: int = 8
    ckpt_every: int = 50  # steps; a checkpoint is also written at the end of every stage
    distributed: str = "ddp"
    val_fraction: float = 0.1
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self):
        self.losses = [t if isinstance(t, LossTerm) else _build(LossTerm, t, "losses[]") for t in self.losses]
        self.groups = [g if isinstance(g, GroupConfig) else _build(GroupConfig, g, "groups[]") for g in self.groups]
        self.stages = [s if isinstance(s, StageConfig) else _build(StageConfig, s, "stages[]") for s in self.stages]
        self.betas = tuple(self.betas)
        check(self.seq_len >= 2, "seq_len", self.seq_len, ">= 2")
        check(self.micro_batch >= 1, "micro_batch", self.micro_batch, ">= 1")
        check(self.global_batch >= self.micro_batch and self.global_batch % self.micro_batch == 0, "global_batch",
              self.global_batch, f"a multiple of micro_batch ({self.micro_batch})")
        check(self.lr > 0, "lr", self.lr, "> 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "between 0 and 1")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check(self.schedule in SCHEDULES, "schedule", self.schedule, " | ".join(SCHEDULES))
        check(self.clip is None or self.clip > 0, "clip", self.clip, "None or > 0")
        check(self.distributed in DISTRIBUTED, "distributed", self.distributed, " | ".join(DISTRIBUTED))
        check(bool(self.losses), "losses", self.losses, "at least one loss term")
        check(bool(self.stages), "stages", self.stages, "at least one stage")
        check(self.ckpt_every >= 1 and self.log_every >= 1, "ckpt_every/log_every", (self.ckpt_every, self.log_every), ">= 1")
        names = [s.name for s in self.stages]
        check(len(set(names)) == len(names), "stages", names, "distinct stage names")
        groups = {g.name for g in self.groups} | {"rest"}
        for stage in self.stages:
            for g in stage.train or []:
                check(g in groups, f"stage {stage.name!r} train", g, f"one of the groups {sorted(groups)}")
        from upcycle.train.losses import LOSSES  # the registry may grow after import

        for term in self.losses:
            check(term.name in LOSSES, "loss", term.name, f"one of {', '.join(sorted(LOSSES))}")
            if term.name == "kd":
                check(self.teacher is not None, "teacher", None, "a model source or 'self' when the kd loss is used")

    # ---- YAML ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return _build(cls, values, "config")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "TrainConfig":
        values = read_mapping(path, "config")
        return cls.from_dict({**values, **(overrides or {})})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        d = self.to_dict()
        d["betas"] = list(d["betas"])
        return yaml.safe_dump(d, sort_keys=False)


def _build(cls, values, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
