"""make a model larger — dense → MoE, more experts, deeper, wider — verified at every step"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from upcycle import data, hub
from upcycle.cache import building
from upcycle.commands import quiet_transformers
from upcycle.config import option
from upcycle.errors import ConfigError, check
from upcycle.eval import compare
from upcycle.ops.grow import GrowChecks, GrowStep, StepReport, apply_step
from upcycle.report import RunFolder, markdown_table
from upcycle.yamlfile import read_mapping


@dataclass
class GrowConfig(GrowChecks, GrowStep):
    plan: str | None = option(None, "a growth plan: a YAML file with `steps:`, a list of steps (each: op and its "
                              "options), applied in order and each verified")
    steps: list[GrowStep] | None = option(None, "the plan's steps given inline (a --config recipe's form)")
    calibration: str = option("shakespeare+pystdlib", "text for k-means routers (train split) and for verifying "
                              "each step (validation split)")
    calibration_tokens: int = option(8192, "tokens of text for k-means and for the verification each")
    seq_len: int = option(256, "length of the text blocks")
    progress: bool = option(True, "progress bars")
    overwrite: bool = option(False, "replace a non-empty OUT")
    trust_remote_code: bool = option(False, "run the model folder's own code (only for a source you trust)")

    def validate(self) -> None:
        GrowStep.validate(self)
        GrowChecks.validate(self)
        check(self.calibration_tokens >= self.seq_len, "calibration_tokens", self.calibration_tokens,
              f"at least seq_len={self.seq_len}")
        given = sum(x is not None for x in (self.op, self.plan, self.steps))
        check(given <= 1, "op", self.op, "give one of --op (a single step), --plan FILE or steps in a --config")

    def plan_steps(self) -> list[GrowStep]:
        """The steps to apply: the plan file's, the inline list, or the one step the options describe."""
        if self.plan is not None:
            mapping = read_mapping(self.plan, "plan")
            unknown = set(mapping) - {"steps"}
            if unknown or not isinstance(mapping.get("steps"), list) or not mapping["steps"]:
                raise ConfigError(f"plan {self.plan!r} must hold `steps:`, a non-empty list of steps"
                                  + (f" (unknown key {sorted(unknown)[0]!r})" if unknown else ""))
            return [GrowStep.from_dict(s, f"steps[{n}]") if isinstance(s, dict) else _not_a_step(n, s)
                    for n, s in enumerate(mapping["steps"])]
        if self.steps:
            return list(self.steps)
        if self.op is None:
            raise ConfigError("nothing to grow: give --op (e.g. --op moe --experts 8 --top-k 2) or --plan FILE")
        return [GrowStep(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GrowStep)})]

    @property
    def checks(self) -> GrowChecks:
        return GrowChecks(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GrowChecks)})


def _not_a_step(n: int, value):
    raise ConfigError(f"steps[{n}] is {value!r}: each step is a mapping such as {{op: depth, add: 2}}")


def grow(model, tokenizer, config: GrowConfig) -> tuple[torch.nn.Module, list[StepReport], dict]:
    """Apply every step of the plan in order, each verified against the model before it; then the
    grown model against the source. Returns (grown, step reports, overall preservation)."""
    steps = config.plan_steps()
    held = data.blocks(config.calibration, tokenizer, "validation", config.seq_len,
                       max_blocks=max(1, config.calibration_tokens // config.seq_len))
    calibration = data.blocks(config.calibration, tokenizer, "train", config.seq_len,
                              max_blocks=max(1, config.calibration_tokens // config.seq_len))
    current, reports, saved = model, [], []
    for n, step in enumerate(steps, 1):
        current, report = apply_step(current, step, held, config.checks, calibration=calibration)
        print(f"step {n}/{len(steps)}: {report.line()}", flush=True)
        reports.append(report)
        saved.append(current if step.save else None)
    overall = compare(model, current, held)
    return current, reports, {"equivalence": overall.as_dict(), "loss_change": overall.loss_change,
                              "exact": all(r.kind == "exact" for r in reports), "saved": saved}


def run(model: str, out: str, config: GrowConfig = GrowConfig()) -> dict:
    """Load MODEL, apply the growth plan (or the one step given), verify each step on held-out text,
    save OUT (a stock Hugging Face folder: Qwen2-MoE / Qwen3-MoE / Mixtral, or the source's family),
    reload it and compare, and write grow_report.{md,json} beside it. Steps marked `save` are written
    to OUT/step-<n>. Nothing is written when a step fails its check."""
    quiet_transformers()
    steps = config.plan_steps()  # a bad plan is refused before the model is loaded
    out_path = hub.check_out(out, config.overwrite)
    source, tokenizer = hub.load(model, trust_remote_code=config.trust_remote_code)
    grown, reports, overall = grow(source, tokenizer, config)
    eq = overall["equivalence"]
    if overall["exact"] and eq["max_abs_logit"] > config.tolerance:
        from upcycle.ops.grow import GrowthNotPreserved
        raise GrowthNotPreserved(f"every step is exact but the grown model drifted from the source: max |Δlogit| "
                                 f"{eq['max_abs_logit']:.3g} > tolerance {config.tolerance:g}")
    if out_path.exists():
        import shutil
        shutil.rmtree(out_path)
    with building(out_path) as tmp:
        grown.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for n, model_n in enumerate(overall.pop("saved"), 1):
            if model_n is not None:
                model_n.save_pretrained(tmp / f"step-{n}", safe_serialization=True)
                tokenizer.save_pretrained(tmp / f"step-{n}")
        result = write_report(tmp, model, steps, reports, overall)
    reloaded, _ = hub.load(out_path)
    probe = torch.randint(0, grown.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    reload_check = compare(grown, reloaded, probe)
    print(f"saved {out_path} ({grown.config.architectures[0]}, {sum(p.numel() for p in grown.parameters()) / 1e6:.1f}M "
          f"parameters); vs the source: max |Δlogit| {eq['max_abs_logit']:.3g}, mean KL {eq['mean_kl']:.3g}, top-1 "
          f"{eq['top1_agreement']:.4f}; reloaded: {reload_check.summary()}\nreport: {out_path / 'grow_report.md'}")
    return result


def write_report(folder: Path, source: str, steps: list[GrowStep], reports: list[StepReport], overall: dict) -> dict:
    run_folder = RunFolder(folder, report="grow_report.md", metrics="grow_report.json")
    rows = []
    for n, r in enumerate(reports, 1):
        p = r.preservation
        rows.append([n, r.step, r.kind, f"{r.params_before / 1e6:.1f}M → {r.params_after / 1e6:.1f}M", f"{r.seconds:.1f}",
                     f"{p.max_dlogit:.3g}", f"{p.kl:.3g}", f"{p.top1:.4f}", f"{p.logit_cosine:.6f}",
                     f"{100 * p.loss_change:+.2f} %", "-" if p.router_kl is None else f"{p.router_kl:.3g}",
                     "pass" if p.passed else "FAIL"])
    run_folder.section(None, f"Grown from `{source}` in {len(steps)} step(s), each compared with the model before it "
                       f"on {reports[0].preservation.tokens if reports else 0} held-out tokens. Kinds: exact (held to "
                       "the tolerance), diversity (held to the thresholds), changed (the step asks for a different "
                       "function: reported).")
    run_folder.section("Steps", markdown_table(["#", "step", "kind", "parameters", "s", "max \\|Δlogit\\|", "mean KL",
                                                "top-1", "logit cosine", "loss change", "router KL", "check"], rows))
    eq = overall["equivalence"]
    run_folder.section("Grown vs source", f"max |Δlogit| {eq['max_abs_logit']:.3g}, mean KL {eq['mean_kl']:.3g}, "
                       f"top-1 agreement {eq['top1_agreement']:.4f}, logit cosine {eq['logit_cosine']:.6f}, loss "
                       f"{eq['loss_reference']:.4f} → {eq['loss_candidate']:.4f}.")
    run_folder.section("Why each step preserves (or not)", "\n".join(f"{n}. {r.step} — {r.why}"
                                                                   for n, r in enumerate(reports, 1)))
    run_folder.metrics.update({"source": source, "steps": [s.to_dict() for s in steps],
                               "reports": [r.as_dict() for r in reports], "overall": overall})
    run_folder.write(f"grow {source}")
    return run_folder.metrics
