// The bank-sparse FFN kernel registered as the PyTorch operator upcycle::bank_sparse_ffn.
//
// Why an operator registered here rather than from Python: under torch.compile (inductor, C++ wrapper)
// a compiled graph calls an operator through the dispatcher; an operator whose kernel is Python costs a
// trip back into the interpreter (GIL, tensor wrapping, the custom-op machinery: ~25-50 us a call, 30
// calls a token in SmolLM2), one registered here costs a few microseconds. Written against torch's
// stable C ABI (torch/csrc/stable), so it builds in seconds and needs only torch's headers.
//
// Schema: bank_sparse_ffn(x [T, H], packed [I, 3, H] (gate, up, down^T rows of each channel side by
// side; fp32, bf16 or int8, told apart by the element size; or [I, 3, H/2] int4 codes, told by the size),
// row_scales ([I, 3] fp32 for int8, [I, 3, H/32] fp16 for int4, else empty), pred_down [r, H], pred_up
// [I, r], pred_bias [I], bank, keep, gate) -> [T, H]; x fp32, CPU.
// bank_sparse_ffn_shadow(x, packed, row_scales, codes [I/16, 2, H BITS/32, 64] uint8 (BITS = 4 or 2: from the size),
// scales [I/16, 2, H/G, 16], group, bank, keep, gate):
// the same with a shadow predictor (see bank_sparse_ffn.cpp).
// row_dots(x [T, K] fp32, w [N, K] fp32, bf16 or int8 or [N, K/2] int4 codes, row_scales [N] fp32 for int8,
// [N, K/32] fp16 for int4, else empty) -> [T, N] fp32: x w^T (times the row scales), for the dense layers
// at a few rows (see row_dots).

#include "bank_sparse_ffn.cpp"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

namespace {

using torch::stable::Tensor;

const float* floats(const Tensor& t) { return static_cast<const float*>(t.data_ptr()); }

// The packed weights' part of the struct: rows from the packed copy, its type from its element size (and
// int4 from its last dimension, half the hidden size x has).
void packed_weights(const Tensor& packed, const Tensor& row_scales, int64_t hidden, FFNWeights& w) {
    const int64_t size = static_cast<int64_t>(packed.element_size());
    const bool int4 = size == 1 && 2 * packed.size(2) == hidden;
    STD_TORCH_CHECK(int4 || packed.size(2) == hidden, "bank_sparse_ffn: x must be [T, H] and packed [I, 3, H] (int4: [I, 3, H/2])");
    STD_TORCH_CHECK(size == 4 || size == 2 || size == 1, "bank_sparse_ffn: packed weights must be fp32, bf16, int8 or int4");
    STD_TORCH_CHECK(size != 1 || int4 || (row_scales.numel() == 3 * packed.size(0) && row_scales.is_contiguous()),
                    "bank_sparse_ffn: int8 weights need row_scales [I, 3]");
    const bool minimums = int4 && row_scales.numel() == 3 * packed.size(0) * hidden / 16;
    STD_TORCH_CHECK(!int4 || ((row_scales.numel() == 3 * packed.size(0) * hidden / 32 || minimums) && row_scales.element_size() == 2 &&
                              row_scales.is_contiguous()),
                    "bank_sparse_ffn: int4 weights need fp16 row_scales [I, 3, H/32] (with minimums: [I, 3, H/16])");
    const char* base = static_cast<const char*>(packed.data_ptr());
    const int64_t row = int4 ? hidden / 2 : hidden * size;
    w.w_gate = base, w.w_up = base + row, w.w_down_t = base + 2 * row;
    w.stride = int4 ? 3 * hidden / 2 : 3 * hidden, w.hidden = hidden, w.width = packed.size(0);
    w.weight_type = minimums ? 4 : int4 ? 3 : size == 4 ? 0 : size == 2 ? 1 : 2;
    w.row_scales = size == 1 ? row_scales.data_ptr() : nullptr;
}

Tensor bank_sparse_ffn(Tensor x, Tensor packed, Tensor row_scales, Tensor pred_down, Tensor pred_up, Tensor pred_bias, int64_t bank,
                       int64_t keep, int64_t gate) {
    STD_TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(1) == 3, "bank_sparse_ffn: x must be [T, H] and packed [I, 3, H]");
    STD_TORCH_CHECK(packed.is_contiguous() && pred_down.is_contiguous() && pred_up.is_contiguous() &&
                        pred_bias.is_contiguous(),
                    "bank_sparse_ffn: weights must be contiguous");
    if (!x.is_contiguous()) x = torch::stable::contiguous(x);
    Tensor out = torch::stable::empty_like(x);
    FFNWeights weights{floats(pred_down), floats(pred_up), floats(pred_bias), pred_down.size(0)};
    packed_weights(packed, row_scales, x.size(1), weights);
    const int code = upcycle_bank_sparse_ffn_f32(&weights, floats(x), x.size(0), nullptr, bank, keep,
                                                 static_cast<int>(gate), static_cast<float*>(out.data_ptr()));
    STD_TORCH_CHECK(code == 0, "bank-sparse kernel rejected its arguments (code ", code, ")");
    return out;
}

Tensor bank_sparse_ffn_shadow(Tensor x, Tensor packed, Tensor row_scales, Tensor codes, Tensor scales, int64_t group, int64_t bank,
                              int64_t keep, int64_t gate) {
    STD_TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(1) == 3 &&
                        (codes.numel() == packed.size(0) * x.size(1) || 2 * codes.numel() == packed.size(0) * x.size(1)) &&
                        scales.numel() * group == 2 * packed.size(0) * x.size(1),
                    "bank_sparse_ffn_shadow: x must be [T, H], packed [I, 3, H], codes I H or I H / 2 bytes, scales 2 I H / group");
    STD_TORCH_CHECK(packed.is_contiguous() && codes.is_contiguous() && scales.is_contiguous(),
                    "bank_sparse_ffn_shadow: weights must be contiguous");
    if (!x.is_contiguous()) x = torch::stable::contiguous(x);
    Tensor out = torch::stable::empty_like(x);
    FFNWeights weights{};
    packed_weights(packed, row_scales, x.size(1), weights);
    weights.shadow_codes = static_cast<const uint8_t*>(codes.data_ptr());
    weights.shadow_scales = floats(scales);
    weights.shadow_group = group;
    weights.shadow_bits = codes.numel() == packed.size(0) * x.size(1) ? 4 : 2;
    const int code = upcycle_bank_sparse_ffn_f32(&weights, floats(x), x.size(0), nullptr, bank, keep,
                                                 static_cast<int>(gate), static_cast<float*>(out.data_ptr()));
    STD_TORCH_CHECK(code == 0, "bank-sparse kernel rejected its arguments (code ", code, ")");
    return out;
}

Tensor row_dots_operator(Tensor x, Tensor w, Tensor row_scales) {
    const int64_t size = static_cast<int64_t>(w.element_size());
    const bool int4 = x.dim() == 2 && w.dim() == 2 && size == 1 && 2 * w.size(1) == x.size(1);
    STD_TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && (w.size(1) == x.size(1) || int4),
                    "row_dots: x must be [T, K] and w [N, K] (int4: [N, K/2])");
    STD_TORCH_CHECK(w.is_contiguous() && (size == 4 || size == 2 || size == 1), "row_dots: w must be contiguous fp32, bf16, int8 or int4");
    STD_TORCH_CHECK(size != 1 || int4 || (row_scales.numel() == w.size(0) && row_scales.is_contiguous()),
                    "row_dots: int8 weights need row_scales [N]");
    const bool minimums = int4 && row_scales.numel() == w.size(0) * x.size(1) / 16;
    STD_TORCH_CHECK(!int4 || ((row_scales.numel() == w.size(0) * x.size(1) / 32 || minimums) && row_scales.element_size() == 2 &&
                              row_scales.is_contiguous()),
                    "row_dots: int4 weights need fp16 row_scales [N, K/32] (with minimums: [N, K/16])");
    if (!x.is_contiguous()) x = torch::stable::contiguous(x);
    const int64_t shape[2] = {x.size(0), w.size(0)};
    Tensor out = torch::stable::new_empty(x, torch::headeronly::IntHeaderOnlyArrayRef(shape, 2));
    const int code = upcycle_row_dots(w.data_ptr(), minimums ? 4 : int4 ? 3 : size == 4 ? 0 : size == 2 ? 1 : 2, size == 1 ? row_scales.data_ptr() : nullptr,
                                      floats(x), x.size(0), w.size(0), x.size(1), static_cast<float*>(out.data_ptr()));
    STD_TORCH_CHECK(code == 0, "row_dots rejected its arguments (code ", code, ")");
    return out;
}

}  // namespace

STABLE_TORCH_LIBRARY(upcycle, m) {
    m.def("bank_sparse_ffn(Tensor x, Tensor packed, Tensor row_scales, Tensor pred_down, Tensor pred_up, Tensor pred_bias, "
          "int bank, int keep, int gate) -> Tensor");
    m.def("bank_sparse_ffn_shadow(Tensor x, Tensor packed, Tensor row_scales, Tensor codes, Tensor scales, int group, "
          "int bank, int keep, int gate) -> Tensor");
    m.def("row_dots(Tensor x, Tensor w, Tensor row_scales) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(upcycle, CPU, m) {
    m.impl("bank_sparse_ffn", TORCH_BOX(&bank_sparse_ffn));
    m.impl("bank_sparse_ffn_shadow", TORCH_BOX(&bank_sparse_ffn_shadow));
    m.impl("row_dots", TORCH_BOX(&row_dots_operator));
}
