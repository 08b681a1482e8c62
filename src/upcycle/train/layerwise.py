"""The layer-local fitter: fit a chosen set of parameters against a loss, everything else frozen.

    losses = fit([{"params": ffn.predictor.parameters(), "lr": 1e-2}], loss_on_rows,
                 steps=200, rows=len(x), batch=1024, generator=g)

Used wherever one module is fitted on its own: the predictor warm-up of sparsify (cached FFN inputs
against the dense oracle), layer-local repair (cached rows against the reference's dense FFN), and
layer-wise reconstruction next. A step samples `batch` rows at random (seeded) and calls
`loss(index)`; with `rows=None` it calls `loss(step)` instead (a loss that picks its own data).
The one trainer (trainer.py) is for end-to-end training from a run config; this is its small sibling.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def fit(
    groups: list[dict],
    loss: Callable[[torch.Tensor | int], torch.Tensor],
    *,
    steps: int,
    rows: int | None = None,
    batch: int = 1024,
    generator: torch.Generator | None = None,
    optimizer: str = "adam",
    weight_decay: float | None = None,
    model: torch.nn.Module | None = None,
    train_mode: bool = False,
    progress: bool = False,
    desc: str = "fit",
) -> list[float]:
    """Fit the parameters in `groups` ([{"params": ..., "lr": ...}], per-group learning rates) for
    `steps` optimizer steps and return the loss of every step.

    `model`: every other parameter of it is frozen while fitting and its requires_grad flags are
    restored after (as is its train/eval mode; `train_mode` puts it in training mode meanwhile)."""
    groups = [{**g, "params": list(g["params"])} for g in groups]
    groups = [g for g in groups if g["params"]]  # e.g. a shadow predictor: nothing of its own to fit
    fitted = [p for g in groups for p in g["params"]]
    flags = {p: p.requires_grad for p in (model.parameters() if model is not None else fitted)}
    was_training = model.training if model is not None else None
    kwargs = {} if weight_decay is None else {"weight_decay": weight_decay}
    opt = OPTIMIZERS[optimizer](groups, **kwargs)
    for p in flags:
        p.requires_grad_(False)
    for p in fitted:
        p.requires_grad_(True)
    if model is not None and train_mode:
        model.train()
    losses = []
    try:
        with torch.enable_grad():
            for step in tqdm(range(steps), desc=desc, disable=not progress):
                pick = step if rows is None else torch.randint(0, rows, (min(batch, rows),), generator=generator)
                value = loss(pick)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                losses.append(value.item())
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p in fitted:
            p.grad = None
        if model is not None:
            model.train(was_training)
    return losses
