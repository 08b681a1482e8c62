"""upcycle: turn the language-model checkpoint you have into the model you need, then keep training it.

Every verb has one call shape, the pipeline `upcycle <verb>` runs too:

    model, report = upcycle.<verb>(model, tokenizer, config)   # a Result: .model, .report; prints nothing
"""

# The public API, imported on first use (PEP 562): `import upcycle` stays light, so the command line can
# answer some errors (an unreachable hub id) before torch and transformers load.
_API = {
    "UpcycleError": "upcycle.errors",
    "RunOptions": "upcycle.config",
    "load": "upcycle.hub",
    "save": "upcycle.hub",
    "save_verified": "upcycle.hub",
    "tiny": "upcycle.hub",
    "densify": "upcycle.ops",
    "narrow_ffn": "upcycle.ops",
    "GrowChecks": "upcycle.ops.grow",
    "GrowStep": "upcycle.ops.grow",
    "PruneSpec": "upcycle.ops.prune",
    "SlimStep": "upcycle.ops.slim",
    "Result": "upcycle.pipelines",
    "FinetuneConfig": "upcycle.pipelines.finetune",
    "GrowConfig": "upcycle.pipelines.grow",
    "PruneConfig": "upcycle.pipelines.prune",
    "RepairConfig": "upcycle.pipelines.repair",
    "SlimConfig": "upcycle.pipelines.slim",
    "SlimStage": "upcycle.pipelines.slim",
    "SparsifyConfig": "upcycle.pipelines.sparsify",
    "TrainConfig": "upcycle.train",
    "Trainer": "upcycle.train",
}
_VERBS = {"finetune", "grow", "prune", "repair", "slim", "sparsify"}  # upcycle.<verb> = pipelines.<verb>.run
__all__ = sorted([*_API, *_VERBS, "modules", "train"])


def __getattr__(name: str):
    import importlib

    if name in _VERBS:
        value = importlib.import_module(f"upcycle.pipelines.{name}").run
    elif name in _API:
        importlib.import_module("upcycle.modules")  # the sparse type known to transformers' Auto classes
        importlib.import_module("upcycle.train")  # the trainer's losses, callbacks and stage transforms
        value = getattr(importlib.import_module(_API[name]), name)
    elif name in ("modules", "train"):
        value = importlib.import_module(f"upcycle.{name}")
    else:
        raise AttributeError(f"module 'upcycle' has no attribute {name!r}")
    globals()[name] = value
    return value


__version__ = "0.1.0"
