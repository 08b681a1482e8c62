"""A lean greedy decoder: a static KV cache and one compiled step, nothing else between tokens.

`model.generate` spends, per token, time on things a greedy loop does not need (logits processors,
stopping criteria, cache bookkeeping in Python, the whole vocabulary's logits handed back). Here a step
is one compiled graph — embed the token, run the layers against the static cache, the LM head, argmax —
called with the token and its position, and the only Python per token is the call itself. Dense and
bank-sparse models run through the same decoder, so a speed-up measured with it is an honest ratio.

A model converted by `to_precision` whose layers are Llama-shaped (Llama, Mistral, Qwen2, Qwen3; dense or
bank-sparse FFNs) steps by one call of the kernels instead (`upcycle.infer.native`, kernels/decode_step.h):
no graph, no guards, plain loops between the row dots. SmolLM2 at int8, one process alternating the
two: 14.1-14.2 ms a step against the compiled graph's 19.5-21.3 (AVX2 EPYC, 2 threads). Where it
cannot (`native_refusal` says why) the compiled step runs.

The tokens are the ones `generate(do_sample=False)` gives on the same model with a static cache (the
same forward on the same cache layout: tested; in bf16 a near tie may go the other way, as between any
two bf16 kernels). The prompt is one uncompiled forward, which fills the cache both steps read.
"""

from __future__ import annotations

import contextlib
import time

import torch
from transformers import StaticCache

from upcycle.infer.native import NativeStep, Unsupported


def compile_options() -> dict:
    """inductor with its C++ wrapper (the graph's kernels launched without Python in between), and a
    pointwise result of more than 4 operations stored once rather than recomputed where it is read. Why
    the second: at one query row inductor turns attention's q k^T into a reduction over the cached
    positions and inlined the rotary embedding of q into it (cos and sin included), so every layer
    recomputed q's rotation for each of the ~140 positions: 17 us of its attention kernel a layer in
    SmolLM2. Stored once: 0.3-0.6 ms off a 7-11 ms FFN-free or sparse token (fp32, one same-process run
    of each of two orders; the same tokens)."""
    return {"cpp_wrapper": True, "realize_opcount_threshold": 4}


def _own_code(method):
    """`method` called through a function with a code object of its own. Dynamo keeps compiled graphs per
    code object and, at every call, checks the guards of that object's graphs one after another: the
    decoders of several models sharing `_forward_step` would share one list (each model's graph a
    recompilation, eight at most), and every step would pay the guards of the graphs before its own."""
    namespace = {}
    exec(
        compile("def step(token, position):\n    return method(token, position)\n", "<GreedyDecoder step>", "exec"),
        {"method": method},
        namespace,
    )
    return namespace["step"]


class GreedyDecoder:
    """Greedy decoding of one sequence (batch 1) with a static cache of `max_len` positions.

    `attention` is set on the model as its attention implementation (default "eager"; None leaves the
    model's own): at one query row, PyTorch's fused CPU attention (sdpa) costs more than the two small
    products and the softmax that eager attention compiles into the step. The model keeps that setting,
    like the eval mode the decoder also puts it in.

    `prompt_attention="sdpa"` runs the prompt with sdpa where the model has it: eager attention there is
    two bmm calls a layer, and a bf16 bmm on a CPU without native bf16 took 2.5 ms each (SmolLM2 at int8,
    a 41-token prompt on an AVX2 EPYC: 290-370 ms eager, 140-170 ms sdpa). In bf16 its rounding differs
    from eager attention's (max |dlogit| 0.03-0.05 on a tiny model), so where two tokens nearly tie the
    tokens can differ from generate's; by default the prompt runs as generate runs it. A model without sdpa,
    or `attention=None`, runs its prompt as its steps.

    `native=False` keeps the compiled step where the one-call step could run (to compare the two)."""

    def __init__(
        self,
        model,
        max_len: int,
        compiled: bool = True,
        attention: str | None = "eager",
        prompt_attention: str | None = None,
        native: bool = True,
    ):
        settable = hasattr(model, "set_attn_implementation")
        if attention is not None and settable:
            model.set_attn_implementation(attention)
        self.model = model.eval()
        self.max_len = max_len
        self._attention_set = attention
        self._prompt_attention = None
        if prompt_attention is not None and attention is not None and settable:
            try:  # what the model supports: transformers refuses an implementation it lacks
                model.set_attn_implementation(prompt_attention)
                self._prompt_attention = prompt_attention
            except (ValueError, ImportError):
                pass
            finally:
                model.set_attn_implementation(attention)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.compiled = compiled
        self._step = (
            torch.compile(_own_code(self._forward_step), dynamic=False, options=compile_options())
            if compiled
            else self._forward_step
        )
        self._warm = False  # compiled: a first generate() has compiled the step
        self.native, self.native_refusal = None, None if native and compiled else "not asked for"
        if native and compiled:
            try:
                self.native = NativeStep(model, max_len)
            except Unsupported as exc:  # the compiled step instead
                self.native_refusal = str(exc)

    def _forward_step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The next token after `ids` [1, n] at `positions` [n], the cache filled with them: a step (n = 1,
        compiled) or the prompt (uncompiled). Only the last position's logits are made: the LM head at one row."""
        out = self.model(
            input_ids=ids,
            past_key_values=self.cache,
            cache_position=positions,
            position_ids=positions[None],
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """The `new_tokens` greedy tokens after the prompt ids [1, n], as a [new_tokens] tensor."""
        n = ids.shape[1]
        if ids.shape[0] != 1 or n + new_tokens > self.max_len:
            raise ValueError(
                f"GreedyDecoder: one prompt of at most {self.max_len - new_tokens} tokens "
                f"(got {tuple(ids.shape)} for {new_tokens} new tokens)"
            )
        self.cache.reset()
        with self._attention(self._prompt_attention):
            token = self._forward_step(ids, torch.arange(n))
        if self.native is not None:  # one call of the kernels a token
            self.native.bind(self.cache)
            tokens = [int(token)]
            for i in range(n, n + new_tokens - 1):
                tokens.append(self.native(tokens[-1], i))
            return torch.tensor(tokens)
        tokens = [token]
        with self._stance():
            for i in range(n, n + new_tokens - 1):
                token = self._step(token, torch.tensor([i]))
                tokens.append(token)
        self._warm = self.compiled
        return torch.cat(tokens, dim=1)[0]

    @contextlib.contextmanager
    def _attention(self, implementation: str | None):
        """The model's attention set to `implementation` (None: left as it is) for a block, then back to the
        decoder's own: the compiled step was traced with that, and its guards are not checked again."""
        if implementation is None:
            yield
            return
        self.model.set_attn_implementation(implementation)
        try:
            yield
        finally:
            self.model.set_attn_implementation(self._attention_set)

    def _stance(self):
        """Once the step is compiled, call it without re-checking its guards: every step passes the same
        model, cache and shapes, and checking them cost ~0.7-0.9 ms a token (SmolLM2: 5-10 % of a step).
        So a decoder runs the graph it compiled: after changing the model, make a new decoder."""
        if not self._warm:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    def tokens_per_second(self, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
        """Decoding rate of one run (the prompt's forward included, as generate's rate includes it)."""
        t0 = time.perf_counter()
        out = self.generate(ids, new_tokens)
        return new_tokens / (time.perf_counter() - t0), out
