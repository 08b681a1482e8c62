"""A model on disk → one GGUF file for llama.cpp and Ollama, streamed one decoder layer at a time.

    path, report = export("out/slim", "slim.gguf", ExportConfig(type="q8_0"))

Every tensor's place in the file is laid out first from the model's shapes alone (its meta tensors), then
each layer is read, converted, written and released, so memory holds one layer, never the model. A
bank-sparse model is written as its dense twin (every channel computed; llama.cpp has no predictor).

What is checked, always: every tensor read back from the written file by the gguf package's reader is the
bytes meant for it, and what those bytes decode to is measured against the source tensor (f32: equal).
Where llama.cpp is installed (llama-cpp-python), it loads the file and its logits on held-out text are
compared with the source model's, computed in the same pass.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from upcycle import data
from upcycle.arch.gguf import (
    check_exportable,
    gguf_arch,
    keeps_f32,
    layer_tensors,
    outer_tensors,
    write_metadata,
    write_tokenizer,
)
from upcycle.checkpoint import LazyModel
from upcycle.config import Config, RunOptions, option
from upcycle.errors import ConfigError
from upcycle.eval.equivalence import EquivalenceMeter
from upcycle.modules import UpcycleSparseForCausalLM
from upcycle.ops.densify import is_dense_tensor
from upcycle.pipelines.streaming import LayerPass, open_source

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
# 4-bit types are llama.cpp's own quantizer's (its k-quants choose a type per tensor): written here in f32,
# then quantized by llama.cpp where llama-cpp-python is installed
LLAMA_QUANTIZED = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


@dataclass
class ExportConfig(Config):
    type: str = option("f16", "the weights' type in the file: f32, f16, q8_0 (norms and routers stay f32), or "
                       "q4_0 / q4_k_m (by llama.cpp's own quantizer, where llama-cpp-python is installed)",
                       choices=TYPES)  # fmt: skip
    check_tokens: int = option(64, "held-out tokens llama.cpp's logits are compared on, where it is installed")

    def validate(self) -> None:
        if self.type not in TYPES:
            raise ConfigError(f"type={self.type!r} is not allowed: choose from {', '.join(TYPES)}")
        if self.check_tokens < 2:
            raise ConfigError(f"check_tokens={self.check_tokens} is not allowed: at least 2")


@dataclass
class ExportReport:
    path: str
    arch: str
    type: str
    tensors: int
    bytes: int
    seconds: float
    densified: bool  # a bank-sparse model written as its dense twin
    quantized_by: str  # "upcycle", or "llama.cpp" (4-bit types: written in f32, then quantized by llama.cpp)
    file_matches: bool  # every tensor read back is the bytes written for it
    max_abs_error: dict[str, float] = field(default_factory=dict)  # per tensor kind: decoded vs source
    llamacpp: dict | None = None  # {"max_abs_dlogit", "top1", "tokens"} or {"skipped": why}

    def line(self) -> str:
        worst = max(self.max_abs_error.values(), default=0.0)
        check = self.llamacpp or {}
        if "max_abs_dlogit" in check:
            llama = (f"llama.cpp's logits vs the source's on {check['tokens']} held-out tokens: max |Δ| "
                     f"{check['max_abs_dlogit']:.3g}, top-1 agreement {check['top1']:.3f}")  # fmt: skip
        else:
            llama = f"llama.cpp not run ({check.get('skipped', 'no check')})"
        written = (
            f"read back {'byte for byte' if self.file_matches else 'DIFFERENT from what was written'}, largest "
            f"decoded |error| {worst:.3g}"
        )
        if self.quantized_by == "llama.cpp":
            written = f"written in f32 and {written}, then quantized to {self.type} by llama.cpp's own quantizer"
        return f"{self.tensors} tensors, {self.bytes / 1e6:,.1f} MB ({self.arch}, {self.type}); {written}; {llama}"

    def as_dict(self) -> dict:
        return asdict(self)


def export(
    source, out, config: ExportConfig | None = None, options: RunOptions = RunOptions()
) -> tuple[Path, ExportReport]:
    import gguf

    cfg = config or ExportConfig()
    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"OUT={out} is not allowed: a GGUF file name ending in .gguf")
    if out.exists() and not options.overwrite:
        raise ConfigError(f"{out} exists: pass --overwrite to replace it")
    quantizer = _llama_quantizer(cfg.type)  # before anything is read: a 4-bit type without llama.cpp is one line
    written_type = "f32" if quantizer is not None else cfg.type
    started = time.perf_counter()
    lazy, tokenizer = open_source(source, options)
    if tokenizer is None:
        raise ConfigError(f"{source} ships no tokenizer: a GGUF file carries one")
    sparse = isinstance(lazy.model, UpcycleSparseForCausalLM)
    config = lazy.config.base_config() if sparse else lazy.config
    check_exportable(config)
    arch = gguf_arch(config)

    plan = _plan(lazy, config, sparse)  # (name, shape, dtype, nbytes, type) of every tensor, from shapes
    tmp = out.with_name(f".{out.name}.partial")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:  # written beside OUT and renamed when whole: an interrupted export leaves nothing behind
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            write_metadata(writer, config, name=Path(str(source)).name)
            write_tokenizer(writer, tokenizer, config)
            writer.add_file_type(FILE_TYPES[written_type])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for name, tensor in plan:
                shape, dtype, nbytes, qtype = _layout(name, tensor, written_type)
                writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            text_cfg = replace(cfg, type=written_type)
            written, errors, logits, text = _write_data(writer, lazy, config, sparse, text_cfg, tokenizer, options)
        finally:
            writer.close()
        matches = _reads_back(tmp, written)
        if quantizer is not None:
            quantizer(tmp, tmp.with_suffix(".quantized"))
            os.replace(tmp.with_suffix(".quantized"), tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".quantized").unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    report = ExportReport(
        path=str(out), arch=arch, type=cfg.type, tensors=len(plan), bytes=out.stat().st_size,
        seconds=time.perf_counter() - started, densified=sparse, file_matches=matches, max_abs_error=errors,
        quantized_by="llama.cpp" if quantizer is not None else "upcycle",
    )  # fmt: skip
    report.llamacpp = llamacpp_check(out, text, logits)
    report.seconds = time.perf_counter() - started
    return out, report


def _llama_quantizer(kind: str):
    """For a type llama.cpp's own quantizer makes: a function (f32 file, out file) running it; else None."""
    if kind not in LLAMA_QUANTIZED:
        return None
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(
            f"--type {kind} is made by llama.cpp's own quantizer, and llama-cpp-python is not installed here "
            "(pip install llama-cpp-python; or export f16 and run llama-quantize)"
        ) from None

    def quantize(source: Path, out: Path) -> None:
        import ctypes

        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, LLAMA_QUANTIZED[kind])
        params.nthread = max(1, os.cpu_count() or 1)
        if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise ConfigError(f"llama.cpp's quantizer failed to make {kind} from {source}")

    return quantize


def _dense_state(module: torch.nn.Module, sparse: bool) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    return {k: v for k, v in state.items() if is_dense_tensor(k)} if sparse else state


def _outer_state(lazy: LazyModel, sparse: bool) -> dict[str, torch.Tensor]:
    state = lazy.model.state_dict()
    names = [n for n in lazy.outer_names() if not (lazy.tied and n == "lm_head.weight")]
    return {n: state[n] for n in names if not sparse or is_dense_tensor(n)}


def _split_outer(tensors: list[tuple[str, torch.Tensor]]):
    """(the embeddings, written first; the final norm and head, written last) — llama.cpp's order."""
    return [t for t in tensors if t[0] == "token_embd.weight"], [t for t in tensors if t[0] != "token_embd.weight"]


def _plan(lazy: LazyModel, config, sparse: bool) -> list[tuple[str, torch.Tensor]]:
    """Every tensor the file holds, in its order, as meta tensors (shapes only: nothing is read)."""
    first, last = _split_outer(outer_tensors(_outer_state(lazy, sparse), config))
    layers = [
        t for i in range(lazy.num_layers) for t in layer_tensors(i, _dense_state(lazy.adapter.layer(i), sparse), config)
    ]
    return first + layers + last


def _type_of(name: str, tensor: torch.Tensor, kind: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    if kind == "f32" or keeps_f32(name, tensor):
        return Q.F32
    if kind == "q8_0" and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16  # q8_0 needs rows in blocks of 32; a row that is not is written in f16


def _layout(name: str, tensor: torch.Tensor, kind: str):
    """(shape, numpy dtype, bytes, ggml type) of a tensor as the file holds it."""
    import gguf

    qtype = _type_of(name, tensor, kind)
    shape = tuple(tensor.shape)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        return shape, np.uint8, math.prod(shape), qtype
    dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
    return shape, dtype, math.prod(shape) * np.dtype(dtype).itemsize, None


def _encode(name: str, tensor: torch.Tensor, kind: str) -> tuple[np.ndarray, float]:
    """The tensor's bytes in the file's type, and the largest |error| of what they decode to."""
    import gguf

    qtype = _type_of(name, tensor, kind)
    source = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        encoded = gguf.quants.quantize(source, qtype)
        decoded = gguf.quants.dequantize(encoded, qtype).reshape(source.shape)
    else:
        encoded = source if qtype == gguf.GGMLQuantizationType.F32 else source.astype(np.float16)
        decoded = encoded.astype(np.float32)
    return encoded, float(np.abs(decoded - source).max()) if source.size else 0.0


def _write_data(writer, lazy: LazyModel, config, sparse: bool, cfg: ExportConfig, tokenizer, options: RunOptions):
    """Write every tensor in the plan's order, one layer resident at a time, carrying the held-out text
    through the same layers for the source's logits. Returns ({name: digest}, {kind: max |error|}, the
    source's logits, the text's ids)."""
    text = data.blocks("shakespeare", tokenizer, "validation", cfg.check_tokens, max_blocks=1)
    vocab = config.vocab_size
    text = text.clamp(max=vocab - 1)
    written, errors = {}, {}

    def put(tensors):
        for name, tensor in tensors:
            encoded, error = _encode(name, tensor, cfg.type)
            writer.write_tensor_data(encoded)
            written[name] = hashlib.sha256(encoded.tobytes()).hexdigest()
            kind = name.split(".", 2)[-1] if name.startswith("blk.") else name
            errors[kind] = max(errors.get(kind, 0.0), error)

    with LayerPass(lazy, output={"text": text}, progress=options.progress, desc="export") as p:
        lazy.ensure_outer()
        first, _ = _split_outer(outer_tensors(_outer_state(lazy, sparse), config))
        put(first)
        for i in p.layers():
            put(layer_tensors(i, _dense_state(lazy.adapter.layer(i), sparse), config))
        logits = torch.cat(list(p.logits(p.output["text"])))
        lazy.ensure_outer()
        _, last = _split_outer(outer_tensors(_outer_state(lazy, sparse), config))
        put(last)
    return written, errors, logits, text


def _reads_back(path: Path, written: dict[str, str]) -> bool:
    """Whether the file, read by the gguf package's own reader, holds every tensor with the bytes written."""
    import gguf

    reader = gguf.GGUFReader(path)
    found = {t.name: hashlib.sha256(np.asarray(t.data).tobytes()).hexdigest() for t in reader.tensors}
    return found == written


def llamacpp_check(path: Path, text: torch.Tensor, logits: torch.Tensor) -> dict:
    """llama.cpp's logits for `text` against the source's (`logits`): the largest |Δ| and how often the
    top-1 token agrees. Skipped, saying why, where llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed here (pip install llama-cpp-python)"}
    ids = text[0].tolist()
    # the KV cache in f32 (llama.cpp's default is f16): the comparison is of the file, not of the cache
    llm = llama_cpp.Llama(str(path), n_ctx=len(ids), n_batch=len(ids), n_ubatch=len(ids), logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)  # fmt: skip
    llm.eval(ids)
    theirs = torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float32).copy())
    del llm
    ours = logits[0].float()
    meter = EquivalenceMeter()
    meter.add(ours.unsqueeze(0), theirs.unsqueeze(0), text)
    eq = meter.result()
    return {"max_abs_dlogit": eq.max_abs_logit, "top1": eq.top1_agreement, "mean_kl": eq.mean_kl, "tokens": len(ids)}
