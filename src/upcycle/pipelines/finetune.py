"""finetune: a model fine-tuned on a task with the one trainer — SEFT or masked to keep a pruned model's
zeros, LoRA / LoRA* (the baselines) or full — what it trained merged back into stock linear layers,
scored before and after (task exact match, held-out perplexity), every matrix's zeros checked.

    tuned, report = upcycle.finetune(model, tokenizer, FinetuneConfig(sparse="seft"))
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from upcycle import data
from upcycle.config import Config, option
from upcycle.errors import ConfigError, check
from upcycle.eval import perplexity
from upcycle.eval.extract import exact_match, extract_examples, write_extract_data
from upcycle.eval.peak_memory import peak_rss_mb, reset_peak, rss_mb
from upcycle.ops.prune import PruneSpec, prunable_linears, prune, zeros_in
from upcycle.pipelines import Result, configured
from upcycle.train import TrainConfig, Trainer
from upcycle.train.lora import lora_parameters, merge_lora
from upcycle.train.seft import merge_deltas

__all__ = ["FinetuneConfig", "FinetuneReport", "run"]


@dataclass
class FinetuneConfig(Config):
    sparse: str | None = option(
        None,
        "keep the pruned model's zeros: seft (sparse deltas whose positions evolve) or "
        "masked (every weight trains, the zeros stay)",
        choices=("seft", "masked"),
    )
    lora: int | None = option(None, "instead: LoRA of this rank (peft), merged at the end — dense again")
    lora_star: bool = option(
        False, "with --lora: re-prune the merged model with Wanda to the source's sparsity (LoRA*, SEFT's baseline)"
    )
    task: str = option(
        "extract",
        "the task: extract (record extraction, exact match), or none (train on --data)",
        choices=("extract", "none"),
    )
    examples: int = option(2000, "training examples of the task")
    eval_examples: int = option(96, "held-out examples of the task scored before and after (exact match)")
    validation_examples: int = option(
        0,
        "examples of another draw of the task scored after training too (validation_accuracy): for choosing "
        "hyperparameters apart from the examples reported",
    )
    data: str | None = option(None, "with --task none: training text (a corpus name, .txt/.jsonl file or folder)")
    held: str = option("pystdlib", "held-out text for perplexity (its validation split)")
    held_blocks: int = option(16, "held-out blocks of seq_len tokens")
    tokens: int = option(65536, "fine-tuning tokens")
    lr: float = option(1e-4, "peak learning rate (SEFT and LoRA usually want more than full fine-tuning)")
    seq_len: int = option(256, "tokens per training sequence")
    global_batch: int = option(8, "sequences per optimizer step")
    micro_batch: int = option(4, "sequences per forward pass")
    seed: int = option(0, "seed of the data order and of the deltas' first positions")
    budget_rank: int | None = option(16, "SEFT: deltas per matrix = the parameter count of a LoRA of this rank")
    density: float | None = option(
        None, "SEFT: deltas per matrix as a fraction of its weights (instead of budget_rank)"
    )
    every: int = option(20, "SEFT: steps between topology updates")
    window: int = option(5, "SEFT: steps of summed dense gradient before each update")
    drop: float = option(0.2, "SEFT: fraction of deltas dropped and regrown at the first update (cosine to 0)")
    resurrect: bool = option(
        True,
        "SEFT: let growth reach positions the pruning zeroed (the paper's resurrection; off: live positions only, "
        "its ablation). --drop 0 fixes the deltas' positions (no drop, no growth)",
    )
    calibration: str = option("shakespeare+pystdlib", "LoRA*: Wanda's calibration text (train split)")

    def validate(self) -> None:
        check(self.sparse is None or self.lora is None, "sparse", self.sparse, "either --sparse or --lora, not both")
        check(self.lora is None or self.lora >= 1, "lora", self.lora, "a rank >= 1")
        check(not self.lora_star or self.lora is not None, "lora_star", self.lora_star, "with --lora R")
        check(self.task != "none" or self.data is not None, "data", self.data, "training text when --task none")
        check(
            self.tokens >= self.global_batch * self.seq_len,
            "tokens",
            self.tokens,
            f"at least one step ({self.global_batch} × {self.seq_len})",
        )
        check(self.validation_examples >= 0, "validation_examples", self.validation_examples, "0 or more")
        check(self.density is None or 0 < self.density < 1, "density", self.density, "in (0, 1)")
        check(self.budget_rank is None or self.budget_rank >= 1, "budget_rank", self.budget_rank, ">= 1")

    @property
    def method(self) -> str:
        if self.sparse:
            return self.sparse
        if self.lora:
            return "lora_star" if self.lora_star else "lora"
        return "full"


@dataclass
class FinetuneReport:
    method: str
    before: dict  # {"ppl", "task_accuracy"}
    after: dict
    sparsity_before: float  # over the decoder layers' linear weights
    sparsity_after: float
    sparsity_exact: bool  # every matrix's zeros exactly the source's
    matrices_changed_zeros: list
    training: dict = field(default_factory=dict)  # steps, tokens, seconds, trainable parameters, peak memory
    run_dir: Path | None = None  # the training run's folder (metrics, report, curve), where the caller gave one

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "before": self.before,
            "after": self.after,
            "sparsity_before": self.sparsity_before,
            "sparsity_after": self.sparsity_after,
            "sparsity_exact": self.sparsity_exact,
            "matrices_changed_zeros": self.matrices_changed_zeros,
            **self.training,
        }


def run(
    model,
    tokenizer,
    config: FinetuneConfig | None = None,
    *,
    progress: bool = True,
    run_dir: str | Path | None = None,
    **overrides,
) -> Result[FinetuneReport]:
    """Score, fine-tune (in place: the model given is the one trained), merge, score again. The
    training run goes to `run_dir` (default: a temporary folder, removed after)."""
    cfg = configured(FinetuneConfig, config, overrides)
    zeros_before = _zeros(model)
    if cfg.method in ("seft", "masked", "lora_star") and not any(zeros_before.values()):
        raise ConfigError(
            f"--{'sparse ' + cfg.method if cfg.sparse else 'lora-star'} keeps a pruned model's "
            "zeros, and the model has none in its linear layers: run `upcycle prune` first"
        )
    held = data.blocks(cfg.held, tokenizer, "validation", cfg.seq_len, max_blocks=cfg.held_blocks)
    tasks = extract_examples(cfg.eval_examples, seed=10_000 + cfg.seed) if cfg.task == "extract" else []
    before = _score(model, tokenizer, held, tasks, progress)
    keep = run_dir is not None  # the caller's folder is kept; a temporary one is removed after training
    run_dir = Path(run_dir) if keep else Path(tempfile.mkdtemp(prefix="upcycle-finetune-"))
    try:
        tuned, training = _train(model, tokenizer, cfg, run_dir, progress)
        tuned = _merge(tuned, tokenizer, cfg, zeros_before)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    after = _score(tuned, tokenizer, held, tasks, progress)
    if cfg.task == "extract" and cfg.validation_examples:
        validation = extract_examples(cfg.validation_examples, seed=20_000 + cfg.seed)
        after["validation_accuracy"] = exact_match(tuned, tokenizer, validation, progress=progress)
    zeros_after = _zeros(tuned)
    kept = {k: zeros_after[k] == zeros_before[k] for k in zeros_before}
    training["peak_rss_mb"] = max(training["peak_before_train_mb"], peak_rss_mb())
    report = FinetuneReport(
        cfg.method,
        before,
        after,
        sum(zeros_before.values()) / _numel(tuned),
        sum(zeros_after.values()) / _numel(tuned),
        all(kept.values()),
        [k for k, ok in kept.items() if not ok],
        training,
        run_dir if keep else None,
    )
    return Result(tuned, report)


def _train(source, tokenizer, config: FinetuneConfig, run_dir: Path, progress: bool):
    if config.task == "extract":
        train_data = str(
            write_extract_data(run_dir / "task", tokenizer, extract_examples(config.examples, seed=config.seed))
        )
    else:
        train_data = config.data
    stage = {"name": "finetune", "tokens": config.tokens}
    groups = []
    if config.method == "seft":
        budget = {"density": config.density} if config.density else {"lora_rank": config.budget_rank}
        stage.update(
            transform="seft",
            transform_options={**budget, "seed": config.seed},
            callbacks=[
                {
                    "name": "seft",
                    "options": {
                        "every": config.every,
                        "window": config.window,
                        "drop": config.drop,
                        "nm": _nm(source),
                        "resurrect": config.resurrect,
                    },  # fmt: skip
                }
            ],
        )
        groups = [{"name": "deltas", "patterns": [r"\.delta$"]}, {"name": "rest", "frozen": True}]
    elif config.method == "masked":
        stage.update(callbacks=[{"name": "masked"}])
    elif config.method in ("lora", "lora_star"):
        stage.update(transform="lora", transform_options={"rank": config.lora})
        groups = [{"name": "lora", "patterns": [r"lora_"]}, {"name": "rest", "frozen": True}]
    cfg = TrainConfig.from_dict(
        dict(
            model="(in memory)",
            data=train_data,
            out=str(run_dir),
            seq_len=config.seq_len,
            global_batch=config.global_batch,
            micro_batch=config.micro_batch,
            lr=config.lr,
            warmup_steps=2,
            seed=config.seed,
            losses=[{"name": "lm"}],
            groups=groups,
            stages=[stage],
            ckpt_every=1_000_000,
            progress=progress,
            val_blocks=4,
        )
    )
    # the training's own peak, apart from the loading and scoring around it (which every method shares)
    held_before, peak_before = rss_mb(), peak_rss_mb()
    reset_peak()  # (this resets getrusage's peak too: the whole run's peak is the larger of the two)
    trainer = Trainer(cfg, model=source, tokenizer=tokenizer)
    started = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - started
    train_peak = peak_rss_mb()
    steps = trainer.progress.step
    trainable = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    step_s = [config.global_batch * config.seq_len / r["tok_s"] for r in records if "tok_s" in r]
    info = {
        "steps": steps,
        "tokens": trainer.progress.tokens,
        "train_seconds": wall,
        "s_per_step": sorted(step_s)[len(step_s) // 2] if step_s else wall / steps,
        "trainable_params": trainable,
        "optimizer_state_mb": 2 * 4 * trainable / 2**20,
        "train_peak_rss_mb": train_peak,
        "rss_before_train_mb": held_before,
        "peak_before_train_mb": peak_before,
        "lora_params": lora_parameters(trainer.model) if config.method.startswith("lora") else None,
    }
    return trainer.model, info


def _merge(model, tokenizer, config: FinetuneConfig, zeros_before: dict):
    if config.method == "seft":
        return merge_deltas(model).eval()
    if config.method in ("lora", "lora_star"):
        model = merge_lora(model).eval()
    if config.method == "lora_star":  # LoRA*: back to the source's sparsity by Wanda
        # the source's own pruning spec where `upcycle prune` saved it (so each matrix gets back its count),
        # else its overall fraction per matrix
        saved = getattr(model.config, "upcycle_pruning", None) or {}
        target = saved.get("target") or round(sum(zeros_before.values()) / _numel(model), 6)
        spec = PruneSpec(method="wanda", nm=saved.get("nm"), sparsity=target, per=saved.get("per") or "layer")
        calibration = data.blocks(config.calibration, tokenizer, "train", config.seq_len, max_blocks=32)
        model, _ = prune(model, spec, calibration, inplace=True)
    return model.eval()


def _nm(model) -> str | None:
    """The N:M pattern the model was pruned to, from the description `upcycle prune` saves."""
    return (getattr(model.config, "upcycle_pruning", None) or {}).get("nm")


def _zeros(model) -> dict[str, int]:
    return {k: zeros_in(m.weight) for k, m in prunable_linears(model).items()}


def _numel(model) -> int:
    return sum(m.weight.numel() for m in prunable_linears(model).values())


def _score(model, tokenizer, held, tasks, progress: bool) -> dict:
    ppl = perplexity(model, held, progress=False).ppl
    task = exact_match(model, tokenizer, tasks, progress=progress) if tasks else None
    return {"ppl": ppl, "task_accuracy": task}
