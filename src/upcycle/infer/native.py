"""A whole decoding step in one call of the kernels (kernels/decode_step.h) for a model converted by
`to_precision`: the plan of raw pointers into the model's own tensors, built once.

At one token a step of SmolLM2 at int8 is ~12 ms of row dots; torch.compile put ~5 ms more around them
(inductor's small kernels for the norms, rotary and attention, TorchDynamo's lookup and the graph's
inputs: torch profiler, 63 steps). The C step does the same work with plain loops between the row dots.

It runs what it can read and says why it cannot read the rest (`NativeStep.refusal`), so the decoder falls
back to its compiled step: a family whose layers are not Llama-shaped (MoE), layers
not converted to row dots, a bank-sparse FFN the kernel cannot run, sliding-window attention that would
bite within the cache, no kernels.
"""

from __future__ import annotations

import ctypes

import torch

from upcycle import kernels
from upcycle.arch import adapter_for
from upcycle.errors import UnsupportedArchitecture
from upcycle.infer.rows import RowLinear, RowsOf
from upcycle.kernels.build import DecodeLayer, DecodePlan, DecodeRows
from upcycle.modules import BankSparseFFN


class Unsupported(Exception):
    """Why a model cannot take the one-call step (the decoder runs its compiled step instead)."""


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(linear, keep: list) -> DecodeRows:
    """The DecodeRows of a RowLinear (the stack of a RowsOf group: its first layer stands for all)."""
    if isinstance(linear, RowsOf):
        linear = linear.stack.rows
    if not isinstance(linear, RowLinear):
        raise Unsupported(f"a {type(linear).__name__} where the step wants row dots (convert with to_precision)")
    stored = linear.stored
    if stored.dtype not in kernels.WEIGHT_TYPES or not stored.is_contiguous():
        raise Unsupported(f"rows stored as {stored.dtype}")
    scales = linear.scales if linear.quantized else None
    kind = kernels.weight_type(stored, kernels.NO_SCALES if scales is None else scales)  # as RowLinear calls it
    bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
    keep += [stored, scales, bias]
    return DecodeRows(
        stored.data_ptr(), kind, _pointer(scales), _pointer(bias), linear.out_features, linear.in_features
    )


def _group(linears: list, what: str) -> None:
    """The layers `linears` must be the consecutive parts 0, 1, ... of one stack (what the step reads)."""
    stacks = {id(getattr(linear, "stack", None)) for linear in linears}
    indexes = [getattr(linear, "index", None) for linear in linears]
    if len(stacks) != 1 or indexes != list(range(len(linears))) or not isinstance(linears[0], RowsOf):
        raise Unsupported(f"{what} are not stacked rows")
    if len(linears[0].stack.bounds) != len(linears) + 1:
        raise Unsupported(f"{what}' stack holds other rows too")


class NativeStep:
    """`step(token, position) -> next token` over the model's static cache (`bind(cache)` after the
    prompt's forward allocated it). Raises Unsupported where the model is not one the C step runs."""

    def __init__(self, model, max_len: int):
        lib = kernels.load()
        if lib is None or not kernels.enabled():
            raise Unsupported(kernels.why_unavailable() or "kernels switched off")
        try:
            adapter = adapter_for(model)
        except UnsupportedArchitecture as exc:
            raise Unsupported(str(exc)) from exc
        config = adapter.config
        if not adapter.llama_shaped:
            raise Unsupported(f"{adapter.family}'s layers are not Llama-shaped")
        window = getattr(config, "sliding_window", None)
        if window is not None and (getattr(config, "use_sliding_window", True) and window < max_len):
            raise Unsupported(f"sliding-window attention ({window} positions) within {max_len}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise Unsupported(f"activation {config.hidden_act}")
        self.lib, self.max_len, keep = lib, max_len, []
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        embed = adapter.embedding().weight
        self.bf16 = embed.dtype == torch.bfloat16  # the activations' dtype (infer.precision.DTYPES)
        if embed.dtype not in (torch.float32, torch.bfloat16) or not embed.is_contiguous():
            raise Unsupported(f"embedding in {embed.dtype}{'' if embed.is_contiguous() else ', not contiguous'}")
        cos, sin = adapter.rotary_tables(max_len)
        if cos.shape[-1] != head_dim:
            raise Unsupported("rotary embedding over part of a head")
        if self.bf16:  # the model's own tables come in its activations' dtype
            cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
        layers, widths = (DecodeLayer * adapter.num_layers)(), [0]
        for i in range(adapter.num_layers):
            layers[i] = self._layer(adapter, i, keep, widths)
        if len({adapter.attention_scaling(i) for i in range(adapter.num_layers)}) != 1:
            raise Unsupported("attention scaling differs between layers")
        final = adapter.final_norm().weight.detach().float().contiguous()
        keep += [embed, cos, sin, final, layers]
        self.plan = DecodePlan(
            adapter.num_layers, config.hidden_size, heads, kv_heads, head_dim, max_len, embed.shape[0], max(widths),
            adapter.norm_eps(adapter.final_norm()), adapter.attention_scaling(0), int(self.bf16), int(self.bf16),
            int(self.bf16), embed.data_ptr(), cos.data_ptr(), sin.data_ptr(), final.data_ptr(),
            _rows(adapter.lm_head(), keep), layers, None,
        )  # fmt: skip
        self._ref = ctypes.byref(self.plan)  # made once: the step's only Python per token is the call
        self._scratch = torch.empty(lib.upcycle_decode_scratch(self._ref))
        self.plan.scratch = self._scratch.data_ptr()
        self._keep, self._layers, self._adapter, self._bound = keep, layers, adapter, None

    def _layer(self, adapter, i: int, keep: list, widths: list) -> DecodeLayer:
        attention, norms, ffn = adapter.attention(i), adapter.norms(i), adapter.ffn(i)
        _group([attention["q"], attention["k"], attention["v"]], "q, k and v")
        norm_weights = [norms[name].weight.detach().float().contiguous() for name in ("input", "post_attention")]
        keep += norm_weights
        layer = DecodeLayer(norm_weights[0].data_ptr(), norm_weights[1].data_ptr())
        layer.qkv, layer.o = _rows(attention["q"], keep), _rows(attention["o"], keep)
        head_norms = adapter.head_norms(i)
        if head_norms is not None:
            if any(adapter.norm_eps(norm) != adapter.norm_eps(norms["input"]) for norm in head_norms):
                raise Unsupported("q/k norms with an eps of their own")
            q_norm, k_norm = (norm.weight.detach().float().contiguous() for norm in head_norms)
            keep += [q_norm, k_norm]
            layer.q_norm, layer.k_norm = q_norm.data_ptr(), k_norm.data_ptr()
        if isinstance(ffn, BankSparseFFN):
            plan = kernels.plan_for(ffn)
            if ffn.sparsity.selection != "predictor" or not plan.usable or not (plan.predictor or plan.shadow):
                raise Unsupported(f"layer {i}'s bank-sparse FFN cannot run in the kernel")
            keep.append(plan)
            layer.sparse = ctypes.addressof(plan.struct)
            layer.bank, layer.keep, layer.gate = ffn.sparsity.bank, ffn.keep, kernels.GATE_CODES[ffn.sparsity.gate]
        elif adapter.ffn_kind(i) == "none":  # eval.speed.without_ffns: the residual stream passes through
            pass
        elif all(hasattr(ffn, name) for name in ("gate_proj", "up_proj", "down_proj")):  # a SwiGLU FFN's rows
            _group([ffn.gate_proj, ffn.up_proj], "gate and up")
            layer.gate_up, layer.down = _rows(ffn.gate_proj, keep), _rows(ffn.down_proj, keep)
            widths.append(layer.gate_up.n // 2)
        else:
            raise Unsupported(f"layer {i}'s FFN is a {type(ffn).__name__}")
        return layer

    def bind(self, cache) -> None:
        """Point the plan at the static cache's tensors (allocated by its first update)."""
        tensors = [self._adapter.cache_tensors(cache, i) for i in range(self.plan.layers)]
        if any(t is None for t in tensors):
            raise RuntimeError("NativeStep.bind: the cache has not been filled yet (run the prompt first)")
        pointers = tuple((k.data_ptr(), v.data_ptr()) for k, v in tensors)
        if pointers == self._bound:
            return
        want = (1, self.plan.kv_heads, self.max_len, self.plan.head_dim)
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        for i, (keys, values) in enumerate(tensors):
            if (
                tuple(keys.shape) != want
                or keys.dtype != dtype
                or not keys.is_contiguous()
                or not values.is_contiguous()
            ):
                raise RuntimeError(
                    f"NativeStep.bind: layer {i}'s cache is {tuple(keys.shape)} {keys.dtype}, not {want} {dtype}"
                )
            self._layers[i].keys, self._layers[i].values = keys.data_ptr(), values.data_ptr()
        self._bound = pointers

    @property
    def logits(self) -> torch.Tensor:
        """The last step's logits [vocab] (the tail of its scratch; a view, overwritten by the next step)."""
        return self._scratch[-self.plan.vocab :]

    def __call__(self, token: int, position: int) -> int:
        out = self.lib.upcycle_decode_step(self._ref, token, position)
        if out < 0:
            raise RuntimeError(f"the decoding step's kernel rejected its arguments (code {out})")
        return out
