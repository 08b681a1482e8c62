"""What a run config can name: stage transforms and callbacks, registered by the code that defines
them, and their options checked when the config loads (a typo in the last stage fails before the
first step, not after the stages before it have trained).

    @register_transform("slim", options=SlimStageOptions)   # options: a Config dataclass ...
    def slim_stage(model, tokenizer=None, **options): ...

    @register_callback("seft")                                 # ... or the function's / class's own
    class SEFTUpdates(Callback):                               # keyword parameters and annotations
        def __init__(self, every: int = 20, ...): ...
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Callable

from upcycle.config import conform
from upcycle.errors import ConfigError

# name -> fn(model, [tokenizer], **options) -> model (or (model, report)): applied when a stage starts
TRANSFORMS: dict[str, Callable] = {}
# name -> Callback class, instantiated with the stage's options while that stage runs
CALLBACKS: dict[str, type] = {}
# name -> the Config dataclass of a transform's options, where it declares one
TRANSFORM_OPTIONS: dict[str, type] = {}

_CONTEXT = ("model", "tokenizer", "state")  # what the trainer passes itself, never a config option
# Transforms registered by layers above the trainer (a pipeline that is also a stage), imported when a
# name is not found yet: `import upcycle` no longer imports every pipeline, and a run config may still
# name them. A string, not an import: the trainer does not depend on the pipelines.
PROVIDERS = ("upcycle.pipelines.sparsify",)


def transform(name: str) -> Callable | None:
    """The registered transform `name`, its provider imported first where it is not registered yet."""
    if name not in TRANSFORMS:
        import importlib

        for module in PROVIDERS:
            importlib.import_module(module)
    return TRANSFORMS.get(name)


def register_transform(name: str, options: type | None = None):
    def wrap(fn):
        TRANSFORMS[name] = fn
        if options is not None:
            TRANSFORM_OPTIONS[name] = options
        return fn

    return wrap


def register_callback(name: str):
    def wrap(cls):
        CALLBACKS[name] = cls
        return cls

    return wrap


def check_transform(name: str, options: dict, where: str) -> None:
    """A registered transform, and options it takes with values of the types it declares."""
    if transform(name) is None:
        raise ConfigError(f"{where} transform={name!r} is not registered; known: {', '.join(sorted(TRANSFORMS))}")
    if name in TRANSFORM_OPTIONS:
        TRANSFORM_OPTIONS[name].from_dict(dict(options), f"{where} transform_options")
    else:
        _check_keywords(TRANSFORMS[name], options, f"{where} transform_options ({name})")


def check_callback(name: str, options: dict, where: str) -> None:
    if name not in CALLBACKS:
        raise ConfigError(f"{where} callback {name!r} is not registered; known: {', '.join(sorted(CALLBACKS))}")
    _check_keywords(CALLBACKS[name].__init__, options, f"{where} callback {name!r} options")


def _check_keywords(fn, options: dict, where: str) -> None:
    """Every option a keyword `fn` takes, of the type its annotation says (no **kwargs: nothing else)."""
    signature = inspect.signature(fn)
    params = {
        n: p
        for n, p in signature.parameters.items()
        if n not in ("self", *_CONTEXT) and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    open_ended = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    hints = typing.get_type_hints(fn)
    for key, value in options.items():
        if key not in params:
            if open_ended:
                continue
            raise ConfigError(f"{where}: unknown option {key!r}; known: {', '.join(params) or 'none'}")
        if key in hints:
            conform(value, hints[key], f"{where} {key}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in options]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")


def options_for(name: str, options: dict) -> dict:
    """The transform's keyword arguments: its options dataclass's fields, defaults filled in."""
    if name in TRANSFORM_OPTIONS:
        return dataclasses.asdict(TRANSFORM_OPTIONS[name].from_dict(dict(options), name))
    return dict(options)
