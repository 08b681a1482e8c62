"""Where a hub id's weights are — the local Hugging Face cache, or the hub if it answers — decided with the
standard library and huggingface_hub alone (no torch, no transformers), so that a command given a hub id
on a machine without a network says so in a second, before it imports anything heavy."""

from __future__ import annotations

import functools
import os
import re
import socket
import urllib.parse
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUILTIN_MODELS = ("smollm2-135m", "smollm2-135m-qwen2")  # upcycle.hub builds them; named here for the errors


def looks_like_hub_id(name: str) -> bool:
    """`org/name` that is not a path on this machine."""
    return bool(HUB_ID.match(name)) and not name.startswith((".", "~")) and not Path(name).expanduser().exists()


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of `repo_id` where it holds a config and safetensors weights. Read from the
    cache's files alone: transformers' own local lookup still asks the hub for an adapter file, and offline
    that is five retries (~25 s) of noise before the answer."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    return folder if any(folder.glob("*.safetensors")) else None


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so that an offline machine answers at once instead of after the HTTP client's
    retries; decided once per endpoint and process."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    return _connects(endpoint.hostname or "", port, timeout)


@functools.cache
def _connects(host: str, port: int, timeout: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def unreachable_message(repo_id: str) -> str:
    return (
        f"{repo_id!r} is not a local path and the Hugging Face hub is unreachable: pass a local model folder, "
        f"a .gguf file, or a built-in ({', '.join(BUILTIN_MODELS)})"
    )
