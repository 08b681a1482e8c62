"""llama.cpp's greedy decoding of one GGUF per format (run inside the llama.cpp environment; no upcycle).

    python llamacpp_decode.py SOURCE.gguf FOLDER OUT.json --formats f32,f16,q8_0 --prompt-ids 1,2,3 \
        --new-tokens 96 --threads 2 [--quantize-only] [--ppl-blocks BLOCKS.json]

Each format is made once from SOURCE (upcycle's f32 export of the model: `upcycle export`) with llama.cpp's
own quantize API, next to it as SOURCE-STEM-FORMAT.gguf, then loaded and timed: the
prompt's tokens evaluated and `new_tokens` greedy tokens generated (end-of-sequence not honoured, so
every run makes the same count), wall time from the first evaluation to the last token. Writes, per
format: tokens/s, the file's bytes, the generated ids; with --ppl-blocks ({corpus: [[token ids], ...]}, the
blocks upcycle scores), each corpus's perplexity from llama.cpp's own logits, computed as upcycle's
`perplexity` does: every block on its own, token t predicted from the tokens before it in the block, the
negative log-likelihood summed in float64 over every predicted token, exponentiated per corpus.

--no-extra-buffers loads the weights without llama.cpp's extra CPU buffer types (its weight repacking and
AMX paths; model parameter use_extra_bufts, which llama-cpp-python does not expose): on this machine
(AVX-512 + AMX) a Q8_0 or Q4_1 model segfaults in llama_decode with them and decodes without.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import time
from pathlib import Path

import llama_cpp
import numpy as np

FTYPES = {
    "f32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
}


def quantized(source: Path, folder: Path, fmt: str, threads: int) -> Path:
    out = folder / f"{source.stem}-{fmt}.gguf"
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = FTYPES[fmt], True, threads
        tmp = out.with_suffix(".part")
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0:
            raise SystemExit(f"llama_model_quantize to {fmt} failed ({code})")
        tmp.rename(out)
    return out


def without_extra_buffers() -> None:
    """Every model loaded from here on with use_extra_bufts = false (see the module docstring)."""
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = params
    llama_cpp.llama.llama_cpp.llama_model_default_params = params  # the name Llama() looks it up by


def decode(path: Path, prompt: list[int], new_tokens: int, threads: int) -> tuple[float, list[int]]:
    llm = llama_cpp.Llama(
        str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    llm.eval(prompt[:1])  # warm: the first evaluation's allocations
    llm.reset()
    out = []
    t0 = time.perf_counter()
    tokens = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
    for token in tokens:
        out.append(token)
        if len(out) == new_tokens:
            break
    seconds = time.perf_counter() - t0
    tokens.close()  # finish the generator before the model goes (a live one crashed the next model's decode)
    del tokens, llm
    gc.collect()
    return new_tokens / seconds, out


def perplexity(path: Path, blocks: dict[str, list[list[int]]], threads: int) -> dict[str, float]:
    n = max(len(ids) for corpus in blocks.values() for ids in corpus)
    llm = llama_cpp.Llama(
        str(path), n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, n_threads=threads, n_threads_batch=threads,
        verbose=False,
    )  # fmt: skip
    out = {}
    for corpus, rows in blocks.items():
        nll, count = 0.0, 0
        for ids in rows:
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            nll -= float(log_probs[np.arange(len(ids) - 1), ids[1:]].sum())
            count += len(ids) - 1
        out[corpus] = math.exp(nll / count)
    del llm
    gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("folder")
    parser.add_argument("out")
    parser.add_argument("--formats", default="f32,f16,q8_0")
    parser.add_argument("--prompt-ids", required=True)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize-only", action="store_true")
    parser.add_argument("--no-extra-buffers", action="store_true")
    parser.add_argument("--ppl-blocks", help="a JSON of held-out blocks per corpus: each format's perplexity on them")
    args = parser.parse_args()
    if args.no_extra_buffers:
        without_extra_buffers()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    prompt = [int(t) for t in args.prompt_ids.split(",")]
    llama_cpp.llama_backend_init()  # quantizing before any model is loaded needs the backend up
    result = {"llama_cpp_python": llama_cpp.__version__, "formats": {}}
    for fmt in args.formats.split(","):
        path = quantized(Path(args.source), folder, fmt, args.threads)
        row = {"file_bytes": path.stat().st_size, "extra_buffers": not args.no_extra_buffers}
        if not args.quantize_only:
            row["tok_s"], row["tokens"] = decode(path, prompt, args.new_tokens, args.threads)
        if args.ppl_blocks:
            row["ppl"] = perplexity(path, json.loads(Path(args.ppl_blocks).read_text()), args.threads)
        result["formats"][fmt] = row
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
