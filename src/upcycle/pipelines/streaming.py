"""A verb over a checkpoint on disk, one decoder layer at a time: read layer i, let the verb change it,
carry token blocks' hidden states through it, write it, free it, go on. Resident memory is about one
layer (and what the verb computes from it), the embeddings and the hidden states carried — never the
model — so a checkpoint larger than RAM streams as a small one does.

    with LayerPass(lazy, source={"held": held}, output={"calibration": calib, "held": held}, out=folder) as p:
        for i in p.layers():                      # layer i loaded; source streams already past it
            change(p.model, i, p.output["calibration"])
        ...                                        # each layer advanced, written and released by p
    p.report.peak_rss_mb, p.perplexity("held"), p.equivalence("held")

Hidden states follow the sequential pattern of SparseGPT and llm-compressor: layer i's inputs are what
layers < i gave, already changed (`output` streams); `source` streams run each layer as it was read,
before the change — the source model's function, for the one-shot cost and the equivalence figures.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from upcycle import hub
from upcycle.checkpoint import Checkpoint, LazyModel, ShardWriter
from upcycle.config import RunOptions
from upcycle.devices import dtype_name, parse_size, resolve_device, resolve_dtype
from upcycle.eval.equivalence import Equivalence, EquivalenceMeter
from upcycle.eval.peak_memory import peak_rss_mb, reset_peak, return_freed_memory
from upcycle.eval.perplexity import Perplexity
from upcycle.ops.calibrate import LayerStream

__all__ = ["LayerPass", "StreamReport", "open_source", "probe_tokens", "reloaded_equivalence"]


def probe_tokens(lazy: LazyModel, *, blocks: int = 1, seq_len: int = 32) -> torch.Tensor:
    """Random token blocks (seed 0) on which a written model is compared with the one held. Few: a write
    that does not read back shows on any token, and each token costs a forward over the whole model twice
    (measured at 7.45B in bf16: with 128 tokens, `convert` took 1.96× its pass)."""
    vocab = lazy.adapter.embedding().weight.shape[0]
    return torch.randint(0, vocab, (blocks, seq_len), generator=torch.Generator().manual_seed(0))


def reloaded_equivalence(folder, expected: list[torch.Tensor], probe: torch.Tensor, lazy: LazyModel) -> Equivalence:
    """Stream the folder just written over `probe` and compare its logits with `expected` (the model as it
    was held when written): a write that does not read back to the same function is caught here."""
    written = LazyModel(folder, device=lazy.device, dtype=lazy.dtype)
    meter = EquivalenceMeter()
    with LayerPass(written, output={"probe": probe}, desc="verify") as p:
        for _ in p.layers():
            pass
        start = 0
        for ref, got in zip(expected, p.logits(p.output["probe"])):
            meter.add(ref, got, probe[start : start + len(ref)])
            start += len(ref)
    return meter.result()


def open_source(source, options: RunOptions) -> tuple[LazyModel, object]:
    """(the source as a LazyModel on the run's device and dtype, its tokenizer): nothing read but shapes."""
    device = resolve_device(options.device)
    folder, tokenizer = hub.folder_for(source, trust_remote_code=options.trust_remote_code)
    dtype = resolve_dtype(options.dtype, Checkpoint(folder).dtype)
    return LazyModel(folder, device=device, dtype=dtype, trust_remote_code=options.trust_remote_code), tokenizer


def shard_bytes(options: RunOptions) -> int:
    return parse_size(options.shard_size)


@dataclass
class StreamReport:
    """What a streamed pass cost: the run report's memory and time figures."""

    device: str
    dtype: str
    layers: int = 0
    seconds: float = 0.0
    layer_seconds: list = field(default_factory=list)
    peak_rss_mb: float = 0.0  # the process's peak resident memory over the pass (from the OS)
    bytes_read: int = 0
    bytes_written: int = 0
    hidden_states_mb: float = 0.0  # the token blocks' hidden states carried from layer to layer
    shards: int = 0

    def line(self) -> str:
        per_layer = self.seconds / max(self.layers, 1)
        written = f", wrote {self.bytes_written / 1e9:.2f} GB in {self.shards} shard(s)" if self.bytes_written else ""
        return (
            f"streamed {self.layers} layers on {self.device} in {self.dtype}: {self.seconds:.1f} s "
            f"({per_layer:.2f} s a layer), peak resident memory {self.peak_rss_mb:,.0f} MB "
            f"(hidden states carried: {self.hidden_states_mb:,.1f} MB){written}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


class LayerPass:
    """One pass up a LazyModel (see the module docstring). `out`: the folder the changed model is written
    to, shard by shard (None: nothing is written, as for eval); `config_changes` go into its config.json."""

    def __init__(
        self,
        lazy: LazyModel,
        *,
        source: dict[str, torch.Tensor] | None = None,
        output: dict[str, torch.Tensor] | None = None,
        out: str | Path | None = None,
        shard_bytes: int = 2 << 30,
        tokenizer=None,
        progress: bool = False,
        desc: str = "layers",
        batch_size: int = 8,
    ):
        self.lazy, self.model, self.adapter = lazy, lazy.model, lazy.adapter
        self.tokenizer, self.progress, self.desc, self.batch_size = tokenizer, progress, desc, batch_size
        self.blocks = {**(source or {}), **(output or {})}
        self.source_blocks, self.output_blocks = dict(source or {}), dict(output or {})
        self.writer = ShardWriter(out, shard_bytes=shard_bytes) if out is not None else None
        self.report = StreamReport(device=str(lazy.device), dtype=dtype_name(lazy.dtype))
        self.config_changes: dict = {}
        self.output_config = None  # a config of another model type for the folder written (densify)
        self._emitted: list[tuple] | None = None  # None: write the current layer as it is
        self._outer: dict | None = None
        self.source: dict[str, LayerStream] = {}
        self.output: dict[str, LayerStream] = {}

    def __enter__(self) -> "LayerPass":
        reset_peak()
        self.started = time.perf_counter()
        self.lazy.load_outer()
        self.source = {k: LayerStream(self.model, b, batch_size=self.batch_size, keep_previous=True)
                       for k, b in self.source_blocks.items()}  # fmt: skip
        self.output = {k: LayerStream(self.model, b, batch_size=self.batch_size) for k, b in self.output_blocks.items()}
        self.report.hidden_states_mb = sum(
            batch[0].numel() * batch[0].element_size() for s in (*self.source.values(), *self.output.values())
            for batch in s.batches
        ) / 2**20  # fmt: skip
        self.lazy.release_outer_weights()  # the blocks are embedded: loaded again for the logits at the top
        return self

    def emit(self, tensors: dict[str, torch.Tensor], index: int, *, family=None) -> None:
        """Write `tensors` (named as the layer's module names them) as output layer `index` instead of the
        current layer as it is: for a verb that makes layers of another shape, or more of them; `family`:
        the adapter class of the layer's family where it is another (dense → MoE)."""
        self._emitted = (self._emitted or []) + [(index, tensors, family)]

    def drop(self) -> None:
        """Leave the current layer out of the output: nothing written for it (unless emitted after this), and
        the output streams do not run it."""
        self._emitted = self._emitted or []

    def set_outer(self, tensors: dict[str, torch.Tensor]) -> None:
        """The outer tensors (embeddings, final norm, LM head: full names) to write instead of the model's."""
        self._outer = tensors

    def layers(self):
        """Yield each layer index with that layer loaded and every source stream already past it; after the
        caller's body, the output streams are advanced through the layer as it now is, and it is written
        and released."""
        # None: tqdm's own choice, a bar on a terminal and none in a log or a captured stream
        bar = tqdm(range(self.lazy.num_layers), desc=self.desc, unit="layer", disable=None if self.progress else True,
                   leave=False)  # fmt: skip
        # no terminal (a run under nohup, a job's log): a line a layer instead of the bar, else a streamed
        # 3B model shows nothing for half an hour
        lines = self.progress and bar.disable
        for i in bar:
            start = time.perf_counter()
            self.lazy.load_layer(i)
            for stream in self.source.values():
                stream.advance()
            yield i
            dropped = self._emitted == []
            for stream in self.output.values():
                if dropped:  # the output model has no layer i: its streams skip it
                    stream.layer += 1
                else:
                    stream.advance()
            if self.writer is not None:
                self._write(i)
            self._emitted = None
            self.lazy.release_layer(i)
            return_freed_memory()
            self.report.layer_seconds.append(round(time.perf_counter() - start, 3))
            if lines:
                print(f"{self.desc}: layer {i + 1}/{self.lazy.num_layers} in {self.report.layer_seconds[-1]:.1f} s, "
                      f"peak {peak_rss_mb():,.0f} MB resident", file=sys.stderr, flush=True)  # fmt: skip
        self.report.layers = self.lazy.num_layers

    def _write(self, i: int) -> None:
        # in a function of its own so that nothing written outlives the call: a loop variable left bound to
        # the last tensors emitted kept a whole layer alive beside the next one (measured at 7.45B: dense ->
        # MoE peaked at 3.1 GB, 0.7 GB of it the previous layer's MoE block)
        for index, tensors, family in self._emitted if self._emitted is not None else [(i, None, None)]:
            self.writer.add(self.lazy.layer_state(i, tensors, index=index, family=family))

    def __exit__(self, kind, error, traceback) -> None:
        if self.writer is not None and not self.writer.closed:  # failed, or never finished: no half model
            self.writer.abort()
        # the embeddings and head the top of the pass read: not to be held through the next pass (the written
        # model read back holds its own); whatever needs them again loads them
        self.lazy.release_outer_weights()
        if kind is not None:
            return
        self.report.bytes_read = self.lazy.checkpoint.nbytes
        self.report.seconds = time.perf_counter() - self.started
        self.report.peak_rss_mb = peak_rss_mb()

    # ---- the top of the model: scores from the carried hidden states --------------------------------
    def logits(self, stream: LayerStream):
        """The LM's logits, batch by batch, from a stream that has gone through every layer."""
        self.lazy.ensure_outer()
        norm, head = self.adapter.final_norm(), self.adapter.lm_head()
        for hidden, _, _ in stream.batches:
            for row in hidden.split(1):  # a block at a time: a batch's logits over a 150k vocabulary are GBs
                with torch.no_grad():  # not around the yield: a generator left unfinished would keep grad off
                    logits = head(norm(row))
                yield logits

    def perplexity(self, name: str, *, which: str = "output") -> Perplexity:
        """Perplexity of the token blocks `name` at the top of the source or the output model: as
        upcycle.eval.perplexity computes it (float64 sums per batch)."""
        stream = (self.output if which == "output" else self.source)[name]
        blocks, total, count, start = self.blocks[name], 0.0, 0, 0
        for logits in self.logits(stream):
            batch = blocks[start : start + len(logits)].to(logits.device)
            start += len(logits)
            targets = batch[:, 1:]
            flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            total += F.cross_entropy(flat, targets.reshape(-1), reduction="sum").double().item()
            count += targets.numel()
        return Perplexity(nll=total / count, tokens=count)

    def equivalence(self, name: str, *, reference: str | None = None) -> Equivalence:
        """The output model against the source on the token blocks `name` (both streamed); `reference`: the
        source stream to compare with where it is another one whose blocks begin with these."""
        meter, blocks, start = EquivalenceMeter(), self.blocks[name], 0
        source = self.logits(self.source[reference or name])
        for cand in self.logits(self.output[name]):
            ref = next(source)
            meter.add(ref, cand, blocks[start : start + len(ref)])
            start += len(ref)
        return meter.result()

    # ---- finishing the written folder --------------------------------------------------------------
    def finish(self, *, report=None) -> Path | None:
        """Write config (with the changes), tokenizer and the run's report files, then rename the folder
        into place. None when the pass writes nothing."""
        if self.writer is None:
            return None
        self.writer.add(self._outer if self._outer is not None else self.lazy.outer_state())
        config = self.output_config or self.model.config  # with what the verb changed (adapter.set_config)
        for key, value in self.config_changes.items():
            setattr(config, key, value)
        config.dtype = self.lazy.dtype
        config.save_pretrained(self.writer.folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(self.writer.folder)
        if report is not None:
            report(self.writer.folder)
        folder = self.writer.close()
        self.report.bytes_written, self.report.shards = self.writer.total_bytes, len(self.writer.shards)
        return folder
