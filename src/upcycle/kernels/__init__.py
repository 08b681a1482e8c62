"""Fast CPU inference for bank-sparse FFNs: read only the kept channels' weights.

`BankSparseFFN.forward` calls `sparse_ffn_forward` first; it returns None wherever the fast path does
not apply (training mode, a gradient wanted, not CPU fp32 or bf16, an activation other than SiLU, oracle or
threshold selection, the extension unavailable, more than MAX_TOKENS rows, or a batch for which the
masked dense reference measured faster) and the module then runs its reference computation.

The packed copy holds the FFN's weights in their own precision — fp32, or bf16 for a bf16 model — or
as int8 codes with one fp32 scale per row, or int4 codes with an fp16 scale per group of 32 (Q4_0's),
where the module is marked for int8 or int4 (`upcycle.infer.precision.to_precision(model, "int8")` puts
its weights on that grid first, so the reference computes with the very values the kernel reads; at int4
the kernel's gate and up dots also read the token at 8 bits per group of 32, as llama.cpp's Q4_0 does).
Activations enter and leave the kernel in fp32 (a bf16 model's rows are widened and the output narrowed
around it).

Switches: the environment variable UPCYCLE_KERNELS=off, or `with upcycle.kernels.disabled():`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time

import torch

from upcycle.kernels.build import FFNWeights, load, load_operator, why_no_operator, why_unavailable
from upcycle.kernels.memory import huge_page_copy
from upcycle.kernels.quant import dequantize_int4, int4_fits, int4_rows, int4a_rows, quantize_groups

GATE_CODES = {"hard": 0, "sigmoid": 1, "softmax": 2}
MAX_TOKENS = 64  # beyond this many rows (prefill), dense matrix products win; nothing to measure
_enabled = os.environ.get("UPCYCLE_KERNELS", "auto").lower() not in ("off", "0", "false", "no")
_kernel_faster: dict[tuple, bool] = {}  # (rows, hidden, width, bank, keep) -> measured once


def available() -> bool:
    return load() is not None


def enabled() -> bool:
    return _enabled and available()


@contextlib.contextmanager
def disabled():
    """Run the reference (masked dense) computation inside this block."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def _weights(module) -> tuple[torch.Tensor, ...]:
    """The tensors a plan is built from (the module's kernel_weights(): gate, up, down and a low-rank
    predictor's down, up, bias); a plan is current while they are the same tensors, unchanged."""
    return module.kernel_weights()


def _state(tensors) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in tensors)


# the kernel's codes for a packed copy's element type: int4 codes are bytes of two (uint8); int4 codes with
# a minimum per group as well (int4a) are type 4, told apart by their scales (weight_type)
WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.uint8: 3}


def weight_type(codes: torch.Tensor, scales: torch.Tensor) -> int:
    """The kernel's weight type of stored rows: int4 rows whose scales hold a minimum per group too (two
    fp16 per 32 weights: int4a_rows) are type 4."""
    if codes.dtype == torch.uint8 and scales.shape[-1] * 16 == 2 * codes.shape[-1]:
        return 4
    return WEIGHT_TYPES[codes.dtype]


NO_SCALES = torch.empty(0)  # the row scales of a packed copy that has none (fp32, bf16)


def _ffn_struct(
    packed: torch.Tensor,
    row_scales: torch.Tensor = NO_SCALES,
    pred_down: torch.Tensor | None = None,
    pred_up: torch.Tensor | None = None,
    pred_bias: torch.Tensor | None = None,
) -> FFNWeights:
    """The struct the kernel reads: raw pointers into a packed [width, 3, hidden] copy (fp32, bf16, or
    int8 with row scales [width, 3]; int4: [width, 3, hidden / 2] codes with fp16 scales [width, 3,
    hidden / 32]) and the low-rank predictor (null pointers without one: the caller passes the logits, or
    the shadow fields are filled in after)."""
    width, hidden = packed.shape[0], packed_hidden(packed)
    row = packed.shape[2] * packed.element_size()  # bytes
    base = packed.data_ptr()
    pointers = [t.data_ptr() if t is not None else None for t in (pred_down, pred_up, pred_bias)]
    rank = pred_down.shape[0] if pred_down is not None else 0
    stride = 3 * packed.shape[2]  # elements of the weight type (int4: bytes)
    weights = FFNWeights(*pointers, rank, base, base + row, base + 2 * row, stride, hidden, width)
    weights.weight_type = weight_type(packed, row_scales)
    weights.row_scales = row_scales.data_ptr() if packed.dtype in (torch.int8, torch.uint8) else None
    return weights


def packed_hidden(packed: torch.Tensor) -> int:
    """The hidden size of a packed copy [width, 3, ...]: int4 codes hold two weights a byte."""
    return packed.shape[2] * (2 if packed.dtype == torch.uint8 else 1)


def int8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row along the last axis and one fp32 scale per row (max |row| /
    127; 1 for an all-zero row): rows ≈ codes * scales[..., None]. The shadow's quantizer with one
    group per row."""
    flat = rows.reshape(-1, rows.shape[-1])
    codes, scales = quantize_groups(flat, 8, flat.shape[1])
    return codes.reshape(rows.shape), scales.reshape(rows.shape[:-1])


# the stored precisions that are codes and scales, each by its quantizer (RowLinear's and the packed copy's)
QUANTIZERS = {"int8": int8_rows, "int4": int4_rows, "int4a": int4a_rows}


def pack_ffn(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, precision: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[width, 3, hidden] rows W_gate[j], W_up[j], W_down^T[j] in the weights' own dtype, or as int8 with
    [width, 3] row scales, or int4 codes [width, 3, hidden / 2] with fp16 scales [width, 3, hidden / 32],
    for `precision` int8 or int4 (a module's kernel_precision)."""
    rows = torch.stack([gate, up, down.t()], dim=1)
    quantizer = QUANTIZERS.get(precision)
    if quantizer is not None:
        codes, scales = quantizer(rows)
        return huge_page_copy(codes), scales.contiguous()
    return huge_page_copy(rows), NO_SCALES


class KernelPlan:
    """One module prepared for the kernel: its weights packed so that a kept channel j is one
    contiguous read (rows W_gate[j], W_up[j], W_down^T[j] side by side: [width, 3, hidden]), and the
    struct the kernel reads. The pack is an inference copy (the FFN weights once more in memory),
    rebuilt when a weight is replaced or changed in place; `release(model)` frees it. A module made lean
    for inference (upcycle.infer.lean_ffn) holds a pack as its only weights: the plan reads that one."""

    def __init__(self, module):
        self.tensors = _weights(module)
        self.state = _state(self.tensors)
        self.precision = getattr(module, "kernel_precision", None)
        pack = module.kernel_pack  # a lean module's pack is its weights (upcycle.infer.lean_ffn)
        n = 3 if pack is None else 2  # gate, up, down; or the pack's codes and scales
        ffn, predictor = self.tensors[:n], [t.detach() for t in self.tensors[n:]]
        silu = type(module.act_fn).__name__ in ("SiLU", "SiLUActivation")
        floats = (torch.float32, torch.bfloat16)
        floating = all(t.dtype in floats for t in (predictor if pack is not None else self.tensors))
        cpu = floating and all(t.device.type == "cpu" for t in self.tensors)
        self.hidden = packed_hidden(pack.codes) if pack is not None else ffn[0].shape[1]
        fits = self.precision not in ("int4", "int4a") or int4_fits(self.hidden)
        self.usable = silu and cpu and fits
        if not self.usable:
            return
        operator_kind()  # registered before any compiled graph can ask for it
        if pack is not None:
            self.packed, self.row_scales = pack.codes, pack.scales
        else:
            self.packed, self.row_scales = pack_ffn(*(t.detach() for t in ffn), self.precision)
        self.predictor = [t.float().contiguous() for t in predictor]  # empty for a shadow predictor
        self.struct = _ffn_struct(self.packed, self.row_scales, *self.predictor)
        self.shadow = _packed_shadow(module) if not self.predictor else None
        if self.shadow is not None:
            codes, scales, group = self.shadow
            self.struct.shadow_codes, self.struct.shadow_scales, self.struct.shadow_group = (
                codes.data_ptr(),
                scales.data_ptr(),
                group,
            )
            self.struct.shadow_bits = _stored_bits(codes, self.packed)
        self.ref = ctypes.byref(self.struct)

    def __reduce__(self):  # a copied or pickled module gets no plan (raw pointers); it rebuilds its own
        return (type(None), ())

    def current(self, module) -> bool:
        tensors = _weights(module)
        return (
            all(a is b for a, b in zip(tensors, self.tensors))
            and _state(tensors) == self.state
            and getattr(module, "kernel_precision", None) == self.precision
        )


SHADOW_LANES = 16  # channels the kernel scores at once (one fp32 vector)


def container_bits(bits: int) -> int:
    """The width the kernel stores a `bits`-bit shadow code in: 2 bits as 2, 3 and 4 bits as 4."""
    return 2 if bits == 2 else 4


def pack_shadow(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Doubled midrise codes [I, H] (odd, |code| < 2^b for b <= B = `bits`, 4 or 2: the container;
    kernels.quant) -> uint8 [I/16, H B/32, 64] as the kernel reads them: per block of 16 channels
    and run o of R = 32/B inputs, byte 4c + k holds channel c's input R o + 4f + k in its B-bit field f,
    each as the level index (code + 2^B - 1) / 2, so that the kernel's level - (2^B - 1) / 2 is code / 2."""
    width, hidden = codes.shape
    fields = 8 // bits
    biased = ((codes.to(torch.int16) + 2**bits - 1) // 2).to(torch.uint8)
    biased = biased.reshape(width // SHADOW_LANES, SHADOW_LANES, hidden // (4 * fields), fields, 4)
    runs = biased[..., 0, :].clone()  # [blocks, channel, run, 4]
    for f in range(1, fields):
        runs |= biased[..., f, :] << (f * bits)
    return runs.permute(0, 2, 1, 3).reshape(width // SHADOW_LANES, -1, 4 * SHADOW_LANES).contiguous()


def pack_shadow_scales(scales: torch.Tensor) -> torch.Tensor:
    """fp32 scales [I, H/G] (of the doubled codes) -> steps [I/16, H/G, 16]: per group, a block's 16
    channels side by side, each twice its scale (the kernel's levels are whole steps apart)."""
    width, groups = scales.shape
    return (2 * scales.float()).reshape(width // SHADOW_LANES, SHADOW_LANES, groups).transpose(1, 2).contiguous()


def _packed_shadow(module) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """A shadow predictor's copies as the kernel reads them (codes [I/16, 2, H B/32, 64], scales
    [I/16, 2, H/G, 16]), or None where it cannot (more than 4 bits, a group that is not a multiple of a
    run, a bank that is not a multiple of 16 channels): then the logits are computed in PyTorch."""
    shadow = module.predictor
    hidden = module.gate_proj.in_features
    bits = container_bits(shadow.bits)
    if shadow.bits > 4 or shadow.group % (32 // bits) or hidden % shadow.group or module.sparsity.bank % SHADOW_LANES:
        return None
    module.refresh_shadow()
    # on huge pages like the packed weights: at 7B the codes are 76 MB streamed every token
    codes = huge_page_copy(torch.stack([pack_shadow(c, bits) for c in shadow.codes], dim=1))
    scales = huge_page_copy(torch.stack([pack_shadow_scales(s) for s in shadow.scales], dim=1))
    return codes, scales, shadow.group


def _stored_bits(codes: torch.Tensor, packed: torch.Tensor) -> int:
    """4 or 2: read off the packed codes' size (2 copies of I x H codes)."""
    return 8 * codes.numel() // (2 * packed.shape[0] * packed_hidden(packed))


def plan_for(module) -> KernelPlan:
    plan = module.__dict__.get("_kernel_plan")  # None also after copy.deepcopy
    if plan is None or not plan.current(module):
        plan = module.__dict__["_kernel_plan"] = KernelPlan(module)
    return plan


def release(model) -> None:
    """Free the packed inference copies held by a model's bank-sparse FFNs."""
    for module in model.modules():
        module.__dict__.pop("_kernel_plan", None)


def run_kernel(module, x: torch.Tensor, z: torch.Tensor | None = None, plan: KernelPlan | None = None) -> torch.Tensor:
    """The bank-sparse FFN of rows x [..., H] by the compiled kernel (z: the predictor logits [T, I],
    or None to compute them in the kernel)."""
    plan = plan or plan_for(module)
    if z is None and not plan.predictor and plan.shadow is None:  # a shadow the kernel cannot read (> 4 bits)
        z = module.logits(x.reshape(-1, x.shape[-1]))
    return _launch(plan.ref, x, z, module.sparsity.bank, module.keep, GATE_CODES[module.sparsity.gate])


def _launch(weights_ref, x: torch.Tensor, z: torch.Tensor | None, bank: int, keep: int, gate: int) -> torch.Tensor:
    """One call of the C kernel on rows x [..., H] (logits z [T, I], or None: computed in the kernel); the
    output has x's shape and dtype (a bf16 x is widened to fp32 for the kernel and its output narrowed).
    No reshapes: at batch 1 every tensor operation around the kernel costs microseconds (the kernel has
    just streamed megabytes of weights through the caches)."""
    if x.dtype is not torch.float32:
        return _launch(weights_ref, x.float(), z, bank, keep, gate).to(x.dtype)
    if not x.is_contiguous():
        x = x.contiguous()
    if z is not None and (z.dtype is not torch.float32 or not z.is_contiguous()):
        z = z.float().contiguous()
    out = torch.empty_like(x)
    code = load().upcycle_bank_sparse_ffn_f32(
        weights_ref,
        x.data_ptr(),
        x.numel() // x.shape[-1],
        None if z is None else z.data_ptr(),
        bank,
        keep,
        gate,
        out.data_ptr(),
    )
    if code != 0:
        raise RuntimeError(f"bank-sparse kernel rejected its arguments (code {code})")
    return out


def _shape_key(module, rows: int, plan: KernelPlan) -> tuple:
    return (rows, plan.hidden, plan.packed.shape[0], plan.packed.dtype, module.sparsity.bank, module.keep)


def _kernel_wins(module, x2d: torch.Tensor, plan: KernelPlan) -> bool:
    """Measured once per shape: the kernel or the masked dense reference, whichever is faster here."""
    key = _shape_key(module, x2d.shape[0], plan)
    if key not in _kernel_faster:
        kernel, dense = [], []
        for _ in range(5):  # alternate, take medians: one noisy sample decides nothing
            t0 = time.perf_counter()
            run_kernel(module, x2d, plan=plan)
            kernel.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            module.reference_forward(x2d)
            dense.append(time.perf_counter() - t0)
        _kernel_faster[key] = sorted(kernel)[2] <= sorted(dense)[2]
    return _kernel_faster[key]


# Under torch.compile the kernel is one opaque operator, upcycle::bank_sparse_ffn: the graph around it
# (norms, attention, residuals) is compiled, and the call reaches the same C function. Tensors in, tensor
# out, so the compiled code keeps no raw pointers. The operator is registered in C++ where it can be
# built (build.load_operator: no Python between the compiled graph and the kernel), else in Python.
_operator_kind: str | None = None


def _python_operator(
    x: torch.Tensor,
    packed: torch.Tensor,
    row_scales: torch.Tensor,
    pred_down: torch.Tensor,
    pred_up: torch.Tensor,
    pred_bias: torch.Tensor,
    bank: int,
    keep: int,
    gate: int,
) -> torch.Tensor:
    """The operator's kernel where the C++ registration cannot be built: the C function via ctypes."""
    return _launch(
        ctypes.byref(_ffn_struct(packed, row_scales, pred_down, pred_up, pred_bias)), x, None, bank, keep, gate
    )


def _python_shadow_operator(
    x: torch.Tensor,
    packed: torch.Tensor,
    row_scales: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    group: int,
    bank: int,
    keep: int,
    gate: int,
) -> torch.Tensor:
    """upcycle::bank_sparse_ffn_shadow where the C++ registration cannot be built."""
    weights = _ffn_struct(packed, row_scales)
    weights.shadow_codes, weights.shadow_scales, weights.shadow_group = codes.data_ptr(), scales.data_ptr(), group
    weights.shadow_bits = _stored_bits(codes, packed)
    return _launch(ctypes.byref(weights), x, None, bank, keep, gate)


def _python_row_dots(x: torch.Tensor, w: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
    """upcycle::row_dots where the C++ registration cannot be built: the C function via ctypes."""
    x = x.contiguous()
    out = x.new_empty(x.shape[0], w.shape[0])
    scales = row_scales.data_ptr() if w.dtype in (torch.int8, torch.uint8) else None
    code = load().upcycle_row_dots(
        w.data_ptr(),
        weight_type(w, row_scales),
        scales,
        x.data_ptr(),
        x.shape[0],
        w.shape[0],
        x.shape[1],
        out.data_ptr(),
    )
    if code != 0:
        raise RuntimeError(f"row_dots rejected its arguments (code {code})")
    return out


def operator_kind() -> str:
    """Register upcycle::bank_sparse_ffn (and _shadow, and row_dots) once and say how: "C++" or "Python"."""
    global _operator_kind
    if _operator_kind is None:
        if load_operator():
            _operator_kind = "C++"
        else:
            torch.library.custom_op("upcycle::bank_sparse_ffn", mutates_args=())(_python_operator)
            torch.library.custom_op("upcycle::bank_sparse_ffn_shadow", mutates_args=())(_python_shadow_operator)
            torch.library.custom_op("upcycle::row_dots", mutates_args=())(_python_row_dots)
            _operator_kind = "Python"
        for name in ("upcycle::bank_sparse_ffn", "upcycle::bank_sparse_ffn_shadow"):
            torch.library.register_fake(name)(lambda x, *weights_and_sizes: torch.empty_like(x))
        torch.library.register_fake("upcycle::row_dots")(lambda x, w, row_scales: x.new_empty(x.shape[0], w.shape[0]))
    return _operator_kind


def _compiled_forward(module, x: torch.Tensor) -> torch.Tensor | None:
    """What torch.compile traces: the kernel operator where an eager call has already built the plan
    (and, for several rows, measured the kernel faster); otherwise None (the reference is traced)."""
    plan = module.__dict__.get("_kernel_plan")
    if (
        plan is None
        or not plan.usable
        or not (plan.predictor or plan.shadow)
        or module.training
        or x.dtype not in (torch.float32, torch.bfloat16)
        or x.device.type != "cpu"
    ):
        return None
    x2d = x.reshape(-1, x.shape[-1])
    rows = x2d.shape[0]
    if rows > MAX_TOKENS or (rows > 1 and not _kernel_faster.get(_shape_key(module, rows, plan), False)):
        return None
    sizes = (module.sparsity.bank, module.keep, GATE_CODES[module.sparsity.gate])
    x32 = x2d.float()  # the kernel's activations are fp32; inductor fuses the casts into the ops around
    if plan.shadow is not None:
        out = torch.ops.upcycle.bank_sparse_ffn_shadow(x32, plan.packed, plan.row_scales, *plan.shadow, *sizes)
    else:
        out = torch.ops.upcycle.bank_sparse_ffn(x32, plan.packed, plan.row_scales, *plan.predictor, *sizes)
    return out.to(x.dtype).reshape(x.shape)


def sparse_ffn_forward(module, x: torch.Tensor) -> torch.Tensor | None:
    """The fast path's output for x [..., H], or None where the reference must run. The cheap refusals
    come first, and the common case (eval, batch 1, a current plan) does no tensor operation but the
    output's allocation."""
    if not _enabled or module.training:
        return None
    if torch.compiler.is_compiling():
        return _compiled_forward(module, x) if module.sparsity.selection == "predictor" else None
    if module.sparsity.selection != "predictor":
        return None
    if torch.is_grad_enabled() and (x.requires_grad or module.kernel_weights()[0].requires_grad):
        return None
    if x.dtype not in (torch.float32, torch.bfloat16) or not x.is_cpu or not available():
        return None
    plan = plan_for(module)
    if not plan.usable:
        return None
    rows = x.numel() // x.shape[-1]
    if rows > MAX_TOKENS or (rows > 1 and not _kernel_wins(module, x.reshape(rows, x.shape[-1]), plan)):
        return None
    return run_kernel(module, x, plan=plan)


__all__ = [
    "available",
    "dequantize_int4",
    "int4_fits",
    "int4_rows",
    "QUANTIZERS",
    "enabled",
    "disabled",
    "pack_ffn",
    "plan_for",
    "release",
    "run_kernel",
    "sparse_ffn_forward",
    "why_unavailable",
    "why_no_operator",
    "operator_kind",
    "load",
    "KernelPlan",
    "MAX_TOKENS",
]
