"""What a module sees and does when the model reads text: forward hooks that are always removed, and
the model's forward over token blocks. Calibration (ops.calibrate, infer.calibrate), localisation, selection recall and
timing all read a module's inputs this way.

    with hooked({"l3": adapter.ffn(3)}, pre=fn): run_blocks(model, blocks)
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from tqdm.auto import tqdm


@contextlib.contextmanager
def hooked(modules: dict, pre: Callable | None = None, post: Callable | None = None):
    """Inside the block, pre(key, module, args) runs before and post(key, module, args, output)
    after each listed module's forward; the hooks are removed on the way out, error or not."""
    handles = []
    try:
        for key, module in modules.items():
            if pre is not None:
                handles.append(module.register_forward_pre_hook(lambda m, args, key=key: pre(key, m, args)))
            if post is not None:
                handles.append(module.register_forward_hook(lambda m, args, out, key=key: post(key, m, args, out)))
        yield
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised by a hook that has what it needs: the rest of that forward pass is skipped."""


@torch.no_grad()
def run_blocks(model, blocks: torch.Tensor, *, batch_size: int = 8, progress: bool = False, desc: str = "calibration"):
    """The model's forward over token blocks (n, T) in eval mode, its training flag restored after.
    A hook may end a batch's forward early by raising StopForward."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(blocks), batch_size), desc=desc, disable=not progress, leave=False):
            try:
                model(input_ids=blocks[start : start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        model.train(was_training)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A module input as the calibration caches keep it: (tokens, features), fp32, CPU."""
    return x.reshape(-1, x.shape[-1]).float().cpu()
