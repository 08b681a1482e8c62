"""Calibration: what each layer's FFN sees and does on real text, collected with forward hooks.

The statistics feed the transforms: predictor warm-up (the cached FFN inputs), TEAL thresholds
(activation magnitudes), channel permutation (co-activation) and width cuts (channel importance).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from upcycle.arch import adapter_for


@torch.no_grad()
def ffn_inputs(model, blocks: torch.Tensor, layers: list[int], *, batch_size: int = 8,
               progress: bool = False) -> dict[int, torch.Tensor]:
    """The inputs (normed hidden states) of the listed layers' FFNs: {layer: (tokens, hidden)}."""
    adapter = adapter_for(model)
    cache: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def hook(i):
        return lambda module, args: cache[i].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())

    handles = [adapter.ffn(i).register_forward_pre_hook(hook(i)) for i in layers]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(blocks), batch_size), desc="calibration", disable=not progress, leave=False):
            model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {i: torch.cat(v) for i, v in cache.items()}


@torch.no_grad()
def swiglu_activation(weights, x: torch.Tensor, act=torch.nn.functional.silu, chunk: int = 4096) -> torch.Tensor:
    """act(x W_gate^T) * (x W_up^T) for cached inputs x (tokens, hidden), in chunks."""
    out = []
    for start in range(0, len(x), chunk):
        xs = x[start:start + chunk].to(weights.gate.dtype)
        out.append((act(xs @ weights.gate.T) * (xs @ weights.up.T)).float())
    return torch.cat(out)


@torch.no_grad()
def channel_importance(weights, x: torch.Tensor) -> torch.Tensor:
    """Each FFN channel's mean contribution |h_i| * ||W_down[:, i]|| over the calibration tokens."""
    h = swiglu_activation(weights, x)
    return h.abs().mean(0) * weights.down.float().norm(dim=0)


@torch.no_grad()
def magnitude_quantile(h: torch.Tensor, q: float, *, sample: int = 2_000_000, seed: int = 0) -> float:
    """The q-quantile of |h| (over a fixed random sample of its entries when it is large)."""
    flat = h.abs().reshape(-1)
    if flat.numel() > sample:
        gen = torch.Generator().manual_seed(seed)
        flat = flat[torch.randint(0, flat.numel(), (sample,), generator=gen)]
    return float(torch.quantile(flat.double(), q))
