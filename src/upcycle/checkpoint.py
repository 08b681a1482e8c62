"""Checkpoints on disk, one part at a time: read a safetensors checkpoint (one file, or shards with their
index) lazily, hold a model whose weights stay on disk until a layer is asked for, and write a model the
same way, layer by layer, as Hugging Face shards.

    lazy = LazyModel(folder, device="cpu", dtype=torch.bfloat16)
    lazy.load_outer()                                  # embeddings, final norm, LM head, rotary tables
    layer = lazy.load_layer(3)                         # materialised on the device, in the dtype
    ...; lazy.release_layer(3)                         # back to shapes only: its memory is freed
    with ShardWriter(out, shard_bytes=2 << 30) as writer: writer.add(lazy.layer_state(3)); ...

A model held this way is the stock Hugging Face module tree on the meta device: every transform that
works on one layer of an in-memory model works on it unchanged, once that layer is loaded. A tensor is read
through a small buffer into its destination, never mapped, so resident memory does not grow with the
layers read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from upcycle import kernels
from upcycle import modules as _registers  # noqa: F401  (the bank-sparse type, known to transformers' Auto classes)
from upcycle.arch import adapter_for, family_of
from upcycle.errors import ConfigError, NotACausalLM

INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_STORED_DTYPES = {
    **SAFETENSORS_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
SAFETENSORS_NAMES = {v: k for k, v in _STORED_DTYPES.items()}


def meta_model(config, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM `config` describes, built on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


class Checkpoint:
    """The tensors of a safetensors checkpoint folder by name, read on request (never all at once)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._headers: dict[Path, tuple[dict, int]] = {}
        index = self.folder / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                self.files.update(dict.fromkeys(self._header(path)[0], path))
        if not self.files:
            raise NotACausalLM(f"{self.folder} holds no safetensors weights")

    @property
    def names(self) -> list[str]:
        return list(self.files)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point weights (its first matrix's)."""
        name = next((n for n in self.files if n.endswith(".weight")), next(iter(self.files)))
        return SAFETENSORS_DTYPES.get(self._header(self.files[name])[0][name]["dtype"], torch.float32)

    @property
    def nbytes(self) -> int:
        return sum(path.stat().st_size for path in set(self.files.values()))

    def read(
        self, names: list[str], *, device="cpu", dtype: torch.dtype | dict | None = None
    ) -> dict[str, torch.Tensor]:
        """The named tensors, floating-point ones in `dtype` (default: as stored; a dict: per name), on
        `device`. Each tensor is read through a small buffer straight into its destination (see `_read`)."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise NotACausalLM(f"{self.folder}: the checkpoint has no tensor {missing[0]!r}")
        by_file = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        out = {}
        for path, group in by_file.items():
            header, start = self._header(path)
            with _raw(path) as f:
                for name in group:
                    want = dtype.get(name) if isinstance(dtype, dict) else dtype
                    out[name] = _read(f, path, header[name], start, device, want)
        return out

    def with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self.files if n.startswith(prefix)]

    def _header(self, path: Path) -> tuple[dict, int]:
        """A file's header and where its data begins, parsed once (a pass reads every shard layer by layer)."""
        if path not in self._headers:
            self._headers[path] = _header(path)
        return self._headers[path]


# Tensors are read with plain reads through a buffer of this size, never by mapping the file: a mapped
# tensor's pages count in the process's resident memory until the file is unmapped, so reading a layer
# of a large fp32 checkpoint into bf16 held the fp32 layer and its bf16 copy at once (measured at 7.45B:
# loading one layer peaked at 1.4 GB over what the process held, of which 0.5 GB was kept). Read pages go
# to the page cache, which the kernel reclaims, not to the process.
_READ_BUFFER_BYTES = 32 << 20


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header ({name: {dtype, shape, data_offsets}}) and where its data begins."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > path.stat().st_size:
                raise ValueError(f"a header of {length} bytes in a file of {path.stat().st_size}")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise NotACausalLM(f"{path.parent}: the weights cannot be read ({path.name}: {e})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


@contextlib.contextmanager
def _raw(path: Path):
    try:
        with open(path, "rb", buffering=0) as f:
            yield f
    except OSError as e:
        raise NotACausalLM(f"{path.parent}: the weights cannot be read ({path.name}: {e})") from None


def _read(f, path: Path, entry: dict, start: int, device, want: torch.dtype | None) -> torch.Tensor:
    """One tensor from its byte range, converted a buffer at a time into a tensor made on `device` in `want`
    (floating-point tensors; others as stored): what is held besides the result is one buffer."""
    stored = _STORED_DTYPES.get(entry["dtype"])
    if stored is None:
        raise NotACausalLM(f"{path.parent}: a tensor of unsupported dtype {entry['dtype']} in {path.name}")
    cast = want if want is not None and stored.is_floating_point else stored
    begin, end = entry["data_offsets"]
    out = torch.empty(entry["shape"], dtype=cast, device=device)
    flat, size = out.view(-1), stored.itemsize
    if (end - begin) != flat.numel() * size:
        raise NotACausalLM(
            f"{path.parent}: the weights cannot be read ({path.name}: a tensor's bytes do not fit its shape)"
        )
    buffer = torch.empty(min(_READ_BUFFER_BYTES, max(end - begin, 8)), dtype=torch.uint8)
    f.seek(start + begin)
    done = 0
    while done < end - begin:
        n = min(len(buffer), end - begin - done)
        got = f.readinto(memoryview(buffer.numpy())[:n])
        if got != n:
            raise NotACausalLM(f"{path.parent}: the weights cannot be read ({path.name}: the file ends early)")
        flat[done // size : (done + n) // size].copy_(buffer[:n].view(stored))
        done += n
    return out


class LazyModel:
    """A causal LM whose module tree is built on the meta device (shapes only) and whose weights are read
    from its checkpoint part by part: the outer parts (embeddings, final norm, LM head) and one decoder
    layer at a time, each materialised on `device` in `dtype` and released after use."""

    def __init__(
        self, folder: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None, trust_remote_code=False
    ):
        self.folder = Path(folder)
        if not (self.folder / "config.json").exists():
            raise NotACausalLM(f"{self.folder} has no config.json: not a Hugging Face model folder")
        self.checkpoint = Checkpoint(self.folder)
        self.config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        family_of(self.config)
        self.device = torch.device(device)
        self.dtype = dtype or self.checkpoint.dtype
        self.model = meta_model(self.config, self.dtype)
        self.adapter = adapter_for(self.model)
        self.num_layers = self.adapter.num_layers
        self._layers_name: str | None = None

    # ---- reading ------------------------------------------------------------------------------
    def outer_names(self) -> dict[str, str]:
        """{name in this model's state_dict: name in the checkpoint} of the parts outside the layers."""
        names = {n: n for n in self.model.state_dict() if not n.startswith(self.layer_prefix(None))}
        if self.tied and "lm_head.weight" in names and "lm_head.weight" not in self.checkpoint.files:
            del names["lm_head.weight"]  # a tied head is the embedding (the checkpoint holds it once)
        return names

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def load_outer(self) -> None:
        """Materialise the embeddings, the final norm, the LM head and the rotary tables."""
        names = self.outer_names()
        tensors = self.checkpoint.read(list(names.values()), device=self.device, dtype=self.dtype)
        self.model.load_state_dict({k: tensors[v] for k, v in names.items()}, strict=False, assign=True)
        if self.tied:
            self.adapter.lm_head().weight = self.adapter.embedding().weight
        self.adapter.reset_buffers(self.device)

    def release_outer_weights(self) -> None:
        """The embeddings and the LM head back to shapes only, while a pass goes up the layers: the token
        blocks are embedded once at its start and the head is needed only at its top, so the two largest
        tensors outside the layers need not sit beside each layer (at 7.45B they are 0.45 GB in bf16)."""
        self.adapter.embedding().to("meta")
        self.adapter.lm_head().to("meta")

    def ensure_outer(self) -> None:
        """The outer parts materialised again where `release_outer_weights` released them."""
        if self.adapter.embedding().weight.device.type == "meta":
            self.load_outer()

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's weights as its module names them (relative to the layer), on the device, in the dtype."""
        prefix = self.layer_prefix(i)
        # a statistic the module keeps in fp32 whatever the model's dtype (a GPTQ shadow's input moment)
        # is read in fp32: rounded to the run's dtype, it would not be the one written
        fp32 = {prefix + k for k, v in self.adapter.layer(i).state_dict().items() if v.dtype == torch.float32}
        names = self.checkpoint.with_prefix(prefix)
        dtypes = {n: torch.float32 if n in fp32 else self.dtype for n in names}
        stored = self.checkpoint.read(names, device=self.device, dtype=dtypes)
        relative = {k[len(prefix) :]: stored.pop(k) for k in list(stored)}
        return type(self.adapter).layer_from_checkpoint(relative)  # consumes it: experts fused as they are freed

    def load_layer(self, i: int) -> torch.nn.Module:
        layer = self.adapter.layer(i)
        layer.load_state_dict(self.layer_tensors(i), strict=True, assign=True)
        return layer

    def release_layer(self, i: int) -> None:
        """Layer i back to shapes only (its tensors freed, and the packed copies a bank-sparse FFN's kernel
        made of them: kept on the module, they would pile up layer after layer)."""
        kernels.release(self.adapter.layer(i))
        self.adapter.layer(i).to("meta")

    # ---- writing ------------------------------------------------------------------------------
    def layer_state(
        self, i: int, tensors: dict | None = None, *, index: int | None = None, family=None
    ) -> dict[str, torch.Tensor]:
        """Layer i as a checkpoint names it (full names), from the module as it is now (transformed or not),
        or `tensors` (named as the module names them) in its place; `index`: the layer number written;
        `family`: the adapter class of another family whose layer `tensors` is (dense → MoE)."""
        state = tensors if tensors is not None else self.adapter.layer(i).state_dict()
        prefix = self.layer_prefix(i if index is None else index)
        return {prefix + k: v for k, v in (family or type(self.adapter)).layer_to_checkpoint(state).items()}

    def outer_state(self) -> dict[str, torch.Tensor]:
        self.ensure_outer()
        state = self.model.state_dict()
        names = [n for n in self.outer_names() if not (self.tied and n == "lm_head.weight")]
        return {n: state[n] for n in names if state[n].device.type != "meta"}

    def layer_prefix(self, i: int | None) -> str:
        """The state_dict prefix of layer i (`model.layers.3.`; without i, of all layers)."""
        if self._layers_name is None:
            self._layers_name = next((n for n, m in self.model.named_modules() if m is self.adapter.layers), None)
            if self._layers_name is None:
                raise ConfigError("the model's decoder layers were not found")
        return f"{self._layers_name}." + ("" if i is None else f"{i}.")


class _ShardFile:
    """One safetensors file written tensor by tensor: each tensor's bytes go to disk as it comes, after a
    header region reserved up front and filled in at the end (padded with spaces, as the format allows),
    so writing a shard holds one tensor in memory, never the shard."""

    RESERVED = 1 << 20  # header bytes reserved: ~5,000 tensor entries (a larger header is written by a copy)

    def __init__(self, path: Path):
        self.path, self.entries, self.offset = path, {}, 0
        self.file = open(path, "wb")
        self.file.write(b"\0" * (8 + self.RESERVED))

    def add(self, name: str, t: torch.Tensor) -> int:
        data = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        self.entries[name] = {
            "dtype": SAFETENSORS_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.offset, self.offset + data.nbytes],
        }
        self.offset += data.nbytes
        return data.nbytes

    def close(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(header) <= self.RESERVED:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.RESERVED) + header + b" " * (self.RESERVED - len(header)))
            self.file.close()
            return
        self.file.close()  # the rare shard of very many small tensors: header and data copied into a new file
        padded = header + b" " * (-len(header) % 8)
        with open(self.path, "rb") as src, open(self.path.with_suffix(".tmp"), "wb") as dst:
            dst.write(struct.pack("<Q", len(padded)) + padded)
            src.seek(8 + self.RESERVED)
            shutil.copyfileobj(src, dst, 64 << 20)
        os.replace(self.path.with_suffix(".tmp"), self.path)


class ShardWriter:
    """Writes tensors as they come into Hugging Face shards of about `shard_bytes` each, in a temporary
    folder beside `out` that becomes `out` only when the writer closes without an error: an interrupted
    run leaves no half-written model. One shard: model.safetensors; several: model-0000i-of-0000n with
    model.safetensors.index.json. Each tensor is on disk once added: memory holds one tensor, not a shard."""

    def __init__(self, out: str | os.PathLike, *, shard_bytes: int = 2 << 30):
        if shard_bytes < 1:
            raise ConfigError(f"shard_bytes={shard_bytes} must be >= 1")
        self.out = Path(out)
        self.shard_bytes = shard_bytes
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.partial"
        shutil.rmtree(self.tmp, ignore_errors=True)  # what an earlier interrupted run left
        self.tmp.mkdir()
        self.current: _ShardFile | None = None
        self.shards: list[list[str]] = []
        self.total_bytes = 0
        self.closed = False

    @property
    def folder(self) -> Path:
        """Where config, tokenizer and reports go before the rename."""
        return self.tmp

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if self.current is not None and self.current.offset and self.current.offset + nbytes > self.shard_bytes:
                self._flush()
            if self.current is None:
                self.current = _ShardFile(self.tmp / f"shard-{len(self.shards):05d}")
            self.total_bytes += self.current.add(name, t)

    def _flush(self) -> None:
        if self.current is not None:
            self.current.close()
            self.shards.append(list(self.current.entries))
            self.current = None

    def close(self) -> Path:
        self._flush()
        if len(self.shards) == 1:
            os.replace(self.tmp / "shard-00000", self.tmp / "model.safetensors")
        else:
            weight_map = {}
            for n, names in enumerate(self.shards):
                file = f"model-{n + 1:05d}-of-{len(self.shards):05d}.safetensors"
                os.replace(self.tmp / f"shard-{n:05d}", self.tmp / file)
                weight_map.update(dict.fromkeys(names, file))
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        self.closed = True
        return self.out

    def abort(self) -> None:
        if self.current is not None:
            self.current.file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
