"""One module per verb. Each has `run(<sources>, config)`: what `upcycle <verb>` calls, and what a
Python user can call too. The CLI's options are generated from `run`'s signature and its config
dataclass (see upcycle.cli); a verb's data flows load -> calibrate -> transform -> verify -> train ->
evaluate -> save -> report, through the shared pieces (hub, ops, train, eval, report)."""


def quiet_transformers() -> None:
    """No transformers progress bars or warnings in a command's output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
