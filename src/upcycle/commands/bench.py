"""how much faster the bank-sparse FFN runs here: FFN layer dense vs sparse, greedy decoding

`upcycle bench MODEL`: the FFN microbenchmark at the model's own dims and Qwen2.5-7B's, and greedy
decoding dense vs sparse (upcycle.eval.speed has the measurements); bench.json and bench.md in OUT.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from upcycle import hub, kernels
from upcycle.arch import adapter_for
from upcycle.commands import quiet_transformers
from upcycle.config import Config, RunOptions, option
from upcycle.errors import ConfigError, check
from upcycle.eval.speed import QWEN7B_FFN, decode_bench, ffn_microbench
from upcycle.infer.calibrate import CALIBRATION_TOKENS, TOKENS_HELP, calibration_blocks
from upcycle.infer.precision import PRECISIONS, to_precision
from upcycle.modules import BankSparseFFN, BankSparsity
from upcycle.ops import densify
from upcycle.pipelines.sparsify import run as sparsify
from upcycle.report import RunFolder

SHAPES = ("model", "qwen7b")


@dataclass
class BenchConfig(Config):
    bank: int | None = option(None, "for a dense MODEL (default 64)")
    keep: int | None = option(None, "for a dense MODEL (default 16)")
    rank: int | None = option(None, "for a dense MODEL (default 64)")
    batches: tuple[int, ...] = option((1, 4, 16), "batch sizes of the FFN microbenchmark")
    shapes: tuple[str, ...] = option(SHAPES, "FFN shapes: the model's own (model) and/or Qwen2.5-7B's (qwen7b)")
    new_tokens: int = option(128, "greedy decoding length")
    repeats: int = option(5, "alternating measurements per figure (median)")
    decode: bool = option(True, "also time greedy decoding (--no-decode: only the FFN microbenchmark)")
    compile: bool = option(
        False, "decode both models under torch.compile (static cache; the first run compiles, ~1 min)"
    )
    lean: bool = option(
        False,
        "decode both models through upcycle's lean decoder (one compiled step, no generate(); "
        "what `upcycle generate` runs)",
    )
    precision: str = option(
        "fp32",
        "decoding precision of both models: fp32, bf16, or int8 / int4 weights with bf16 "
        "activations (the FFN microbenchmark stays fp32)",
        choices=PRECISIONS,
    )
    int4_calibration_tokens: int = option(CALIBRATION_TOKENS, TOKENS_HELP)

    def validate(self):
        check(bool(self.batches) and min(self.batches) >= 1, "batches", self.batches, "positive integers")
        check(self.new_tokens >= 1, "new_tokens", self.new_tokens, ">= 1")
        check(self.repeats >= 1, "repeats", self.repeats, ">= 1")
        check(self.int4_calibration_tokens >= 0, "int4_calibration_tokens", self.int4_calibration_tokens, ">= 0")
        check(bool(self.shapes) and set(self.shapes) <= set(SHAPES), "shapes", self.shapes, "model and/or qwen7b")
        given = {k: getattr(self, k) for k in ("bank", "keep", "rank") if getattr(self, k) is not None}
        if given:
            BankSparsity(**given)  # the same checks as sparsify's

    @property
    def sparsity(self) -> BankSparsity | None:
        given = {k: getattr(self, k) for k in ("bank", "keep", "rank") if getattr(self, k) is not None}
        return BankSparsity(**given) if given else None


@dataclass
class BenchReport:
    model: str
    kernel: str  # "compiled" or why not
    ffn: dict = field(default_factory=dict)
    decode: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def table(self) -> str:
        lines = ["| FFN layer | batch | dense ms | sparse ms | speedup | limit (bytes) |", "|---|---|---|---|---|---|"]
        for key, r in self.ffn.items():
            limit = f"{r['limit']:.2f}×" if r["limit"] else "—"
            lines.append(
                f"| {key.rsplit('_b', 1)[0]} {r['shape'][0]}×{r['shape'][1]} | {r['batch']} | "
                f"{r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}× | {limit} |"
            )
        if self.decode:
            d = self.decode
            mb = {k: v["total"] / 1e6 for k, v in d["bytes_per_token"].items()}
            lines += [
                "",
                f"Greedy decoding ({d.get('precision', 'fp32')}), {d['new_tokens']} tokens, {d['threads']} threads: dense "
                f"{d['dense_tokens_per_s']:.1f} tok/s, sparse {d['sparse_tokens_per_s']:.1f} tok/s — "
                f"{d['speedup']:.2f}× (weights read per token {mb['dense']:.0f} MB vs {mb['sparse']:.0f} MB: "
                f"limit {d['limit']:.2f}×; with no FFN at all {d['ceiling']:.2f}×)"
                + (" — compiled" if d.get("compiled") else ""),
            ]
            if d.get("time_per_token_ms"):
                split = d["time_per_token_ms"]
                lines += [
                    f"Time per token inside the FFNs: dense {split['dense']['ffn_ms']:.1f} ms, "
                    f"sparse {split['sparse']['ffn_ms']:.1f} ms ({d['ffn_speedup_in_model']:.2f}×); "
                    f"outside them: {split['dense']['other_ms']:.1f} vs {split['sparse']['other_ms']:.1f} ms"
                ]
        return "\n".join(lines)


def sparse_and_dense(model, tokenizer, sparsity: BankSparsity, warmup_steps: int = 100):
    """Both sides of a decode comparison from either kind of model: a bank-sparse model and its
    densified twin, or a dense model and a sparsified copy (the predictor's quality does not change
    the speed; a short warm-up gives it a realistic selection pattern)."""
    if any(isinstance(m, BankSparseFFN) for m in model.modules()):
        return densify(model), model
    sparse, _ = sparsify(
        model,
        tokenizer,
        convert_steps=0,
        progress=False,
        bank=sparsity.bank,
        keep=sparsity.keep,
        rank=sparsity.rank,
        predictor=sparsity.predictor,
        bits=sparsity.bits,
        group=sparsity.group,
        quantizer=sparsity.quantizer,
        warmup_steps=warmup_steps,
        calibration_tokens=8192,
    )
    return model, sparse


def run(
    model: str, config: BenchConfig = BenchConfig(), *, out: str | None = None, options: RunOptions = RunOptions()
) -> BenchReport:
    """Time MODEL's FFN layer and greedy decoding, dense vs sparse; print the table; with OUT, write
    bench.json and bench.md there."""
    quiet_transformers()
    if out is not None:
        hub.check_out(out, overwrite=True)  # a report folder: refreshed, never a model
    loaded, tokenizer = hub.load(model, trust_remote_code=options.trust_remote_code)
    adapter = adapter_for(loaded)
    found = next((i for i in range(adapter.num_layers) if isinstance(adapter.ffn(i), BankSparseFFN)), None)
    sparsity = config.sparsity or (adapter.ffn(found).sparsity if found is not None else BankSparsity())
    width = adapter.ffn_weights(found or 0).width
    known = {"model": (loaded.config.hidden_size, width), "qwen7b": QWEN7B_FFN}
    shapes = {name: known[name] for name in config.shapes}
    report = BenchReport(model=str(model), kernel="compiled" if kernels.available() else str(kernels.why_unavailable()))
    report.ffn = ffn_microbench(shapes, config.batches, sparsity, repeats=config.repeats, progress=options.progress)
    if config.decode:
        if tokenizer is None:
            raise ConfigError(f"{model}: no tokenizer, so no decoding benchmark (pass --no-decode)")
        dense, sparse = sparse_and_dense(loaded, tokenizer, sparsity)
        blocks = calibration_blocks(tokenizer, config.int4_calibration_tokens) if config.precision == "int4" else None
        if not config.lean:  # the lean decoder converts its own copies
            dense, sparse = (to_precision(m, config.precision, blocks) for m in (dense, sparse))
        report.decode = decode_bench(
            dense,
            sparse,
            tokenizer,
            new_tokens=config.new_tokens,
            repeats=config.repeats,
            compiled=config.compile,
            lean=config.lean,
            precision=config.precision,
            progress=options.progress,
            calibration=blocks,
        )
        report.decode["precision"] = config.precision
    print(report.table())
    if out is not None:
        folder = RunFolder(out, report="bench.md", metrics="bench.json")
        folder.section(None, report.table())
        folder.metrics.update(asdict(report))
        folder.write(f"upcycle bench {model}")
        print(f"wrote {folder.path / 'bench.json'} and bench.md")
    return report
