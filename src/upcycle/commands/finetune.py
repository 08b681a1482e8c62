"""fine-tune a model on a task — SEFT or masked to keep a pruned model's zeros, or the LoRA baselines"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from upcycle import data, hub
from upcycle.commands import quiet_transformers
from upcycle.config import Config, option
from upcycle.errors import ConfigError, check
from upcycle.eval import perplexity
from upcycle.eval.extract import exact_match, extract_examples, write_extract_data
from upcycle.eval.peak_memory import peak_rss_mb, reset_peak, rss_mb
from upcycle.report import RunFolder, markdown_table

METHODS = ("seft", "masked", "lora", "lora_star", "full")


@dataclass
class FinetuneConfig(Config):
    sparse: str | None = option(None, "keep the pruned model's zeros: seft (sparse deltas whose positions evolve) or "
                                "masked (every weight trains, the zeros stay)", choices=("seft", "masked"))
    lora: int | None = option(None, "instead: LoRA of this rank (peft), merged at the end — dense again")
    lora_star: bool = option(False, "with --lora: re-prune the merged model with Wanda to the source's sparsity "
                             "(LoRA*, SEFT's baseline)")
    task: str = option("extract", "the task: extract (record extraction, exact match), or none (train on --data)",
                       choices=("extract", "none"))
    examples: int = option(2000, "training examples of the task")
    eval_examples: int = option(96, "held-out examples of the task scored before and after (exact match)")
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
    density: float | None = option(None, "SEFT: deltas per matrix as a fraction of its weights (instead of budget_rank)")
    every: int = option(20, "SEFT: steps between topology updates")
    window: int = option(5, "SEFT: steps of summed dense gradient before each update")
    drop: float = option(0.2, "SEFT: fraction of deltas dropped and regrown at the first update (cosine to 0)")
    calibration: str = option("shakespeare+pystdlib", "LoRA*: Wanda's calibration text (train split)")
    progress: bool = option(True, "progress bars")
    overwrite: bool = option(False, "replace a non-empty OUT")
    trust_remote_code: bool = option(False, "run the model folder's own code (only for a source you trust)")

    def validate(self) -> None:
        check(self.sparse is None or self.lora is None, "sparse", self.sparse, "either --sparse or --lora, not both")
        check(self.lora is None or self.lora >= 1, "lora", self.lora, "a rank >= 1")
        check(not self.lora_star or self.lora is not None, "lora_star", self.lora_star, "with --lora R")
        check(self.task != "none" or self.data is not None, "data", self.data, "training text when --task none")
        check(self.tokens >= self.global_batch * self.seq_len, "tokens", self.tokens,
              f"at least one step ({self.global_batch} × {self.seq_len})")
        check(self.density is None or 0 < self.density < 1, "density", self.density, "in (0, 1)")
        check(self.budget_rank is None or self.budget_rank >= 1, "budget_rank", self.budget_rank, ">= 1")

    @property
    def method(self) -> str:
        if self.sparse:
            return self.sparse
        if self.lora:
            return "lora_star" if self.lora_star else "lora"
        return "full"


def run(model: str, out: str, config: FinetuneConfig = FinetuneConfig()) -> dict:
    """Load MODEL, score it (task exact match, held-out perplexity), fine-tune it with the one trainer —
    SEFT, masked, LoRA, LoRA* or full — merge what it trained into stock linear layers, score it again,
    check every matrix's zeros against the source's, save OUT (a stock Hugging Face folder) and write
    finetune_report.{md,json} (the run in OUT/run)."""
    quiet_transformers()
    out_path = hub.check_out(out, config.overwrite)
    source, tokenizer = hub.load(model, trust_remote_code=config.trust_remote_code)
    zeros_before = _zeros(source)
    if config.method in ("seft", "masked", "lora_star") and not any(zeros_before.values()):
        raise ConfigError(f"--{'sparse ' + config.method if config.sparse else 'lora-star'} keeps a pruned model's "
                          f"zeros, and {model} has none in its linear layers: run `upcycle prune` first")
    held = data.blocks(config.held, tokenizer, "validation", config.seq_len, max_blocks=config.held_blocks)
    tasks = extract_examples(config.eval_examples, seed=10_000 + config.seed) if config.task == "extract" else []
    before = _score(source, tokenizer, held, tasks, config)
    print(f"before: {_line(before)}", flush=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.run.", dir=_existing_parent(out_path)))
    try:
        tuned, train_info = _train(model, source, tokenizer, config, run_dir)
        tuned = _merge(tuned, tokenizer, config, zeros_before)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    after = _score(tuned, tokenizer, held, tasks, config)
    zeros_after = _zeros(tuned)
    kept = {k: zeros_after[k] == zeros_before[k] for k in zeros_before}
    print(f"after:  {_line(after)}", flush=True)
    if out_path.exists():
        shutil.rmtree(out_path)
    folder, reload_check = hub.save_verified(tuned, tokenizer, out_path)
    for heavy in ("checkpoints", "final"):
        shutil.rmtree(run_dir / heavy, ignore_errors=True)
    shutil.move(str(run_dir), str(folder / "run"))
    result = {"source": model, "method": config.method, "before": before, "after": after,
              "sparsity_before": sum(zeros_before.values()) / _numel(tuned),
              "sparsity_after": sum(zeros_after.values()) / _numel(tuned),
              "sparsity_exact": all(kept.values()), "matrices_changed_zeros": [k for k, ok in kept.items() if not ok],
              **train_info, "peak_rss_mb": max(train_info["peak_before_train_mb"], peak_rss_mb()),
              "config": json.loads(json.dumps(config.to_dict(), default=str))}
    write_report(folder, result)
    print(f"saved {folder}; every matrix's zeros {'as in the source' if result['sparsity_exact'] else 'CHANGED'} "
          f"(sparsity {result['sparsity_before']:.4f} → {result['sparsity_after']:.4f}); reloaded: "
          f"{reload_check.summary()}\nreport: {folder / 'finetune_report.md'}")
    return result


def _train(model_name: str, source, tokenizer, config: FinetuneConfig, run_dir: Path):
    from upcycle.train import Trainer, TrainConfig
    from upcycle.train.lora import lora_parameters

    if config.task == "extract":
        text = write_extract_data(run_dir / "task", tokenizer, extract_examples(config.examples, seed=config.seed))
        train_data = str(text)
    else:
        train_data = config.data
    stage = {"name": "finetune", "tokens": config.tokens}
    groups = []
    if config.method == "seft":
        budget = {"density": config.density} if config.density else {"lora_rank": config.budget_rank}
        stage.update(transform="seft", transform_options={**budget, "seed": config.seed},
                     callbacks=[{"name": "seft", "options": {"every": config.every, "window": config.window,
                                                             "drop": config.drop, "nm": _nm(source)}}])
        groups = [{"name": "deltas", "patterns": [r"\.delta$"]}, {"name": "rest", "frozen": True}]
    elif config.method == "masked":
        stage.update(callbacks=[{"name": "masked"}])
    elif config.method in ("lora", "lora_star"):
        stage.update(transform="lora", transform_options={"rank": config.lora})
        groups = [{"name": "lora", "patterns": [r"lora_"]}, {"name": "rest", "frozen": True}]
    cfg = TrainConfig.from_dict(dict(
        model=model_name, data=train_data, out=str(run_dir), seq_len=config.seq_len, global_batch=config.global_batch,
        micro_batch=config.micro_batch, lr=config.lr, warmup_steps=2, seed=config.seed, losses=[{"name": "lm"}],
        groups=groups, stages=[stage], ckpt_every=1_000_000, progress=config.progress, val_blocks=4))
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
    info = {"steps": steps, "tokens": trainer.progress.tokens, "train_seconds": wall,
            "s_per_step": sorted(step_s)[len(step_s) // 2] if step_s else wall / steps,
            "trainable_params": trainable, "optimizer_state_mb": 2 * 4 * trainable / 2**20,
            "train_peak_rss_mb": train_peak, "rss_before_train_mb": held_before,
            "peak_before_train_mb": peak_before,
            "lora_params": lora_parameters(trainer.model) if config.method.startswith("lora") else None}
    return trainer.model, info


def _merge(model, tokenizer, config: FinetuneConfig, zeros_before: dict):
    from upcycle.ops.prune import PruneSpec, prune
    from upcycle.train.lora import merge_lora
    from upcycle.train.seft import merge_deltas

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
    from upcycle.ops.prune import prunable_linears

    return {k: int((m.weight == 0).sum()) for k, m in prunable_linears(model).items()}


def _numel(model) -> int:
    from upcycle.ops.prune import prunable_linears

    return sum(m.weight.numel() for m in prunable_linears(model).values())


def _score(model, tokenizer, held, tasks, config: FinetuneConfig) -> dict:
    ppl = perplexity(model, held, progress=False).ppl
    task = exact_match(model, tokenizer, tasks, progress=config.progress) if tasks else None
    return {"ppl": ppl, "task_accuracy": task}


def _line(score: dict) -> str:
    task = f"task exact match {score['task_accuracy']:.3f}, " if score["task_accuracy"] is not None else ""
    return f"{task}held-out ppl {score['ppl']:.3f}"


def _existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def write_report(folder: Path, result: dict) -> None:
    run_folder = RunFolder(folder, report="finetune_report.md", metrics="finetune_report.json")
    b, a = result["before"], result["after"]
    rows = [["task exact match", _fmt(b["task_accuracy"]), _fmt(a["task_accuracy"])],
            ["held-out perplexity", f"{b['ppl']:.3f}", f"{a['ppl']:.3f}"],
            ["sparsity of the decoder's linears", f"{result['sparsity_before']:.4%}", f"{result['sparsity_after']:.4%}"]]
    run_folder.section(None, f"Fine-tuned `{result['source']}` with {result['method']} on {result['tokens']} tokens "
                       f"({result['steps']} steps, {result['s_per_step']:.2f} s a step, {result['trainable_params']:,} "
                       f"trainable parameters, peak memory {result['train_peak_rss_mb']:.0f} MB while training, "
                       f"{result['peak_rss_mb']:.0f} MB in all). Every matrix's zeros "
                       f"{'are exactly the source' + chr(39) + 's' if result['sparsity_exact'] else 'changed'}.")
    run_folder.section("Before and after", markdown_table(["", "before", "after"], rows))
    run_folder.metrics.update(result)
    run_folder.write(f"finetune {result['source']}")


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"
