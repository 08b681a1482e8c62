"""grow: a model made larger — dense → MoE, more experts, deeper, wider — step by step, each step
verified against the model before it, then the grown model against the source.

    grown, report = upcycle.grow(model, tokenizer, GrowConfig(steps=[GrowStep(op="moe", experts=8)]))
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from upcycle import data
from upcycle.arch import adapter_for
from upcycle.arch.reexpress import copy_into_moe, moe_config
from upcycle.checkpoint import LazyModel, meta_model
from upcycle.config import Config, RunOptions, option, read_plan
from upcycle.errors import ConfigError, check
from upcycle.eval import compare
from upcycle.ops.grow import KMEANS_ROWS, GrowChecks, GrowStep, GrowthNotPreserved, StepReport, apply_step
from upcycle.ops.grow.depth import evenly
from upcycle.ops.grow.moe import distinct_routes, kmeans_rows, moe_kind, moe_layer, moe_widths
from upcycle.ops.grow.verify import judge
from upcycle.ops.grow.width import hidden_config_changes, hidden_scale, tile, widen_ffn_layer
from upcycle.pipelines import Result, configured
from upcycle.pipelines.streaming import LayerPass, StreamReport, open_source, reloaded_equivalence, shard_bytes
from upcycle.summary import parameter_count

__all__ = ["GrowConfig", "GrowReport", "GrowStep", "GrowChecks", "run"]


@dataclass
class GrowConfig(Config):
    plan: str | None = option(
        None,
        "a growth plan: a YAML file with `steps:`, a list of steps (each: op and its "
        "options), applied in order and each verified",
    )
    steps: list[GrowStep] | None = option(None, "the plan's steps given inline (a --config recipe's form)")
    checks: GrowChecks = option(help="what each step's verification allows", factory=GrowChecks, cli=False)
    calibration: str = option(
        "shakespeare+pystdlib", "text for k-means routers (train split) and for verifying each step (validation split)"
    )
    calibration_tokens: int = option(8192, "tokens of text for k-means and for the verification each")
    seq_len: int = option(256, "length of the text blocks")

    def validate(self) -> None:
        check(
            self.calibration_tokens >= self.seq_len,
            "calibration_tokens",
            self.calibration_tokens,
            f"at least seq_len={self.seq_len}",
        )
        check(self.plan is None or self.steps is None, "plan", self.plan, "a plan file or inline steps, not both")

    def plan_steps(self) -> list[GrowStep]:
        """The steps to apply: the plan file's or the inline list."""
        if self.plan is not None:
            return read_plan(self.plan, "steps", GrowStep, "steps")
        if self.steps:
            return list(self.steps)
        raise ConfigError("nothing to grow: give --op (e.g. --op moe --experts 8 --top-k 2) or --plan FILE")


@dataclass
class GrowReport:
    steps: list[GrowStep]
    reports: list[StepReport]  # one per step, each against the model before it
    equivalence: dict  # the grown model against the source, on held-out text
    loss_change: float
    exact: bool  # every step exact
    saved: list = field(default_factory=list, repr=False)  # the model after each step marked `save` (else None)

    def as_dict(self) -> dict:
        return {
            "steps": [s.to_dict() for s in self.steps],
            "reports": [r.as_dict() for r in self.reports],
            "overall": {"equivalence": self.equivalence, "loss_change": self.loss_change, "exact": self.exact},
        }


def run(
    model, tokenizer, config: GrowConfig | None = None, *, progress: bool = True, **overrides
) -> Result[GrowReport]:
    """Apply every step of the plan in order, each verified against the model before it (a step that
    fails its check raises GrowthNotPreserved); then the grown model against the source."""
    cfg = configured(GrowConfig, config, overrides)
    steps = cfg.plan_steps()
    n_blocks = max(1, cfg.calibration_tokens // cfg.seq_len)
    held = data.blocks(cfg.calibration, tokenizer, "validation", cfg.seq_len, max_blocks=n_blocks)
    calibration = data.blocks(cfg.calibration, tokenizer, "train", cfg.seq_len, max_blocks=n_blocks)
    current, reports, saved = model, [], []
    for step in steps:
        current, report = apply_step(current, step, held, cfg.checks, calibration=calibration)
        reports.append(report)
        saved.append(current if step.save else None)
    overall = compare(model, current, held)
    exact = all(r.kind == "exact" for r in reports)
    eq = overall.as_dict()
    if exact and eq["max_abs_logit"] > cfg.checks.tolerance:
        raise GrowthNotPreserved(
            f"every step is exact but the grown model drifted from the source: max |Δlogit| "
            f"{eq['max_abs_logit']:.3g} > tolerance {cfg.checks.tolerance:g}"
        )
    return Result(current, GrowReport(steps, reports, eq, overall.loss_change, exact, saved))


# ---- streamed: a checkpoint on disk, one layer at a time -------------------------------------------------

STREAMED_OPS = ("moe", "depth", "ffn_width", "hidden")  # the operators a streamed grow applies


def run_streamed(
    source, out, config: GrowConfig | None = None, *, options: RunOptions = RunOptions(), report_files=None
) -> tuple[Path, GrowReport, list[StreamReport]]:
    """Grow a checkpoint on disk into OUT one layer at a time (each step a streamed pass; a plan of several
    steps passes through folders beside OUT that are deleted as soon as the next step has read them), then
    stream the written model over held-out text against the source: never more than a layer in memory."""
    cfg = configured(GrowConfig, config, {})
    steps = cfg.plan_steps()
    slow = [s.op for s in steps if s.op not in STREAMED_OPS]
    if slow:
        raise ConfigError(f"a streamed grow applies {', '.join(STREAMED_OPS)}; this plan has {slow[0]}")
    out = Path(out)
    current, reports, streams, expected = source, [], [], None
    first, tokenizer = open_source(source, options)
    lazy = first
    n_blocks = max(1, cfg.calibration_tokens // cfg.seq_len)
    held = data.blocks(cfg.calibration, tokenizer, "validation", cfg.seq_len, max_blocks=n_blocks)
    calibration = data.blocks(cfg.calibration, tokenizer, "train", cfg.seq_len, max_blocks=n_blocks)
    try:
        for n, step in enumerate(steps):
            target = out if n == len(steps) - 1 else out.parent / f".{out.name}.step-{n + 1}"
            lazy = lazy if n == 0 else open_source(current, options)[0]
            folder, report, stream, logits = grow_step_streamed(lazy, step, target, held, calibration, tokenizer,
                                                                options)  # fmt: skip
            expected = expected if expected is not None else logits  # the source's logits, from the first pass
            reports.append(report)
            streams.append(stream)
            if n > 0:
                shutil.rmtree(current, ignore_errors=True)  # the previous step's folder: read, no longer needed
            current = folder
        overall = reloaded_equivalence(current, expected, held, first)
    except BaseException:
        for n in range(len(steps) - 1):
            shutil.rmtree(out.parent / f".{out.name}.step-{n + 1}", ignore_errors=True)
        raise
    kinds = {r.kind for r in reports}
    exact = kinds == {"exact"}
    # the written model against the source, judged by the plan's kind: a step's own check where it is one step
    kind = "exact" if exact else "changed" if "changed" in kinds else "diversity"
    verdict = judge(overall, kind, cfg.checks)
    if len(reports) == 1:
        reports[0].preservation = verdict
    report = GrowReport(steps, reports, overall.as_dict(), overall.loss_change, exact)
    if not verdict.passed:
        shutil.rmtree(current, ignore_errors=True)
        what = reports[0].step if len(reports) == 1 else "the grown model against the source"
        raise GrowthNotPreserved(f"{what}: {verdict.line()}")
    if report_files is not None:
        report_files(current, report, streams)
    return current, report, streams


def grow_step_streamed(lazy, step: GrowStep, out: Path, held, calibration, tokenizer, options: RunOptions):
    """One growth step streamed from `lazy` into `out`: (folder, StepReport, StreamReport, the source's
    logits on `held`, block by block). k-means routers read `calibration`'s FFN inputs layer by layer."""
    adapter, generator = lazy.adapter, torch.Generator().manual_seed(step.seed)
    params_before = parameter_count(lazy.model)
    kmeans = step.op == "moe" and step.router == "kmeans"
    source = {"held": held} | ({"calibration": calibration} if kmeans else {})
    pass_ = LayerPass(lazy, source=source, out=out, shard_bytes=shard_bytes(options), tokenizer=tokenizer,
                      progress=options.progress, desc=f"grow ({step.op})")  # fmt: skip
    if step.op == "moe":
        return _moe_streamed(pass_, step, params_before, kmeans)
    with pass_ as p:
        start = time.perf_counter()
        if step.op == "hidden":
            roles, scale = adapter.hidden_parameters(), hidden_scale(lazy.model.config, step.factor)
            outer = {n: tile(t, *roles[n], step, scale, generator) if n in roles else t
                     for n, t in lazy.outer_state().items()}  # fmt: skip
            p.set_outer(outer)
            changes = hidden_config_changes(adapter, step.factor)
        depth = depth_layout(adapter.num_layers, step) if step.op == "depth" else None
        for i in p.layers():
            if step.op == "ffn_width":
                widen_ffn_layer(adapter, adapter, i, step, generator)
            elif step.op == "hidden":
                layer, prefix = adapter.layer(i), lazy.layer_prefix(i)
                p.emit({k: tile(t, *roles[prefix + k], step, scale, generator) if prefix + k in roles else t
                        for k, t in layer.state_dict().items()}, index=i)  # fmt: skip
            else:
                writers = {id(w) for w in adapter.residual_writers(i)}
                state = adapter.layer(i).state_dict(keep_vars=True)
                p.drop()  # what the layout makes of layer i, and nothing where it leaves layer i out
                for n, (index, new) in enumerate(depth[i]):  # copies after the first: their own tensors
                    copy = {k: torch.zeros_like(t) if new and id(t) in writers else t if n == 0 else t.detach().clone()
                            for k, t in state.items()}  # fmt: skip
                    p.emit(copy, index)
                state = copy = None  # bound, they would keep this layer's tensors alive beside the next layer's
        expected = list(p.logits(p.source["held"]))
        if step.op == "ffn_width":
            moe = any(adapter.ffn_kind(i) == "moe" for i in range(adapter.num_layers))
            adapter.set_config(**({"expert_ffn_size": step.width} if moe else {"ffn_size": step.width}))
        elif step.op == "hidden":
            adapter.set_config(**changes)
        else:
            adapter.set_layer_origin([o for o, _ in depth["origin"]])
        seconds = time.perf_counter() - start
        folder = p.finish()
    after = LazyModel(folder)
    kind, why = ("changed", "trained layers repeated or dropped by the map") if step.op == "depth" and step.layer_map \
        and list(step.layer_map) != list(range(adapter.num_layers)) else ("exact", _WHY[step.op])  # fmt: skip
    report = StepReport(step.describe(), kind, why, after.config.model_type, params_before,
                        parameter_count(after.model), seconds)  # fmt: skip
    return folder, report, p.report, expected


def _moe_streamed(pass_: LayerPass, step: GrowStep, params_before: int, kmeans: bool):
    """Dense → MoE one layer at a time: each layer of the MoE model materialised from shapes, its attention
    and norms copied from the dense layer, its block written as to_moe writes it, then freed."""
    lazy = pass_.lazy
    family, expert_width, shared_width = moe_widths(lazy.model, step)
    config = moe_config(lazy.model, family, experts=step.experts, top_k=step.top_k, expert_width=expert_width,
                        shared_width=shared_width, normalize=step.normalize)  # fmt: skip
    target_model = meta_model(config, lazy.dtype)
    target = adapter_for(target_model)
    generator, kmeans_generator = torch.Generator().manual_seed(step.seed), torch.Generator().manual_seed(step.seed)
    with pass_ as p:
        start = time.perf_counter()
        for i in p.layers():
            layer = target.layer(i)
            layer.to_empty(device=lazy.device)
            copy_into_moe(dict(lazy.adapter.layer(i).named_parameters()), dict(layer.named_parameters()))
            rows = None
            if kmeans:
                inputs = p.source["calibration"].module_inputs(lazy.adapter.ffn(i), previous=True)[:KMEANS_ROWS]
                rows = kmeans_rows(inputs, distinct_routes(step), kmeans_generator)
                del inputs
            moe_layer(lazy.adapter, target, i, step, rows, generator, share=True)
            p.emit(layer.state_dict(), index=i, family=type(target))
            layer.to("meta")
        expected = list(p.logits(p.source["held"]))
        config.dtype = lazy.dtype
        p.output_config = config
        seconds = time.perf_counter() - start
        folder = p.finish()
    kind, why = moe_kind(step, family)
    report = StepReport(step.describe(), kind, why, family, params_before, parameter_count(target_model), seconds)
    return folder, report, p.report, expected


_WHY = {
    "depth": "new layers write nothing to the residual stream (o_proj and down = 0)",
    "ffn_width": "duplicated neurons split their down-projection columns",
    "hidden": "the hidden vector repeated; norms see the same ratio",
}


def depth_layout(n: int, step: GrowStep) -> dict:
    """For each source layer i, the output layers made from it: [(index, new)] (new: an identity copy
    with its residual writers zero); and under "origin" the source layer of every output layer."""
    if step.layer_map:
        bad = [o for o in step.layer_map if not 0 <= o < n]
        if bad:
            raise ConfigError(f"layer_map names layer {bad[0]}: this model has layers 0..{n - 1}")
        origin = [(o, False) for o in step.layer_map]
    else:
        after = sorted(step.at) if step.at else evenly(n, step.add)
        bad = [p for p in after if not -1 <= p < n]
        if bad:
            raise ConfigError(f"at names layer {bad[0]}: this model has layers 0..{n - 1} (-1: before the first)")
        origin = []
        for p in [-1] + list(range(n)):
            if p >= 0:
                origin.append((p, False))
            origin += [(max(p, 0), True)] * after.count(p)  # a layer inserted before the first copies the first
    layout: dict = {i: [] for i in range(n)}
    for index, (o, new) in enumerate(origin):
        layout[o].append((index, new))
    layout["origin"] = origin
    return layout
