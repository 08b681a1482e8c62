"""Typed, validated configuration of a training run; a YAML file is a dump of TrainConfig.

    model: smollm2-135m
    data: shakespeare
    out: runs/my-run
    seq_len: 256
    global_batch: 8          # sequences per optimizer step, over all processes
    micro_batch: 2           # sequences per forward pass; accumulation = global / (micro * world)
    losses: [{name: lm, weight: 1.0}, {name: kd, weight: {from: 1.0, to: 0.75, shape: linear}}]
    teacher: self            # a frozen copy of the starting model, or any model source
    groups: [{name: embeddings, frozen: true}, {name: router, lr_mult: 1.0}, {name: rest, lr_mult: 0.01}]
    stages: [{name: main, tokens: 200000}]

A group is a canonical part of the model by name (upcycle.arch.PARAMETER_GROUPS: embeddings, lm_head,
attention, norms, ffn, router, experts, shared_expert, predictor — the same on every family), several
of them (`parts: [embeddings, lm_head]`), or regular expressions on parameter names (`patterns`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from upcycle.arch import PARAMETER_GROUPS
from upcycle.config import Config, option
from upcycle.errors import check
from upcycle.train.losses import LOSSES
from upcycle.train.registry import check_callback, check_transform

SCHEDULES = ("cosine", "linear", "constant")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class LossTerm(Config):
    """One term of the loss. `weight` is a number or a schedule {from, to, shape: linear|cosine}
    that runs over the stage's steps. `options` go to the loss function (e.g. temperature, top_k)."""

    name: str
    weight: float | dict = 1.0
    options: dict = field(default_factory=dict)

    def validate(self):
        if isinstance(self.weight, dict):
            extra = set(self.weight) - {"from", "to", "shape"}
            check(
                not extra and {"from", "to"} <= set(self.weight),
                "loss weight",
                self.weight,
                "a number or {from: x, to: y, shape: linear|cosine}",
            )
            check(
                self.weight.get("shape", "linear") in ("linear", "cosine"),
                "loss weight shape",
                self.weight.get("shape"),
                "linear or cosine",
            )
        else:
            check(isinstance(self.weight, (int, float)), "loss weight", self.weight, "a number or a schedule")


@dataclass
class GroupConfig(Config):
    """A set of parameters: the canonical part named `name` (or the canonical `parts`), or those whose
    names match any of `patterns` (regular expressions, re.search). The first group that holds a
    parameter owns it. Frozen groups get no gradient and stay bit-identical."""

    name: str
    patterns: list[str] | None = None
    parts: list[str] | None = None
    lr_mult: float = 1.0
    frozen: bool = False

    def validate(self):
        known = ", ".join(PARAMETER_GROUPS)
        if self.patterns is None and self.parts is None and self.name != "rest":
            check(
                self.name in PARAMETER_GROUPS,
                "group",
                self.name,
                f"a canonical group ({known}), or give it patterns or parts",
            )
        for part in self.parts or []:
            check(part in PARAMETER_GROUPS, f"group {self.name!r} parts", part, f"a canonical group ({known})")
        check(
            self.patterns is None or bool(self.patterns),
            f"group {self.name!r} patterns",
            self.patterns,
            "at least one pattern",
        )
        check(self.lr_mult >= 0, f"group {self.name!r} lr_mult", self.lr_mult, ">= 0")


@dataclass
class StageConfig(Config):
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

    def validate(self):
        check(self.tokens > 0, f"stage {self.name!r} tokens", self.tokens, "a positive number of tokens")
        if self.transform is not None:
            check_transform(self.transform, self.transform_options, f"stage {self.name!r}")
        else:
            check(
                not self.transform_options,
                f"stage {self.name!r} transform_options",
                self.transform_options,
                "empty when the stage names no transform",
            )
        for cb in self.callbacks:
            check(
                isinstance(cb, dict) and "name" in cb and set(cb) <= {"name", "options"},
                f"stage {self.name!r} callbacks",
                cb,
                "{name: registered callback, options: {...}}",
            )
            check_callback(cb["name"], cb.get("options") or {}, f"stage {self.name!r}")


@dataclass
class TrainConfig(Config):
    model: str = option(help="the starting model: built-in name, HF folder, .gguf file or hub id")
    data: str = option(
        "shakespeare", "training text: shakespeare, pystdlib, a .txt/.jsonl file or folder ('a+b' mixes)"
    )
    out: str = option("runs/train", "run folder: checkpoints, metrics.jsonl, report.md, final/")
    seq_len: int = option(256, "tokens per sequence")
    global_batch: int = option(8, "sequences per optimizer step, over all processes")
    micro_batch: int = option(2, "sequences per forward pass (accumulation = global / (micro x processes))")
    lr: float = option(3e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final learning rate as a share of the peak")
    warmup_steps: int = option(10, "linear LR warm-up steps of each stage")
    schedule: str = option("cosine", "LR decay after the warm-up", choices=SCHEDULES)
    weight_decay: float = option(0.0, "AdamW weight decay")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    clip: float | None = option(1.0, "gradient-norm clip (none: off)")
    bf16: bool = option(False, "autocast the forward to bfloat16")
    seed: int = option(0, "seed of the data order and the model's randomness")
    losses: list[LossTerm] = option(
        help="loss terms: [{name, weight, options}] (lm, kd, router, ...)", factory=lambda: [LossTerm("lm")]
    )
    teacher: str | None = option(None, "the kd loss's teacher: a model source, or self (a frozen copy of the start)")
    groups: list[GroupConfig] = option(
        help="parameter groups: [{name, patterns | parts, lr_mult, frozen}]", factory=list
    )
    stages: list[StageConfig] = option(
        help="stages: [{name, tokens, train, lr, transform, callbacks}]", factory=lambda: [StageConfig("main", 100_000)]
    )
    log_every: int = option(1, "steps between metrics records")
    val_every: int = option(0, "steps between validations; 0 = only at the end of each stage")
    val_blocks: int = option(8, "validation blocks")
    ckpt_every: int = option(50, "steps between checkpoints (one is also written at the end of every stage)")
    distributed: str = option("ddp", "under torchrun: ddp or fsdp (FSDP2)", choices=DISTRIBUTED)
    val_fraction: float = option(0.1, "share of the documents held out for validation")
    trust_remote_code: bool = option(False, "run the model folder's own code (only for a source you trust)")
    progress: bool = option(True, "progress bars")

    def validate(self):
        check(self.seq_len >= 2, "seq_len", self.seq_len, ">= 2")
        check(self.micro_batch >= 1, "micro_batch", self.micro_batch, ">= 1")
        check(
            self.global_batch >= self.micro_batch and self.global_batch % self.micro_batch == 0,
            "global_batch",
            self.global_batch,
            f"a multiple of micro_batch ({self.micro_batch})",
        )
        check(self.lr > 0, "lr", self.lr, "> 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "between 0 and 1")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check(self.schedule in SCHEDULES, "schedule", self.schedule, " | ".join(SCHEDULES))
        check(self.clip is None or self.clip > 0, "clip", self.clip, "None or > 0")
        check(self.distributed in DISTRIBUTED, "distributed", self.distributed, " | ".join(DISTRIBUTED))
        check(bool(self.losses), "losses", self.losses, "at least one loss term")
        check(bool(self.stages), "stages", self.stages, "at least one stage")
        check(
            self.ckpt_every >= 1 and self.log_every >= 1,
            "ckpt_every/log_every",
            (self.ckpt_every, self.log_every),
            ">= 1",
        )
        names = [s.name for s in self.stages]
        check(len(set(names)) == len(names), "stages", names, "distinct stage names")
        groups = {g.name for g in self.groups} | {"rest"}
        for stage in self.stages:
            for g in stage.train or []:
                check(g in groups, f"stage {stage.name!r} train", g, f"one of the groups {sorted(groups)}")
        for term in self.losses:
            check(term.name in LOSSES, "loss", term.name, f"one of {', '.join(sorted(LOSSES))}")
            if term.name == "kd":
                check(self.teacher is not None, "teacher", None, "a model source or 'self' when the kd loss is used")
