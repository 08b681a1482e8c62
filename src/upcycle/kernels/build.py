"""Compile the C++ kernels of this package once per machine, into the cache, and load them.

The sources ship inside the package; each shared library is built on first use with the system's C++
compiler (-march=native: these kernels are for the CPU they run on; about 2 s) and kept under
~/.cache/upcycle/kernels/<hash of sources, flags, compiler and torch version>. Two libraries:

- the kernel itself behind a plain C ABI (`load()`, called through ctypes by the eager path). No
  compiler, or a failed build, means no extension: callers then use the pure-PyTorch reference, and
  `why_unavailable()` says why;
- the same kernel registered as the operator upcycle::bank_sparse_ffn against torch's stable C ABI
  (`load_operator()`), which torch.compile calls without Python in between. Where it cannot be built
  (torch's headers missing), upcycle.kernels registers a Python operator of the same name instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # loaded first, so the extension binds to the OpenMP runtime torch already uses

from upcycle.cache import cache_dir

SOURCE = Path(__file__).with_name("bank_sparse_ffn.cpp")
Q4_SOURCE = Path(__file__).with_name("q4_rows.h")  # #included by SOURCE
Q8_SOURCE = Path(__file__).with_name("q8_rows.h")  # #included by SOURCE
DECODE_SOURCE = Path(__file__).with_name("decode_step.h")  # #included by SOURCE
OPERATOR_SOURCE = Path(__file__).with_name("torch_operator.cpp")  # #includes SOURCE
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
ABI_VERSION = 11

_library: ctypes.CDLL | None = None
_failure: str | None = None
_operator_failure: str | None = None
_operator_loaded = False


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _library_path(cxx: str, name: str, sources: list[Path], flags: list[str]) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"".join(s.read_bytes() for s in sources)
        + " ".join(flags).encode()
        + version.encode()
        + platform.machine().encode()
        + torch.__version__.encode()
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / key / name


def _built(cxx: str, name: str, sources: list[Path], extra_flags: list[str]) -> Path:
    """The library built from sources[0] (which #includes the rest), compiled if the cache lacks it."""
    target = _library_path(cxx, name, sources, FLAGS + extra_flags)
    if not target.exists():
        _compile(cxx, sources[0], extra_flags, target)
    return target


def _compile(cxx: str, source: Path, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        run = subprocess.run([cxx, *FLAGS, str(source), "-o", str(built), *flags], capture_output=True, text=True)
        if run.returncode != 0:
            errors = [line for line in run.stderr.splitlines() if "error" in line] or [f"exit {run.returncode}"]
            raise RuntimeError(f"{cxx} failed: {errors[0].strip()}")
        os.replace(built, target)  # atomic: a concurrent build or an interrupted one leaves no half file


class FFNWeights(ctypes.Structure):
    """Mirror of `struct FFNWeights` in bank_sparse_ffn.cpp."""

    _fields_ = [
        ("pred_down", ctypes.c_void_p),
        ("pred_up", ctypes.c_void_p),
        ("pred_bias", ctypes.c_void_p),
        ("rank", ctypes.c_int64),
        ("w_gate", ctypes.c_void_p),
        ("w_up", ctypes.c_void_p),
        ("w_down_t", ctypes.c_void_p),
        ("stride", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("width", ctypes.c_int64),
        ("shadow_codes", ctypes.c_void_p),
        ("shadow_scales", ctypes.c_void_p),
        ("shadow_group", ctypes.c_int64),
        ("shadow_bits", ctypes.c_int64),
        ("weight_type", ctypes.c_int64),
        ("row_scales", ctypes.c_void_p),
    ]


class DecodeRows(ctypes.Structure):
    """Mirror of `struct DecodeRows` in decode_step.h."""

    _fields_ = [
        ("w", ctypes.c_void_p),
        ("type", ctypes.c_int64),
        ("scales", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
    ]


class DecodeLayer(ctypes.Structure):
    """Mirror of `struct DecodeLayer` in decode_step.h."""

    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("qkv", DecodeRows),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("o", DecodeRows),
        ("gate_up", DecodeRows),
        ("down", DecodeRows),
        ("sparse", ctypes.c_void_p),
        ("bank", ctypes.c_int64),
        ("keep", ctypes.c_int64),
        ("gate", ctypes.c_int64),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
    ]


class DecodePlan(ctypes.Structure):
    """Mirror of `struct DecodePlan` in decode_step.h."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "max_len")),
        ("vocab", ctypes.c_int64),
        ("ffn_width", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("scaling", ctypes.c_float),
        ("bf16_activations", ctypes.c_int64),
        ("cache_bf16", ctypes.c_int64),
        ("embed_bf16", ctypes.c_int64),
        ("embed", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("head", DecodeRows),
        ("layer", ctypes.POINTER(DecodeLayer)),
        ("scratch", ctypes.c_void_p),
    ]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    if lib.upcycle_kernels_abi_version() != ABI_VERSION:
        raise RuntimeError("stale kernel library (ABI version differs)")
    f = lib.upcycle_bank_sparse_ffn_f32
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    f.argtypes = [ctypes.POINTER(FFNWeights), p, i64, p, i64, i64, ctypes.c_int, p]
    f.restype = ctypes.c_int
    g = lib.upcycle_row_dots
    g.argtypes = [p, i64, p, p, i64, i64, i64, p]
    g.restype = ctypes.c_int
    lib.upcycle_decode_scratch.argtypes = [ctypes.POINTER(DecodePlan)]
    lib.upcycle_decode_scratch.restype = i64
    lib.upcycle_decode_step.argtypes = [ctypes.POINTER(DecodePlan), i64, i64]
    lib.upcycle_decode_step.restype = i64
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first use; None where they cannot be had."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    cxx = compiler()
    if cxx is None:
        _failure = "no C++ compiler found (set CXX, or install g++)"
        return None
    library = lambda: _built(cxx, "libupcycle_kernels.so", [SOURCE, Q4_SOURCE, Q8_SOURCE, DECODE_SOURCE], [])  # noqa: E731
    _library, _failure = _attempt("kernel", lambda: _bind(ctypes.CDLL(str(library()))))
    return _library


def _attempt(what: str, build):
    """(build(), None), or (None, why) when compiling or loading failed."""
    try:
        return build(), None
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, f"{what} build failed: {exc}"


def why_unavailable() -> str | None:
    load()
    return _failure


def _torch_flags() -> list[str]:
    """Headers of torch's stable C ABI, and the libraries that implement it (this torch's own)."""
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    if not (include / "torch" / "csrc" / "stable" / "library.h").exists():
        raise RuntimeError(f"torch {torch.__version__} ships no stable-ABI headers under {include}")
    return [f"-I{include}", f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]


def load_operator() -> bool:
    """Register the C++ operator upcycle::bank_sparse_ffn (building it on first use); False where it
    cannot be had, with the reason in `why_no_operator()`."""
    global _operator_loaded, _operator_failure
    if _operator_loaded or _operator_failure is not None:
        return _operator_loaded
    if load() is None:  # no compiler, or the kernel itself does not build: the same reason
        _operator_failure = why_unavailable()
        return False
    sources = [OPERATOR_SOURCE, SOURCE, Q4_SOURCE, Q8_SOURCE, DECODE_SOURCE]
    library = lambda: _built(compiler(), "libupcycle_torch_ops.so", sources, _torch_flags())  # noqa: E731
    loaded, _operator_failure = _attempt("operator", lambda: torch.ops.load_library(str(library())) or True)
    _operator_loaded = bool(loaded)
    return _operator_loaded


def why_no_operator() -> str | None:
    load_operator()
    return _operator_failure
