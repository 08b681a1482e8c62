"""Calibration: what layers see and do on real text, captured with forward hooks.

    inputs = ffn_inputs(model, blocks, layers)              # {layer: (tokens, hidden)} FFN inputs
    stream = LayerStream(model, blocks)                     # the same, one layer at a time, bottom up
    with hooked({"l3": adapter.ffn(3)}, pre=fn): ...        # any hook, always removed

The statistics feed the transforms: predictor warm-up (the cached FFN inputs), TEAL thresholds
(activation magnitudes), channel permutation (co-activation) and width cuts (channel importance);
the same hooks serve every other reader of a module's inputs (localisation, repair, timing).
"""

from __future__ import annotations

import contextlib

import torch

from upcycle.arch import adapter_for
from upcycle.hooks import StopForward, _rows, hooked, run_blocks  # noqa: F401  (the calibration API)


def module_inputs(
    model,
    modules: dict,
    blocks: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = False,
    stop: bool = False,
    stop_after=None,
) -> dict:
    """What each listed module receives when the model reads `blocks`: {key: (tokens, features)}, fp32, CPU.
    Each forward ends once module `stop_after` (a key; with `stop`, the one module listed) has its input:
    the layers above it, and the LM head, are not computed."""
    cache: dict = {key: [] for key in modules}
    if stop:
        if len(modules) != 1:
            raise ValueError("module_inputs(stop=True) takes exactly one module")
        stop_after = next(iter(modules))

    def keep(key, module, args):
        cache[key].append(_rows(args[0]))
        if key == stop_after:
            raise StopForward

    with hooked(modules, pre=keep):
        run_blocks(model, blocks, batch_size=batch_size, progress=progress)
    return {key: torch.cat(rows) for key, rows in cache.items()}


class LayerStream:
    """The hidden states entering each decoder layer for a fixed set of token blocks, carried up the
    model one layer at a time. Reading what a module of layer i receives and then stepping past layer i
    costs one layer's forward, where `module_inputs(stop=True)` recomputes every layer below it (a
    bottom-up pass over all layers is quadratic that way). Each layer runs with the arguments the model
    gave layer 0 (position embeddings, masks), and layer i as it is when `advance()` is called: change
    layer i first, and layer i + 1 sees what a full forward of the changed model would give it.

        stream = LayerStream(model, blocks)
        for i in range(n): x = stream.module_inputs(adapter.ffn(i)); ...change layer i...; stream.advance()
    """

    def __init__(self, model, blocks: torch.Tensor, *, batch_size: int = 8, keep_previous: bool = False):
        self.model, self.adapter, self.layer = model, adapter_for(model), 0
        self.batches: list[list] = []  # per batch: [hidden states, positional args after them, keyword args]
        # keep_previous: the hidden states entering the layer last advanced past (what it was given)
        self.keep_previous, self.previous = keep_previous, None

        def grab(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            self.batches.append([hidden, args[1:], kwargs])
            raise StopForward

        handle = self.adapter.layer(0).register_forward_pre_hook(grab, with_kwargs=True)
        try:
            run_blocks(model, blocks, batch_size=batch_size)
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _eval(self, index: int | None = None):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield self.adapter.layer(self.layer if index is None else index)
        finally:
            self.model.train(was_training)

    def module_inputs(self, module: torch.nn.Module, *, previous: bool = False) -> torch.Tensor:
        """What `module`, a part of the current layer, receives: (tokens, features), fp32, CPU. previous: a
        part of the layer last advanced past, on the inputs that layer was given (keep_previous)."""
        rows = []

        def keep(key, m, args):
            rows.append(_rows(args[0]))
            raise StopForward

        batches = self.batches
        if previous:
            batches = [[h, args, kwargs] for h, (_, args, kwargs) in zip(self.previous, self.batches)]
        with self._eval(self.layer - 1 if previous else None) as layer, hooked({0: module}, pre=keep):
            for hidden, args, kwargs in batches:
                try:
                    layer(hidden, *args, **kwargs)
                except StopForward:
                    pass
        return torch.cat(rows)

    def run(self) -> None:
        """Run the current layer on the stream without moving on: for hooks that gather statistics
        (set them with `hooked` around the call) before the layer is changed and `advance`d."""
        with self._eval() as layer:
            for hidden, args, kwargs in self.batches:
                layer(hidden, *args, **kwargs)

    def advance(self) -> None:
        """Run the current layer (as it is now) on the stream: the next layer's inputs."""
        if self.keep_previous:
            self.previous = [batch[0] for batch in self.batches]
        with self._eval() as layer:
            for batch in self.batches:
                out = layer(batch[0], *batch[1], **batch[2])
                batch[0] = out[0] if isinstance(out, tuple) else out
        self.layer += 1


def ffn_inputs(
    model, blocks: torch.Tensor, layers: list[int], *, batch_size: int = 8, progress: bool = False
) -> dict[int, torch.Tensor]:
    """The inputs (normed hidden states) of the listed layers' FFNs: {layer: (tokens, hidden)}."""
    adapter = adapter_for(model)
    modules = {i: adapter.ffn(i) for i in layers}
    # the forward ends at the highest layer's FFN: nothing above it (nor the LM head) is needed
    return module_inputs(model, modules, blocks, batch_size=batch_size, progress=progress, stop_after=max(layers))


@torch.no_grad()
def swiglu_activation(weights, x: torch.Tensor, act=torch.nn.functional.silu, chunk: int = 4096) -> torch.Tensor:
    """act(x W_gate^T) * (x W_up^T) for cached inputs x (tokens, hidden), in chunks."""
    out = []
    for start in range(0, len(x), chunk):
        xs = x[start : start + chunk].to(weights.gate.dtype)
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
