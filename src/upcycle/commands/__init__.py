"""One module per verb. Each has `run(<sources>, config)`: what `upcycle <verb>` calls, and what a
Python user can call too. The CLI's options are generated from `run`'s signature and its config
dataclass (see upcycle.cli); a verb's data flows load -> calibrate -> transform -> verify -> train ->
evaluate -> save -> report, through the shared pieces (hub, ops, train, eval, report)."""

from pathlib import Path

from transformers.utils import logging


def quiet_transformers() -> None:
    """No transformers progress bars or warnings in a command's output."""
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def existing_parent(path) -> Path:
    """The folder OUT will be made in, created if needed: where a command stages its run folder, so
    that moving it into OUT is a rename on the same file system."""
    parent = Path(path).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent
