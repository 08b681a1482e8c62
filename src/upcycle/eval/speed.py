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
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CompileConfig

from upcycle.arch import adapter_for
from upcycle.hooks import hooked
from upcycle.infer.decode import GreedyDecoder
from upcycle.infer.precision import to_precision
from upcycle.kernels import QUANTIZERS
from upcycle.modules import BankSparseFFN, BankSparsity
from upcycle.modules.bank_sparse import shadow_bytes

QWEN7B_FFN = (3584, 18944)  # hidden, FFN width of Qwen2.5-7B: the large shape


def median_pair(first, second, repeats: int, calls: int) -> tuple[float, float]:
    """Median seconds per call of two functions, measured alternately (drift hits both alike)."""
    a, b = [], []
    for _ in range(repeats):
        for fn, sink in ((first, a), (second, b)):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sink.append((time.perf_counter() - t0) / calls)
    return statistics.median(a), statistics.median(b)


def ffn_bytes(hidden: int, width: int, sparsity: BankSparsity) -> tuple[float, float]:
    """Bytes one token reads of an fp32 FFN layer: (dense, kept channels + predictor)."""
    dense = 3 * hidden * width * 4
    if sparsity.predictor == "shadow":
        predictor = shadow_bytes(width, hidden, sparsity.bits, sparsity.group)
    else:
        predictor = (hidden * sparsity.rank + sparsity.rank * width + width) * 4
    return dense, dense * sparsity.keep / sparsity.bank + predictor


def ffn_limit(hidden: int, width: int, sparsity: BankSparsity) -> float:
    """bytes(dense FFN) / bytes(kept channels + predictor): the batch-1 speedup memory allows."""
    dense, sparse = ffn_bytes(hidden, width, sparsity)
    return dense / sparse


def read_rate(nbytes: int = 400 << 20, repeats: int = 15) -> float:
    """GB/s of a plain sum over a buffer of `nbytes` (fp32), median of `repeats` after one warm pass:
    how fast this machine streams memory, the rate the byte limit assumes both sides read at."""
    buffer = torch.ones(nbytes // 4)
    buffer.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def processor_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows: timings differ by machine."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _random_ffn(hidden: int, width: int, sparsity: BankSparsity, seed: int = 0) -> BankSparseFFN:
    torch.manual_seed(seed)
    ffn = BankSparseFFN(hidden, width, sparsity).eval()
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=hidden**-0.5)
    return ffn


@torch.no_grad()
def ffn_microbench(
    shapes: dict[str, tuple[int, int]],
    batches=(1, 4, 16),
    sparsity: BankSparsity | None = None,
    repeats: int = 7,
    target_seconds: float = 0.05,
    progress: bool = True,
) -> dict:
    """Per shape and batch: dense and sparse ms per call and the speedup; per shape the byte limit."""
    sparsity = sparsity or BankSparsity()
    rows = {}
    jobs = [(name, shape, batch) for name, shape in shapes.items() for batch in batches]
    for name, (hidden, width), batch in tqdm(jobs, desc="FFN layer", disable=not progress):
        ffn = _random_ffn(hidden, width, sparsity)
        x = torch.randn(1, batch, hidden)

        def dense(ffn=ffn):
            return ffn.down_proj(F.silu(ffn.gate_proj(x)) * ffn.up_proj(x))

        def sparse(ffn=ffn):
            return ffn(x)

        dense(), sparse()  # warm: the packed copy is built, the batch strategy measured
        t0 = time.perf_counter()
        dense()
        calls = max(1, int(target_seconds / max(time.perf_counter() - t0, 1e-6)))
        dense_s, sparse_s = median_pair(dense, sparse, repeats, calls)
        row = rows[f"{name}_b{batch}"] = {
            "shape": [hidden, width],
            "batch": batch,
            "dense_ms": dense_s * 1e3,
            "sparse_ms": sparse_s * 1e3,
            "speedup": dense_s / sparse_s,
            "limit": None,
        }
        if batch == 1:  # the byte limit, and what each side streams at (the limit assumes both alike)
            dense_bytes, sparse_bytes = ffn_bytes(hidden, width, sparsity)
            row.update(
                limit=dense_bytes / sparse_bytes,
                dense_gb_per_s=dense_bytes / dense_s / 1e9,
                sparse_gb_per_s=sparse_bytes / sparse_s / 1e9,
            )
        del ffn, dense, sparse  # this shape's FFN freed before the next (a 7B one is half a GB) is built
    return rows


def _ffn_modules(model) -> list[torch.nn.Module]:
    """Every layer's FFN module (dense or bank-sparse), through upcycle.arch."""
    adapter = adapter_for(model)
    return [adapter.ffn(i) for i in range(adapter.num_layers)]


def _stored_bytes(module: torch.nn.Module) -> float:
    """Bytes of weights `module` holds as inference reads them: parameters and weight buffers (an int8
    RowLinear's codes and scales); a bank-sparse FFN marked for int8 holds one byte a weight and one
    fp32 scale per row of its packed kernel copy, for int4 half a byte a weight and an fp16 scale per 32."""
    precision = getattr(module, "kernel_precision", None)
    if precision in QUANTIZERS:
        width, hidden = module.gate_proj.out_features, module.gate_proj.in_features
        if precision in ("int4", "int4a"):  # int4a: a minimum beside each fp16 step
            return 3 * width * hidden / 2 + 3 * width * (hidden // 32) * 2 * (2 if precision == "int4a" else 1)
        return 3 * width * hidden + 3 * width * 4
    own = [t for t in module.parameters()] + [b for n, b in module.named_buffers() if n.endswith(("codes", "scales"))]
    return float(sum(t.numel() * t.element_size() for t in own))


def weight_bytes(model) -> dict[str, float]:
    """Bytes of weights read to decode one token, by part: the kept share of each bank-sparse FFN,
    its predictor, every dense FFN, attention + norms, the LM head (an embedding lookup reads one row),
    each in the precision it is stored in (fp32, bf16, or int8 / int4 codes with their scales)."""
    parts = {"ffn": 0.0, "predictor": 0.0, "attention_and_norms": 0.0, "lm_head": 0.0}
    head = model.get_output_embeddings()
    parts["lm_head"] = _stored_bytes(head)
    counted = {id(t) for t in (*head.parameters(), *head.buffers())}
    counted.add(id(model.get_input_embeddings().weight))
    for ffn in _ffn_modules(model):
        sparse = isinstance(ffn, BankSparseFFN)
        predictor = {id(p) for p in ffn.predictor.parameters()} if sparse else set()
        if sparse:
            parts["predictor"] += ffn.predictor_bytes()
            weights = torch.nn.ModuleList([ffn.gate_proj, ffn.up_proj, ffn.down_proj])
            quantized = getattr(ffn, "kernel_precision", None) in QUANTIZERS
            if ffn.kernel_pack is not None:  # converted for inference: its weights are the kernel's pack
                stored = float(ffn.kernel_pack.nbytes())
            else:
                stored = _stored_bytes(ffn) if quantized else _stored_bytes(weights)
            parts["ffn"] += stored * ffn.keep / ffn.bank
        else:
            parts["ffn"] += _stored_bytes(ffn)
        counted |= {id(t) for t in (*ffn.parameters(), *ffn.buffers())} | predictor
    rest = [t for t in model.parameters() if id(t) not in counted]
    rest += [b for n, b in model.named_buffers() if n.endswith(("codes", "scales")) and id(b) not in counted]
    parts["attention_and_norms"] = float(sum(t.numel() * t.element_size() for t in rest))
    parts["total"] = sum(parts.values())
    return parts


class _NoFFN(torch.nn.Module):
    """An FFN that costs nothing: its layer's residual stream passes through unchanged."""

    ffn_kind = "none"  # what upcycle.arch reports, and the one-call decoding step skips

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
    config = CompileConfig(fullgraph=False, mode=None, options={"cpp_wrapper": True})
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


@torch.no_grad()
def _greedy_tokens_per_second(
    model, ids: torch.Tensor, new_tokens: int, **generate_kwargs
) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
        **generate_kwargs,
    )
    return new_tokens / (time.perf_counter() - t0), out[0, ids.shape[1] :]


@torch.no_grad()
def ffn_time_per_token(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """Where a decoding step's time goes: ms per token inside the FFN modules and outside
    them, from timing hooks (a separate run: the hooks themselves cost a little)."""
    spent, started = [0.0], {}

    def start(key, module, args):
        started[key] = time.perf_counter()

    def stop(key, module, args, output):
        spent[0] += time.perf_counter() - started[key]

    with hooked(dict(enumerate(_ffn_modules(model))), pre=start, post=stop):
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=model.config.eos_token_id)
        spent[0] = 0.0  # the prompt's forward is not a decoding step: measure decoding only
        t0 = time.perf_counter()
        model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )
        total = time.perf_counter() - t0
    return {"ffn_ms": spent[0] / new_tokens * 1e3, "other_ms": (total - spent[0]) / new_tokens * 1e3}


def _lean_run(model, ids: torch.Tensor, new_tokens: int, precision: str, calibration=None):
    """`model`'s copy converted to `precision` (to_precision: the dense layers at one row through the
    kernel's row dots) and a function giving one run's (tokens/s, tokens) through upcycle's lean decoder,
    its step compiled and warmed here."""
    lean = to_precision(copy.deepcopy(model), precision, calibration).eval()
    with torch.no_grad():
        lean(ids[:, :1])  # kernel plans built eagerly, before the step is traced
    decoder = GreedyDecoder(lean, ids.shape[1] + new_tokens + 8)
    decoder.generate(ids, 4), decoder.generate(ids, new_tokens)  # compiled, then warm
    return lean, lambda: decoder.tokens_per_second(ids, new_tokens)


def decode_bench(
    dense,
    sparse,
    tokenizer,
    prompt: str = "The king said to the queen:",
    new_tokens: int = 128,
    repeats: int = 5,
    compiled: bool = False,
    lean: bool = False,
    precision: str = "fp32",
    progress: bool = True,
    calibration: torch.Tensor | None = None,
) -> dict:
    """Greedy decoding tokens/s of both models on the same prompt, length and threads (alternating);
    `compiled`: both run under torch.compile (see compile_kwargs), else eagerly as Hugging Face does;
    `lean`: copies of both converted to `precision` and run through upcycle's lean decoder
    (upcycle.infer.decode: one compiled step, no generate()), int4 GPTQ-rounded on `calibration` where
    given; otherwise the models run as given."""
    dense.eval(), sparse.eval()
    no_ffn = without_ffns(dense).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    compiled = compiled or lean
    kwargs = compile_kwargs() if compiled else {}
    runs = {}
    if lean:  # the copies that run are the models measured (bytes included)
        (dense, runs["dense"]), (sparse, runs["sparse"]), (no_ffn, runs["no_ffn"]) = (
            _lean_run(m, ids, new_tokens, precision, calibration) for m in (dense, sparse, no_ffn)
        )
    else:
        for name, m in (("dense", dense), ("sparse", sparse), ("no_ffn", no_ffn)):
            runs[name] = lambda m=m: _greedy_tokens_per_second(m, ids, new_tokens, **kwargs)
        for model in (dense, sparse, no_ffn):  # warm: kernel plans built (eagerly), then graphs compiled
            _greedy_tokens_per_second(model, ids, 8)
            if compiled:
                _greedy_tokens_per_second(model, ids, new_tokens, **kwargs)
    dense_tps, sparse_tps, no_ffn_tps = [], [], []
    label = "greedy decoding" + (" (lean decoder)" if lean else " (compiled)" if compiled else "")
    for _ in tqdm(range(repeats), desc=label, disable=not progress):
        tps, dense_out = runs["dense"]()
        dense_tps.append(tps)
        tps, sparse_out = runs["sparse"]()
        sparse_tps.append(tps)
        no_ffn_tps.append(runs["no_ffn"]()[0])
    # where the time goes needs hooks, which compiled graphs do not run: measured eagerly only
    split = (
        None
        if compiled
        else {
            "dense": ffn_time_per_token(dense, ids, new_tokens),
            "sparse": ffn_time_per_token(sparse, ids, new_tokens),
        }
    )
    d, s, ceiling = statistics.median(dense_tps), statistics.median(sparse_tps), statistics.median(no_ffn_tps)
    bytes_dense, bytes_sparse = weight_bytes(dense), weight_bytes(sparse)
    limit = bytes_dense["total"] / bytes_sparse["total"]
    return {
        "prompt": prompt,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "compiled": compiled,
        "decoder": "lean" if lean else "generate",
        "dense_tokens_per_s": d,
        "sparse_tokens_per_s": s,
        "speedup": s / d,
        "bytes_per_token": {"dense": bytes_dense, "sparse": bytes_sparse},
        "limit": limit,
        "fraction_of_limit": (s / d - 1) / (limit - 1) if limit > 1 else None,
        "no_ffn_tokens_per_s": ceiling,
        "ceiling": ceiling / d,
        "time_per_token_ms": split,
        "ffn_speedup_in_model": split["dense"]["ffn_ms"] / split["sparse"]["ffn_ms"] if split else None,
        "sample": {"dense": tokenizer.decode(dense_out[:24]), "sparse": tokenizer.decode(sparse_out[:24])},
    }
