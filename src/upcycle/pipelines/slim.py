"""slim: a smaller model cut from the one you have — fewer layers, hidden channels, FFN neurons, query
heads or experts — each cut chosen by importance and measured one shot, then recovered by distillation
with the one trainer where the plan gives tokens.

    slim, report = upcycle.slim(model, tokenizer, SlimConfig(stages=[SlimStage(cuts=[DepthCut(layers=8)])]))
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from upcycle import data, hub
from upcycle.arch import SwiGLUWeights
from upcycle.config import Config, RunOptions, option, read_plan
from upcycle.errors import ConfigError, check
from upcycle.eval import Equivalence, compare
from upcycle.ops.calibrate import channel_importance
from upcycle.ops.slim import CutReport, SlimStep
from upcycle.ops.slim.lineage import Lineage, source_scores
from upcycle.pipelines import Result, configured
from upcycle.pipelines.streaming import LayerPass, StreamReport, open_source, shard_bytes
from upcycle.summary import parameter_count
from upcycle.train import TrainConfig, Trainer
from upcycle.train.mtp import detach_mtp
from upcycle.train.slim import SlimState, slim_stage

__all__ = ["SlimConfig", "SlimStage", "SlimReport", "SlimStep", "RECOVERY", "run"]

# recovery losses by name: SlimQwen's KD + LM with the KD share ramped 1.0 -> 0.75 over each stage,
# KD or LM alone, and KD + LM with the multi-token-prediction term, its weight decayed 0.3 -> 0.1 (cosine)
# as the method does
RECOVERY = {
    "kd_lm": [{"name": "kd", "weight": {"from": 1.0, "to": 0.75}}, {"name": "lm", "weight": {"from": 0.0, "to": 0.25}}],
    "kd": [{"name": "kd"}],
    "lm": [{"name": "lm"}],
    "kd_lm_mtp": [
        {"name": "kd", "weight": {"from": 1.0, "to": 0.75}},
        {"name": "lm", "weight": {"from": 0.0, "to": 0.25}},
        {"name": "mtp", "weight": {"from": 0.3, "to": 0.1, "shape": "cosine"}},
    ],
}


@dataclass
class SlimStage(Config):
    """One stage of a slimming plan: cuts made at its start, then `tokens` of recovery training."""

    name: str = option("stage", "the stage's name (its training run is named after it)")
    cuts: list[SlimStep] = option(help="the cuts made when the stage starts, in order", factory=list)
    tokens: int = option(0, "recovery training tokens after the cuts (0: none)")

    def validate(self) -> None:
        check(self.tokens >= 0, f"stage {self.name!r} tokens", self.tokens, "an integer >= 0")


@dataclass
class SlimConfig(Config):
    plan: str | None = option(
        None,
        "a slimming plan: a YAML file with `stages:`, each {name, cuts: [...], tokens} "
        "— cuts made at the stage's start, then recovery training",
    )
    stages: list[SlimStage] | None = option(None, "the plan's stages given inline (a --config recipe's form)")
    tokens: int = option(0, "recovery tokens after a single cut given by the options (0: one-shot)")
    recovery: str = option(
        "kd_lm",
        "recovery losses: kd_lm (KD from the source + LM, KD share 1.0 → 0.75), kd, "
        "lm, or kd_lm_mtp (+ multi-token prediction)",
        choices=tuple(RECOVERY),
    )
    lr: float = option(3e-4, "recovery peak learning rate")
    global_batch: int = option(8, "recovery sequences per optimizer step")
    micro_batch: int = option(4, "recovery sequences per forward pass")
    data: str = option("shakespeare+pystdlib", "recovery training text")
    teacher: str | None = option(None, "the KD teacher of the recovery (default: the source model itself)")
    val_every: int = option(4, "recovery steps between validations (the curve in recovery/metrics.jsonl)")
    recompute: bool = option(
        True,
        "measure each cut's importance on the model as it is then (after the cuts and "
        "training before it); --no-recompute: once, on the source, for the whole plan "
        "(block influence, hidden, heads, FFN neurons; angular and experts always anew)",
    )
    calibration: str = option(
        "shakespeare+pystdlib", "text for importance (train split) and for the one-shot measurements (validation split)"
    )
    calibration_tokens: int = option(8192, "tokens of calibration text, and of held-out text, each")
    seq_len: int = option(256, "length of the text blocks")
    seed: int = option(0, "seed of the recovery run")

    def validate(self) -> None:
        check(self.tokens >= 0, "tokens", self.tokens, "an integer >= 0")
        check(self.plan is None or self.stages is None, "plan", self.plan, "a plan file or inline stages, not both")
        check(
            self.calibration_tokens >= self.seq_len,
            "calibration_tokens",
            self.calibration_tokens,
            f"at least seq_len={self.seq_len}",
        )

    def plan_stages(self) -> list[SlimStage]:
        if self.plan is not None:
            return read_plan(self.plan, "stages", SlimStage, "{name, cuts: [...], tokens}")
        if self.stages:
            return list(self.stages)
        raise ConfigError("nothing to cut: give --op (e.g. --op depth --layers 8) or --plan FILE")


@dataclass
class SlimReport:
    stages: list[SlimStage]
    cuts: list[CutReport]  # every cut, in order, each measured one shot against the model it was cut from
    final: Equivalence  # the slimmed model against the source, on held-out text
    recovery_tokens: int
    recovery: str
    recovery_dir: Path | None = None  # the recovery run's folder (metrics, report, curve), where the caller gave one

    def as_dict(self) -> dict:
        return {
            "stages": [s.to_dict() for s in self.stages],
            "cuts": [r.as_dict() for r in self.cuts],
            "recovery_tokens": self.recovery_tokens,
            "recovery": self.recovery,
            "ppl": {"source": math.exp(self.final.loss_reference), "slim": math.exp(self.final.loss_candidate)},
            "final": self.final.as_dict(),
        }


def run(
    model,
    tokenizer,
    config: SlimConfig | None = None,
    *,
    progress: bool = True,
    run_dir: str | Path | None = None,
    **overrides,
) -> Result[SlimReport]:
    """The plan's cuts, each chosen on calibration text and measured one shot on held-out text, with
    recovery training by the one trainer where a stage gives tokens (its run in `run_dir`, default a
    temporary folder). The input model is left unchanged."""
    cfg = configured(SlimConfig, config, overrides)
    stages = cfg.plan_stages()
    n_blocks = max(1, cfg.calibration_tokens // cfg.seq_len)
    calibration = data.blocks(cfg.calibration, tokenizer, "train", cfg.seq_len, max_blocks=n_blocks)
    held = data.blocks(cfg.calibration, tokenizer, "validation", cfg.seq_len, max_blocks=n_blocks)
    cuts = [c for s in stages for c in s.cuts]
    state = SlimState(source_scores(model, cuts, calibration), Lineage.of(model)) if not cfg.recompute else SlimState()
    reports: list[CutReport] = []
    if not any(s.tokens for s in stages):
        slim = model
        for step in cuts:
            slim, report = state.cut(slim, step, calibration, held)
            reports.append(report)
        recovery_dir = None
    else:
        recovery_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="upcycle-slim-"))
        try:
            slim = _recover(model, tokenizer, stages, cfg, state, reports, recovery_dir, progress)
        finally:
            if run_dir is None:  # a temporary run folder: gone, and the report says there is none
                shutil.rmtree(recovery_dir, ignore_errors=True)
                recovery_dir = None
    if len(reports) == 1 and reports[0].equivalence is not None and not any(s.tokens for s in stages):
        final = reports[0].equivalence  # one cut, no training: already compared with the source
    else:
        final = compare(model, slim, held)
    return Result(slim, SlimReport(stages, reports, final, sum(s.tokens for s in stages), cfg.recovery, recovery_dir))


def _recover(
    source,
    tokenizer,
    stages: list[SlimStage],
    cfg: SlimConfig,
    state: SlimState,
    reports: list,
    run_dir: Path,
    progress: bool,
):
    """The plan as stages of the one trainer: each stage's cuts are its `slim` transform; a stage
    without tokens hands its cuts to the next stage (and the last ones are made after training)."""
    calibration = {
        "calibration": cfg.calibration,
        "calibration_tokens": cfg.calibration_tokens,
        "seq_len": cfg.seq_len,
        "held_tokens": cfg.calibration_tokens,
        "recompute": cfg.recompute,
    }
    train_stages, pending = [], []
    for stage in stages:
        pending += [s.to_dict() for s in stage.cuts]
        if stage.tokens:
            train_stages.append(
                {
                    "name": stage.name,
                    "tokens": stage.tokens,
                    "transform": "slim",
                    "transform_options": {"cuts": pending, "mtp": cfg.recovery.endswith("mtp"), **calibration},
                }
            )
            pending = []
    train_config = TrainConfig.from_dict(
        dict(
            model="(in memory)",
            data=cfg.data,
            out=str(run_dir),
            seq_len=cfg.seq_len,
            global_batch=cfg.global_batch,
            micro_batch=cfg.micro_batch,
            lr=cfg.lr,
            warmup_steps=2,
            seed=cfg.seed,
            losses=RECOVERY[cfg.recovery],
            stages=train_stages,
            ckpt_every=10_000,
            progress=progress,
            teacher="self",
            val_blocks=8,
            val_every=cfg.val_every,
        )
    )
    teacher = source if cfg.teacher is None else hub.load(cfg.teacher)[0]
    trainer = Trainer(train_config, model=copy.deepcopy(source), tokenizer=tokenizer, teacher=teacher)
    trainer.state["slim"] = state
    try:
        trainer.fit()
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    for stage in train_stages:
        reports += trainer.stage_reports.get(stage["name"], [])
    slim = detach_mtp(trainer.model).eval()
    if pending:
        slim, last = slim_stage(slim, tokenizer, {"slim": state}, **{**calibration, "cuts": pending})
        reports += last
    return slim


# ---- streamed: one cut of a checkpoint on disk, one layer at a time ---------------------------------------


def streamable(stages: list[SlimStage]) -> bool:
    """One stage, one cut, no recovery, and a cut a streamed pass makes: depth by `last` or block influence
    (an importance pass, then a writing pass), FFN width by activation importance (one pass)."""
    if len(stages) != 1 or stages[0].tokens or len(stages[0].cuts) != 1:
        return False
    step = stages[0].cuts[0]
    return step.op == "ffn_width" or (step.op == "depth" and step.criterion in ("last", "block_influence"))


def run_streamed(
    source, out, config: SlimConfig | None = None, *, options: RunOptions = RunOptions(), report_files=None
) -> tuple[Path, SlimReport, list[StreamReport]]:
    """The plan's one cut made on a checkpoint on disk one layer at a time, as `run` makes it in memory (the
    same importance, the same kept layers or neurons), measured one shot on held-out text with source and
    slimmed model streamed side by side, and written to OUT in shards."""
    cfg = configured(SlimConfig, config, {})
    stages = cfg.plan_stages()
    if not streamable(stages):
        raise ConfigError("a streamed slim makes one cut without recovery: depth (last, block_influence) or ffn_width")
    step = stages[0].cuts[0]
    lazy, tokenizer = open_source(source, options)
    n_blocks = max(1, cfg.calibration_tokens // cfg.seq_len)
    calibration = data.blocks(cfg.calibration, tokenizer, "train", cfg.seq_len, max_blocks=n_blocks)
    held = data.blocks(cfg.calibration, tokenizer, "validation", cfg.seq_len, max_blocks=n_blocks)
    adapter, streams, start = lazy.adapter, [], time.perf_counter()
    params_before = parameter_count(lazy.model)
    kwargs = dict(out=out, shard_bytes=shard_bytes(options), tokenizer=tokenizer, progress=options.progress)
    if step.op == "depth":
        n = adapter.num_layers
        if step.layers >= n:
            raise ConfigError(
                f"layers={step.layers} is not allowed: this model has {n} layers and must keep at least one"
            )
        scores = None
        if step.criterion == "block_influence":
            scores, measured = block_influence_streamed(lazy, calibration, options)
            streams.append(measured)
            lazy = open_source(source, options)[0]  # the importance pass read every layer: a fresh model
            adapter = lazy.adapter
        removed = (
            list(range(n - step.layers, n)) if scores is None else sorted(scores.argsort()[: step.layers].tolist())
        )
        kept = [i for i in range(n) if i not in removed]
        with LayerPass(lazy, source={"held": held}, output={"held": held}, desc="slim (depth)", **kwargs) as p:
            for i in p.layers():
                p.drop()
                if i in kept:
                    p.emit(adapter.layer(i).state_dict(), index=kept.index(i))
            adapter.set_layer_origin(kept)
            removed_facts = {"removed_layers": removed, "scores": scores.tolist() if scores is not None else None}
            folder, report, final = _finish_cut(p, stages, params_before, start, removed_facts, report_files, cfg)
    else:
        if any(adapter.ffn_kind(i) != "dense" for i in range(adapter.num_layers)):
            raise ConfigError("op ffn_width cuts dense FFNs; this model has MoE FFNs (use op experts for an MoE)")
        width = adapter.ffn_weights(0).width
        if step.width >= width:
            raise ConfigError(f"width={step.width} is not allowed: smaller than the FFN width {width}")
        shares, kept_neurons = [], []
        pass_ = LayerPass(lazy, source={"held": held, "calibration": calibration}, output={"held": held},
                          desc="slim (ffn_width)", **kwargs)  # fmt: skip
        with pass_ as p:
            for i in p.layers():
                w = adapter.ffn_weights(i)
                score = channel_importance(w, p.source["calibration"].module_inputs(adapter.ffn(i), previous=True))
                index = score.topk(step.width).indices.sort().values
                shares.append(float(score[index].sum() / score.sum()))
                kept_neurons.append(index.tolist())
                with torch.no_grad():
                    cut = SwiGLUWeights(w.gate[index].clone(), w.up[index].clone(), w.down[:, index].clone())
                adapter.set_ffn_weights(i, cut)
                del w, cut  # bound, they would keep this layer's FFN alive beside the next layer's
            adapter.set_config(ffn_size=step.width)
            facts = {"kept_importance_per_layer": shares, "kept_neurons": kept_neurons}
            folder, report, final = _finish_cut(p, stages, params_before, start, facts, report_files, cfg)
    streams.append(p.report)
    return folder, SlimReport(stages, [report], final, 0, cfg.recovery), streams


def _finish_cut(p: LayerPass, stages, params_before: int, start: float, removed: dict, report_files, cfg):
    """The cut's one-shot figures from the pass's two held-out streams, and the folder written."""
    step = stages[0].cuts[0]
    eq = p.equivalence("held")
    written = parameter_count(p.model) if step.op != "depth" else None
    report = CutReport(step.describe(), params_before, written or 0, time.perf_counter() - start,
                       removed | {"importance_from": "this model"})  # fmt: skip
    report.ppl_before, report.ppl_after = math.exp(eq.loss_reference), math.exp(eq.loss_candidate)
    report.kl, report.top1, report.equivalence = eq.mean_kl, eq.top1_agreement, eq
    if step.op == "depth":  # the kept layers' parameters, and the rest of the model once
        per_layer = (params_before - _outer_params(p)) // p.lazy.num_layers
        report.params_after = params_before - per_layer * len(removed["removed_layers"])
    folder = p.finish(report=None if report_files is None else
                      lambda tmp: report_files(tmp, SlimReport(stages, [report], eq, 0, cfg.recovery), p.report))  # fmt: skip
    return folder, report, eq


def _outer_params(p: LayerPass) -> int:
    return sum(t.numel() for t in p.lazy.outer_state().values())


def block_influence_streamed(lazy, calibration, options: RunOptions) -> tuple[torch.Tensor, StreamReport]:
    """ShortGPT's block influence, 1 - mean cos(layer input, layer output) per layer, from one streamed pass
    (what importance.block_influence measures in memory)."""
    scores = []
    with LayerPass(lazy, source={"calibration": calibration}, progress=options.progress, desc="block influence") as p:
        for _ in p.layers():
            stream = p.source["calibration"]
            total, count = 0.0, 0
            for before, batch in zip(stream.previous, stream.batches):
                cos = F.cosine_similarity(before.float().cpu(), batch[0].float().cpu(), dim=-1)
                total, count = total + cos.double().sum().item(), count + cos.numel()
            scores.append(1 - total / count)
    return torch.tensor(scores), p.report
