"""How much faster a bank-sparse model really runs on this CPU, and what the bytes say it could.

Three measurements, each a ratio of two timings taken in the same process, alternating, medians:

  ffn_microbench   one FFN layer, dense SwiGLU (three nn.Linear, as Hugging Face runs it) vs the
                   bank-sparse module in eval mode (predictor + top-k + kept channels: the whole cost)
  decode_bench     greedy decoding tokens/s, the dense Hugging Face model vs the sparse model
  weight_bytes     the physical limit: bytes of weights a decoding step reads, dense vs sparse

Decoding one token reads every weight once (batch 1 is memory-bound), so bytes(dense) / bytes(sparse)
is the speedup the hardware allows; the attention, the norms and the LM head are read in full by both.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from upcycle import kernels
from upcycle.arch import adapter_for
from upcycle.errors import ConfigError
from upcycle.modules import BankSparseFFN, BankSparsity

QWEN7B_FFN = (3584, 18944)  # hidden, FFN width of Qwen2.5-7B: the large shape


def _median_pair(first, second, repeats: int, calls: int) -> tuple[float, float]:
    """Median seconds per call of two functions, measured alternately (drift hits both alike)."""
    a, b = [], []
    for _ in range(repeats):
        for fn, sink in ((first, a), (second, b)):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sink.append((time.perf_counter() - t0) / calls)
    return statistics.median(a), statistics.median(b)


def ffn_limit(hidden: int, width: int, sparsity: BankSparsity) -> float:
    """bytes(dense FFN) / bytes(kept channels + predictor): the batch-1 speedup memory allows."""
    dense = 3 * hidden * width
    predictor = hidden * sparsity.rank + sparsity.rank * width + width
    return dense / (dense * sparsity.keep / sparsity.bank + predictor)


def _random_ffn(hidden: int, width: int, sparsity: BankSparsity, seed: int = 0) -> BankSparseFFN:
    torch.manual_seed(seed)
    ffn = BankSparseFFN(hidden, width, sparsity).eval()
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=hidden ** -0.5)
    return ffn


@torch.no_grad()
def ffn_microbench(shapes: dict[str, tuple[int, int]], batches=(1, 4, 16), sparsity: BankSparsity | None = None,
                   repeats: int = 7, target_seconds: float = 0.05, progress: bool = True) -> dict:
    """Per shape and batch: dense and sparse ms per call and the speedup; per shape the byte limit."""
    sparsity = sparsity or BankSparsity()
    rows = {}
    jobs = [(name, shape, batch) for name, shape in shapes.items() for batch in batches]
    for name, (hidden, width), batch in tqdm(jobs, desc="FFN layer", disable=not progress):
        ffn = _random_ffn(hidden, width, sparsity)
        x = torch.randn(1, batch, hidden)

        def dense():
            return ffn.down_proj(F.silu(ffn.gate_proj(x)) * ffn.up_proj(x))

        def sparse():
            return ffn(x)

        dense(), sparse()  # warm: the packed copy is built, the batch strategy measured
        t0 = time.perf_counter()
        dense()
        calls = max(1, int(target_seconds / max(time.perf_counter() - t0, 1e-6)))
        dense_s, sparse_s = _median_pair(dense, sparse, repeats, calls)
        rows[f"{name}_b{batch}"] = {"shape": [hidden, width], "batch": batch, "dense_ms": dense_s * 1e3,
                                    "sparse_ms": sparse_s * 1e3, "speedup": dense_s / sparse_s,
                                    "limit": ffn_limit(hidden, width, sparsity) if batch == 1 else None}
        del ffn
    return rows


def _ffn_modules(model) -> list[torch.nn.Module]:
    """Every layer's FFN module (dense or bank-sparse), through upcycle.arch."""
    adapter = adapter_for(model)
    return [adapter.ffn(i) for i in range(adapter.num_layers)]


def weight_bytes(model) -> dict[str, float]:
    """Bytes of weights read to decode one token, by part: the kept share of each bank-sparse FFN,
    its predictor, every dense FFN, attention + norms, the LM head (an embedding lookup reads one row)."""
    parts = {"ffn": 0.0, "predictor": 0.0, "attention_and_norms": 0.0, "lm_head": 0.0}
    head = model.get_output_embeddings().weight
    parts["lm_head"] = head.numel() * head.element_size()
    counted = {id(head), id(model.get_input_embeddings().weight)}
    for ffn in _ffn_modules(model):
        sparse = isinstance(ffn, BankSparseFFN)
        predictor = {id(p) for p in ffn.predictor.parameters()} if sparse else set()
        for p in ffn.parameters():
            size = p.numel() * p.element_size()
            if id(p) in predictor:
                parts["predictor"] += size
            else:
                parts["ffn"] += size * ffn.keep / ffn.bank if sparse else size
            counted.add(id(p))
    parts["attention_and_norms"] = float(sum(p.numel() * p.element_size() for p in model.parameters()
                                             if id(p) not in counted))
    parts["total"] = sum(parts.values())
    return parts


class _NoFFN(torch.nn.Module):
    """An FFN that costs nothing: its layer's residual stream passes through unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def without_ffns(model):
    """A copy of `model` whose FFNs are skipped: decoding it takes what everything but the FFNs takes
    (attention, norms, the LM head, generate's own work), so dense ÷ this is the most that any FFN
    speed-up can give end to end, measured rather than estimated."""
    skipped = copy.deepcopy(model)
    adapter = adapter_for(skipped)
    for i in range(adapter.num_layers):
        adapter.set_ffn(i, _NoFFN())
    return skipped


def compile_kwargs() -> dict:
    """generate() arguments that compile the decoding step with inductor (C++ wrapper: the graph's
    launches without Python), a static KV cache so one graph serves every step; the bank-sparse
    kernel sits in the graph as one operator (upcycle::bank_sparse_ffn). Hugging Face compiles only on
    accelerators unless told otherwise."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, mode=None, options={"cpp_wrapper": True})
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


@torch.no_grad()
def _greedy_tokens_per_second(model, ids: torch.Tensor, new_tokens: int, **generate_kwargs) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=model.config.eos_token_id, **generate_kwargs)
    return new_tokens / (time.perf_counter() - t0), out[0, ids.shape[1]:]


@torch.no_grad()
def ffn_time_per_token(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """Where a decoding step's time goes: ms per token inside the FFN modules and outside
    them, from timing hooks (a separate run: the hooks themselves cost a little)."""
    spent = [0.0]

    def start(module, args):
        module._bench_t0 = time.perf_counter()

    def stop(module, args, output):
        spent[0] += time.perf_counter() - module._bench_t0

    ffns = _ffn_modules(model)
    handles = [h for m in ffns for h in (m.register_forward_pre_hook(start), m.register_forward_hook(stop))]
    try:
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=model.config.eos_token_id)
        spent[0] = 0.0  # the prompt's forward is not a decoding step: measure decoding only
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=model.config.eos_token_id)
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return {"ffn_ms": spent[0] / new_tokens * 1e3, "other_ms": (total - spent[0]) / new_tokens * 1e3}


def decode_bench(dense, sparse, tokenizer, prompt: str = "The king said to the queen:", new_tokens: int = 128,
                 repeats: int = 5, compiled: bool = False, progress: bool = True) -> dict:
    """Greedy decoding tokens/s of both models on the same prompt, length and threads (alternating);
    `compiled`: both run under torch.compile (see compile_kwargs), else eagerly as Hugging Face does."""
    dense.eval(), sparse.eval()
    no_ffn = without_ffns(dense).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    kwargs = compile_kwargs() if compiled else {}
    for model in (dense, sparse, no_ffn):  # warm: kernel plans built (eagerly), then graphs compiled
        _greedy_tokens_per_second(model, ids, 8)
        if compiled:
            _greedy_tokens_per_second(model, ids, new_tokens, **kwargs)
    dense_tps, sparse_tps, no_ffn_tps = [], [], []
    for _ in tqdm(range(repeats), desc="greedy decoding" + (" (compiled)" if compiled else ""), disable=not progress):
        tps, dense_out = _greedy_tokens_per_second(dense, ids, new_tokens, **kwargs)
        dense_tps.append(tps)
        tps, sparse_out = _greedy_tokens_per_second(sparse, ids, new_tokens, **kwargs)
        sparse_tps.append(tps)
        no_ffn_tps.append(_greedy_tokens_per_second(no_ffn, ids, new_tokens, **kwargs)[0])
    # where the time goes needs hooks, which compiled graphs do not run: measured eagerly only
    split = None if compiled else {"dense": ffn_time_per_token(dense, ids, new_tokens),
                                   "sparse": ffn_time_per_token(sparse, ids, new_tokens)}
    d, s, ceiling = statistics.median(dense_tps), statistics.median(sparse_tps), statistics.median(no_ffn_tps)
    bytes_dense, bytes_sparse = weight_bytes(dense), weight_bytes(sparse)
    limit = bytes_dense["total"] / bytes_sparse["total"]
    return {"prompt": prompt, "new_tokens": new_tokens, "threads": torch.get_num_threads(), "repeats": repeats,
            "compiled": compiled, "dense_tokens_per_s": d, "sparse_tokens_per_s": s, "speedup": s / d,
            "bytes_per_token": {"dense": bytes_dense, "sparse": bytes_sparse}, "limit": limit,
            "fraction_of_limit": (s / d - 1) / (limit - 1) if limit > 1 else None,
            "no_ffn_tokens_per_s": ceiling, "ceiling": ceiling / d,
            "time_per_token_ms": split,
            "ffn_speedup_in_model": split["dense"]["ffn_ms"] / split["sparse"]["ffn_ms"] if split else None,
            "sample": {"dense": tokenizer.decode(dense_out[:24]), "sparse": tokenizer.decode(sparse_out[:24])}}


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
            lines.append(f"| {key.rsplit('_b', 1)[0]} {r['shape'][0]}×{r['shape'][1]} | {r['batch']} | "
                         f"{r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}× | {limit} |")
        if self.decode:
            d = self.decode
            mb = {k: v["total"] / 1e6 for k, v in d["bytes_per_token"].items()}
            lines += ["", f"Greedy decoding, {d['new_tokens']} tokens, {d['threads']} threads: dense "
                      f"{d['dense_tokens_per_s']:.1f} tok/s, sparse {d['sparse_tokens_per_s']:.1f} tok/s — "
                      f"{d['speedup']:.2f}× (weights read per token {mb['dense']:.0f} MB vs {mb['sparse']:.0f} MB: "
                      f"limit {d['limit']:.2f}×; with no FFN at all {d['ceiling']:.2f}×)"
                      + (" — compiled" if d.get("compiled") else "")]
            if d.get("time_per_token_ms"):
                split = d["time_per_token_ms"]
                lines += [f"Time per token inside the FFNs: dense {split['dense']['ffn_ms']:.1f} ms, "
                          f"sparse {split['sparse']['ffn_ms']:.1f} ms ({d['ffn_speedup_in_model']:.2f}×); "
                          f"outside them: {split['dense']['other_ms']:.1f} vs {split['sparse']['other_ms']:.1f} ms"]
        return "\n".join(lines)


def sparse_and_dense(model, tokenizer, sparsity: BankSparsity, warmup_steps: int = 100):
    """Both sides of a decode comparison from either kind of model: a bank-sparse model and its
    densified twin, or a dense model and a sparsified copy (the predictor's quality does not change
    the speed; a short warm-up gives it a realistic selection pattern)."""
    from upcycle.ops import densify, sparsify

    if any(isinstance(m, BankSparseFFN) for m in model.modules()):
        return densify(model), model
    sparse, _ = sparsify(model, tokenizer, bank=sparsity.bank, keep=sparsity.keep, rank=sparsity.rank,
                         warmup_steps=warmup_steps, calibration_tokens=8192)
    return model, sparse


def run(model_source: str, out: str | Path | None = None, *, sparsity: BankSparsity | None = None,
        batches=(1, 4, 16), shapes=("model", "qwen7b"), new_tokens: int = 128, repeats: int = 5, decode: bool = True,
        compiled: bool = False, progress: bool = True) -> BenchReport:
    """`upcycle bench MODEL`: the FFN microbenchmark at the model's own dims and Qwen2.5-7B's, and
    greedy decoding dense vs sparse; writes bench.json and bench.md to `out` if given."""
    from upcycle.hub import load

    model, tokenizer = load(model_source)
    found = next((m for m in model.modules() if isinstance(m, BankSparseFFN)), None)
    sparsity = sparsity or (found.sparsity if found is not None else BankSparsity())
    hidden = model.config.hidden_size
    width = found.gate_proj.weight.shape[0] if found is not None else adapter_for(model).ffn_weights(0).width
    known = {"model": (hidden, width), "qwen7b": QWEN7B_FFN}
    for name in shapes:
        if name not in known:
            raise ConfigError(f"shape {name!r}: expected model or qwen7b")
    shapes = {name: known[name] for name in shapes}
    report = BenchReport(model=str(model_source), kernel="compiled" if kernels.available() else str(kernels.why_unavailable()))
    report.ffn = ffn_microbench(shapes, batches, sparsity, repeats=repeats, progress=progress)
    if decode:
        if tokenizer is None:
            raise ConfigError(f"{model_source}: no tokenizer, so no decoding benchmark (pass --no-decode)")
        dense, sparse = sparse_and_dense(model, tokenizer, sparsity)
        report.decode = decode_bench(dense, sparse, tokenizer, new_tokens=new_tokens, repeats=repeats, compiled=compiled,
                                     progress=progress)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(report.to_json() + "\n")
        (out / "bench.md").write_text(f"# upcycle bench {model_source}\n\n{report.table()}\n")
    return report
