"""make a model smaller — fewer layers, hidden channels, FFN neurons, heads or experts — and recover it by distillation"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from upcycle import data, hub
from upcycle.commands import quiet_transformers
from upcycle.config import Config, option
from upcycle.errors import ConfigError, check
from upcycle.eval import compare
from upcycle.ops.slim import CutReport, SlimStep
from upcycle.ops.slim.lineage import Lineage, source_scores
from upcycle.report import RunFolder, markdown_table
from upcycle.yamlfile import read_mapping

# recovery losses by name: SlimQwen's KD + LM with the KD share ramped 1.0 -> 0.75 over each stage,
# KD or LM alone, and KD + LM with the multi-token-prediction terms
RECOVERY = {
    "kd_lm": [{"name": "kd", "weight": {"from": 1.0, "to": 0.75}}, {"name": "lm", "weight": {"from": 0.0, "to": 0.25}}],
    "kd": [{"name": "kd"}],
    "lm": [{"name": "lm"}],
    "kd_lm_mtp": [{"name": "kd", "weight": {"from": 1.0, "to": 0.75}}, {"name": "lm", "weight": {"from": 0.0, "to": 0.25}},
                  {"name": "mtp", "weight": 0.3}],
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
class SlimConfig(SlimStep):
    plan: str | None = option(None, "a slimming plan: a YAML file with `stages:`, each {name, cuts: [...], tokens} "
                              "— cuts made at the stage's start, then recovery training")
    stages: list[SlimStage] | None = option(None, "the plan's stages given inline (a --config recipe's form)")
    tokens: int = option(0, "recovery tokens after a single cut given by the options (0: one-shot)")
    recovery: str = option("kd_lm", "recovery losses: kd_lm (KD from the source + LM, KD share 1.0 → 0.75), kd, "
                           "lm, or kd_lm_mtp (+ multi-token prediction)", choices=tuple(RECOVERY))
    lr: float = option(3e-4, "recovery peak learning rate")
    global_batch: int = option(8, "recovery sequences per optimizer step")
    micro_batch: int = option(4, "recovery sequences per forward pass")
    data: str = option("shakespeare+pystdlib", "recovery training text")
    teacher: str | None = option(None, "the KD teacher of the recovery (default: the source model itself)")
    val_every: int = option(4, "recovery steps between validations (the curve in recovery/metrics.jsonl)")
    recompute: bool = option(True, "measure each cut's importance on the model as it is then (after the cuts and "
                             "training before it); --no-recompute: once, on the source, for the whole plan "
                             "(block influence, hidden, heads, FFN neurons; angular and experts always anew)")
    calibration: str = option("shakespeare+pystdlib", "text for importance (train split) and for the one-shot "
                              "measurements (validation split)")
    calibration_tokens: int = option(8192, "tokens of calibration text, and of held-out text, each")
    seq_len: int = option(256, "length of the text blocks")
    seed: int = option(0, "seed of the recovery run")
    progress: bool = option(True, "progress bars")
    overwrite: bool = option(False, "replace a non-empty OUT")
    trust_remote_code: bool = option(False, "run the model folder's own code (only for a source you trust)")

    def validate(self) -> None:
        SlimStep.validate(self)
        check(self.tokens >= 0, "tokens", self.tokens, "an integer >= 0")
        given = sum(x is not None for x in (self.op, self.plan, self.stages))
        check(given <= 1, "op", self.op, "give one of --op (a single cut), --plan FILE or stages in a --config")
        check(self.calibration_tokens >= self.seq_len, "calibration_tokens", self.calibration_tokens,
              f"at least seq_len={self.seq_len}")

    def plan_stages(self) -> list[SlimStage]:
        if self.plan is not None:
            mapping = read_mapping(self.plan, "plan")
            if set(mapping) != {"stages"} or not isinstance(mapping["stages"], list) or not mapping["stages"]:
                raise ConfigError(f"plan {self.plan!r} must hold `stages:`, a non-empty list of "
                                  "{name, cuts: [...], tokens}")
            return [SlimStage.from_dict(s, f"stages[{n}]") if isinstance(s, dict) else _not_a_stage(n, s)
                    for n, s in enumerate(mapping["stages"])]
        if self.stages:
            return list(self.stages)
        if self.op is None:
            raise ConfigError("nothing to cut: give --op (e.g. --op depth --layers 8) or --plan FILE")
        step = SlimStep(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SlimStep)})
        return [SlimStage(name="cut", cuts=[step], tokens=self.tokens)]


def _not_a_stage(n: int, value):
    raise ConfigError(f"stages[{n}] is {value!r}: each stage is a mapping {{name, cuts: [...], tokens}}")


def run(model: str, out: str, config: SlimConfig = SlimConfig()) -> dict:
    """Load MODEL, make the plan's cuts (each chosen by importance on calibration text and measured one
    shot on held-out text), recover with the one trainer where the plan asks for tokens (KD from the
    source + LM by default), save OUT as a stock Hugging Face folder of the source's family, reload it
    and compare, and write slim_report.{md,json} (the recovery run in OUT/recovery)."""
    from upcycle.train import slim as slim_stage

    quiet_transformers()
    stages = config.plan_stages()  # a bad plan is refused before the model is loaded
    out_path = hub.check_out(out, config.overwrite)
    source, tokenizer = hub.load(model, trust_remote_code=config.trust_remote_code)
    n_blocks = max(1, config.calibration_tokens // config.seq_len)
    calibration = data.blocks(config.calibration, tokenizer, "train", config.seq_len, max_blocks=n_blocks)
    held = data.blocks(config.calibration, tokenizer, "validation", config.seq_len, max_blocks=n_blocks)
    training = any(s.tokens for s in stages)
    run_dir = None
    slim_stage.reset(source_scores(source, [c for s in stages for c in s.cuts], calibration)
                     if not config.recompute else None, Lineage.of(source))
    if not training:
        slim = source
        for stage in stages:
            for step in stage.cuts:
                slim, report = slim_stage.cut(slim, step, calibration, held)
                print(f"cut: {report.line()}", flush=True)
    else:
        run_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.recovery.", dir=_existing_parent(out_path)))
        try:
            slim = _recover(model, source, tokenizer, stages, config, run_dir)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
    reports = list(slim_stage.REPORTS)
    if not training and len(reports) == 1 and reports[0].equivalence is not None:
        final = reports[0].equivalence  # one cut, no training: that cut was already compared with the source here
    else:
        final = compare(source, slim, held)
    if out_path.exists():
        shutil.rmtree(out_path)
    folder, reload_check = hub.save_verified(slim, tokenizer, out_path)
    if run_dir is not None:  # the run's metrics, report and curve; its checkpoints and final copy are OUT itself
        for heavy in ("checkpoints", "final"):
            shutil.rmtree(run_dir / heavy, ignore_errors=True)
        shutil.move(str(run_dir), str(folder / "recovery"))
    result = write_report(folder, model, stages, reports, final, config)
    print(f"saved {folder} ({type(slim).__name__}, {_params(source) / 1e6:.1f}M → {_params(slim) / 1e6:.1f}M "
          f"parameters); held-out ppl {math.exp(final.loss_reference):.2f} (source) → {math.exp(final.loss_candidate):.2f}"
          f"; reloaded: {reload_check.summary()}\nreport: {folder / 'slim_report.md'}")
    return result


def _recover(model_name: str, source, tokenizer, stages: list[SlimStage], config: SlimConfig, run_dir: Path):
    """The plan as stages of the one trainer: each stage's cuts are its `slim` transform; a stage
    without tokens hands its cuts to the next stage (and the last ones are made after training)."""
    from upcycle.train import Trainer, TrainConfig
    from upcycle.train import slim as slim_stage
    from upcycle.train.mtp import detach_mtp

    calibration = {"calibration": config.calibration, "calibration_tokens": config.calibration_tokens,
                   "seq_len": config.seq_len, "held_tokens": config.calibration_tokens, "recompute": config.recompute}
    train_stages, pending = [], []
    for stage in stages:
        pending += [s.to_dict() for s in stage.cuts]
        if stage.tokens:
            train_stages.append({"name": stage.name, "tokens": stage.tokens, "transform": "slim",
                                 "transform_options": {"cuts": pending, "mtp": config.recovery.endswith("mtp"),
                                                       **calibration}})
            pending = []
    cfg = TrainConfig.from_dict(dict(
        model=model_name, data=config.data, out=str(run_dir), seq_len=config.seq_len, global_batch=config.global_batch,
        micro_batch=config.micro_batch, lr=config.lr, warmup_steps=2, seed=config.seed,
        losses=RECOVERY[config.recovery], stages=train_stages, ckpt_every=10_000, progress=config.progress, teacher="self",
        val_blocks=8, val_every=config.val_every))
    teacher = source if config.teacher is None else hub.load(config.teacher)[0]
    trainer = Trainer(cfg, model=copy.deepcopy(source), tokenizer=tokenizer, teacher=teacher)
    trainer.fit()
    slim = detach_mtp(trainer.model).eval()
    if pending:
        slim = slim_stage.slim_stage(slim, tokenizer, pending, **calibration)
    return slim


def _existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def write_report(folder: Path, source: str, stages: list[SlimStage], reports: list[CutReport], final, config) -> dict:
    run_folder = RunFolder(folder, report="slim_report.md", metrics="slim_report.json")
    rows = [[n, r.step, f"{r.params_before / 1e6:.2f}M → {r.params_after / 1e6:.2f}M", f"{r.ppl_before:.2f}",
             f"{r.ppl_after:.2f}", f"{r.kl:.3g}", f"{r.top1:.3f}", f"{r.seconds:.1f}"]
            for n, r in enumerate(reports, 1)]
    run_folder.section(None, f"Slimmed from `{source}`. Each cut is chosen by importance on calibration text and "
                       "measured one shot (before any training) against the model it was cut from, on held-out text.")
    run_folder.section("Cuts", markdown_table(["#", "cut", "parameters", "ppl before", "ppl after (one shot)",
                                               "mean KL", "top-1", "s"], rows))
    tokens = sum(s.tokens for s in stages)
    run_folder.section("Result", f"Recovery: {tokens} tokens ({config.recovery}); `recovery/` holds the run. "
                       f"Held-out perplexity: source {math.exp(final.loss_reference):.3f}, slimmed "
                       f"{math.exp(final.loss_candidate):.3f}; mean KL {final.mean_kl:.4g}, top-1 agreement "
                       f"{final.top1_agreement:.4f}.")
    run_folder.metrics.update({"source": source, "stages": [s.to_dict() for s in stages],
                               "cuts": [r.as_dict() for r in reports], "recovery_tokens": tokens,
                               "recovery": config.recovery,
                               "ppl": {"source": math.exp(final.loss_reference), "slim": math.exp(final.loss_candidate)},
                               "final": final.as_dict()})
    run_folder.write(f"slim {source}")
    return run_folder.metrics
