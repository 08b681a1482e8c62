// One whole decoding step of a Llama-shaped model (Qwen3's per-head q/k norms included) (batch 1, one token) in one call: embed, for every
// layer RMSNorm -> q k v rows -> rotary -> attention against the cache -> o rows -> residual -> RMSNorm ->
// FFN (dense rows or the bank-sparse kernel) -> residual, then the final norm, the LM head's rows and argmax.
//
// Why: a step of SmolLM2 at int8 spent ~12 ms in the row dots and ~5 ms around them when torch.compile ran
// it (inductor's small kernels for norms, rotary and attention ~3.5 ms; TorchDynamo's lookup and the
// graph's inputs ~2.2 ms; torch profiler, 63 steps). Here everything between the row dots is a few
// microseconds of plain loops, and the only Python per token is the call.
//
// What it computes is what the model's own forward computes, in fp32 with the activations rounded to bf16
// at the boundaries where a bf16 model's tensors are (`bf16_activations`): each norm's output, the rows'
// outputs, rotary q and k, the cache, attention's probabilities and output, each residual sum, the FFN's
// product and output, the logits. Inside each operation the arithmetic is fp32, as inductor runs it.
//
// The weights are the model's own tensors (no copy): the rows as upcycle_row_dots reads them, the
// bank-sparse FFNs through their FFNWeights, the cache the model's static cache (fp32 or bf16), the
// rotary table the model's own cos / sin for every position.

extern "C" {

// A matrix of rows as upcycle_row_dots reads it (w [n, k] of `type`; `scales` as it wants them), and an
// optional fp32 bias [n].
struct DecodeRows {
    const void* w;
    int64_t type;
    const void* scales;
    const float* bias;
    int64_t n, k;
};

struct DecodeLayer {
    const float* input_norm;  // fp32 [H]
    const float* post_norm;   // fp32 [H]
    DecodeRows qkv;           // q, k and v stacked: n = (heads + 2 kv_heads) head_dim
    const float* q_norm;      // fp32 [head_dim]: each head of q and of k RMSNormed before the rotary
    const float* k_norm;      // (Qwen3), or null
    DecodeRows o;             // [H, heads head_dim]
    DecodeRows gate_up;       // a dense FFN: gate and up stacked [2 I, H] (w null for a sparse FFN; both
                              // null: no FFN, the residual stream passes through)
    DecodeRows down;          // [H, I]
    const FFNWeights* sparse; // a bank-sparse FFN (null for a dense one)
    int64_t bank, keep, gate;
    void* keys;    // the cache: [kv_heads, max_len, head_dim], fp32 or bf16 (cache_bf16)
    void* values;
};

struct DecodePlan {
    int64_t layers, hidden, heads, kv_heads, head_dim, max_len, vocab, ffn_width;
    float eps, scaling;
    int64_t bf16_activations, cache_bf16, embed_bf16;
    const void* embed;       // [vocab, H] fp32 or bf16
    const float* cos;        // [max_len, head_dim]
    const float* sin;
    const float* final_norm; // fp32 [H]
    DecodeRows head;         // [vocab, H]
    const DecodeLayer* layer;
    float* scratch;          // upcycle_decode_scratch(plan) floats
};

}  // extern "C"

namespace {

// fp32 -> the nearest bf16 (ties to even), back as fp32: what storing a value in a bf16 tensor does.
inline float bf16_round(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    if ((bits & 0x7f800000u) != 0x7f800000u) bits += 0x7fffu + ((bits >> 16) & 1u);
    bits &= 0xffff0000u;
    float r;
    std::memcpy(&r, &bits, 4);
    return r;
}

inline void round_all(float* v, int64_t n, bool bf16) {
    if (bf16)
        for (int64_t i = 0; i < n; ++i) v[i] = bf16_round(v[i]);
}

inline int rows(const DecodeRows& r, const float* x, float* y, bool bf16) {
    const int code = upcycle_row_dots(r.w, r.type, r.scales, x, 1, r.n, r.k, y);
    round_all(y, r.n, bf16);
    if (r.bias) {
        for (int64_t i = 0; i < r.n; ++i) y[i] += r.bias[i];
        round_all(y, r.n, bf16);
    }
    return code;
}

// Hugging Face's RMSNorm: x / rms(x) in fp32, stored in the activations' dtype, times the weight (out may be x).
inline void rms_norm(const float* x, const float* w, int64_t n, float eps, bool bf16, float* out) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float r = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
    for (int64_t i = 0; i < n; ++i) {
        const float v = bf16 ? bf16_round(x[i] * r) : x[i] * r;
        out[i] = bf16 ? bf16_round(w[i] * v) : w[i] * v;
    }
}

// rotate_half's rotary embedding of one head at one position: x cos + rotate_half(x) sin.
inline void rotary(float* x, const float* cos, const float* sin, int64_t d, bool bf16) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; ++i) {
        const float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
    round_all(x, d, bf16);
}

inline void store(void* cache, bool bf16, int64_t i, float v) {
    if (bf16) {
        const float r = bf16_round(v);
        uint32_t bits;
        std::memcpy(&bits, &r, 4);
        static_cast<bf16_t*>(cache)[i] = static_cast<bf16_t>(bits >> 16);
    } else {
        static_cast<float*>(cache)[i] = v;
    }
}

// Attention of every query head at position `pos` against the cache's positions 0..pos (grouped: query
// head h reads kv head h / (heads / kv_heads)); out [heads, head_dim].
void attend(const DecodePlan& p, const DecodeLayer& l, const float* q, int64_t pos, float* scores, float* out) {
    const int64_t d = p.head_dim, group = p.heads / p.kv_heads, L = p.max_len;
    const bool bf16 = p.bf16_activations, cbf16 = p.cache_bf16;
#pragma omp parallel for schedule(static)
    for (int64_t h = 0; h < p.heads; ++h) {
        const int64_t kv = h / group;
        float* s = scores + h * L;
        const float* qh = q + h * d;
        float top = -INFINITY;
        for (int64_t t = 0; t <= pos; ++t) {
            // a sum in any order (simd), as a matmul sums: in order, each add waits on the last (~1 ns), and
            // SmolLM2's 9 heads x ~100 positions x 64 a layer made that milliseconds a token
            float acc = 0.f;
            const int64_t base = (kv * L + t) * d;
            if (cbf16) {
                const bf16_t* k = static_cast<const bf16_t*>(l.keys) + base;
#pragma omp simd reduction(+ : acc)
                for (int64_t i = 0; i < d; ++i) acc += qh[i] * to_float(k[i]);
            } else {
                acc = dot(static_cast<const float*>(l.keys) + base, qh, d);
            }
            s[t] = bf16 ? bf16_round(bf16_round(acc) * p.scaling) : acc * p.scaling;
            top = std::max(top, s[t]);
        }
        float total = 0.f;
        for (int64_t t = 0; t <= pos; ++t) total += (s[t] = std::exp(s[t] - top));
        const float inv = 1.f / total;
        for (int64_t t = 0; t <= pos; ++t) s[t] = bf16 ? bf16_round(s[t] * inv) : s[t] * inv;
        float* o = out + h * d;
        for (int64_t i = 0; i < d; ++i) o[i] = 0.f;
        for (int64_t t = 0; t <= pos; ++t) {
            const int64_t base = (kv * L + t) * d;
            if (cbf16) {
                const bf16_t* v = static_cast<const bf16_t*>(l.values) + base;
                for (int64_t i = 0; i < d; ++i) o[i] += s[t] * to_float(v[i]);
            } else {
                const float* v = static_cast<const float*>(l.values) + base;
                for (int64_t i = 0; i < d; ++i) o[i] += s[t] * v[i];
            }
        }
        round_all(o, d, bf16);
    }
}

}  // namespace

extern "C" {

// Floats of scratch a plan's step uses (the logits last: the caller may read them there).
int64_t upcycle_decode_scratch(const DecodePlan* p) {
    const int64_t H = p->hidden, qkv = (p->heads + 2 * p->kv_heads) * p->head_dim;
    return 3 * H + qkv + p->heads * p->head_dim + p->heads * p->max_len + 2 * p->ffn_width + p->vocab;
}

// The next token after `token` at `position` (the cache holding positions 0..position-1), the cache filled
// at `position`; or a negative value on bad arguments (-10 - layer where a layer's rows or FFN refused).
int64_t upcycle_decode_step(const DecodePlan* p, int64_t token, int64_t position) {
    const int64_t H = p->hidden, d = p->head_dim, nq = p->heads * d, nkv = p->kv_heads * d;
    if (token < 0 || token >= p->vocab || position < 0 || position >= p->max_len || p->heads % p->kv_heads != 0 ||
        d % 2 != 0)
        return -1;
    const bool bf16 = p->bf16_activations, cbf16 = p->cache_bf16;
    float* x = p->scratch;  // the residual stream
    float* n = x + H;       // a norm's output
    float* t = n + H;       // a block's output
    float* qkv = t + H;
    float* att = qkv + nq + 2 * nkv;
    float* scores = att + nq;
    float* ffn = scores + p->heads * p->max_len;  // gate and up [2 I]
    float* logits = ffn + 2 * p->ffn_width;
    for (int64_t i = 0; i < H; ++i)
        x[i] = p->embed_bf16 ? to_float(static_cast<const bf16_t*>(p->embed)[token * H + i])
                             : static_cast<const float*>(p->embed)[token * H + i];
    const float* cos = p->cos + position * d;
    const float* sin = p->sin + position * d;
    for (int64_t li = 0; li < p->layers; ++li) {
        const DecodeLayer& l = p->layer[li];
        rms_norm(x, l.input_norm, H, p->eps, bf16, n);
        if (rows(l.qkv, n, qkv, bf16)) return -10 - li;
        float *q = qkv, *k = qkv + nq, *v = k + nkv;
        for (int64_t h = 0; l.q_norm && h < p->heads; ++h) rms_norm(q + h * d, l.q_norm, d, p->eps, bf16, q + h * d);
        for (int64_t h = 0; l.k_norm && h < p->kv_heads; ++h) rms_norm(k + h * d, l.k_norm, d, p->eps, bf16, k + h * d);
        for (int64_t h = 0; h < p->heads; ++h) rotary(q + h * d, cos, sin, d, bf16);
        for (int64_t h = 0; h < p->kv_heads; ++h) {
            rotary(k + h * d, cos, sin, d, bf16);
            for (int64_t i = 0; i < d; ++i) {
                store(l.keys, cbf16, (h * p->max_len + position) * d + i, k[h * d + i]);
                store(l.values, cbf16, (h * p->max_len + position) * d + i, v[h * d + i]);
            }
        }
        attend(*p, l, q, position, scores, att);
        if (rows(l.o, att, t, bf16)) return -10 - li;
        for (int64_t i = 0; i < H; ++i) x[i] = bf16 ? bf16_round(x[i] + t[i]) : x[i] + t[i];
        if (!l.sparse && !l.gate_up.w) continue;  // no FFN
        rms_norm(x, l.post_norm, H, p->eps, bf16, n);
        if (l.sparse) {
            if (upcycle_bank_sparse_ffn_f32(l.sparse, n, 1, nullptr, l.bank, l.keep, static_cast<int>(l.gate), t))
                return -10 - li;
            round_all(t, H, bf16);
        } else {
            if (rows(l.gate_up, n, ffn, bf16)) return -10 - li;
            const int64_t I = l.gate_up.n / 2;
            for (int64_t j = 0; j < I; ++j) {
                const float g = ffn[j];
                const float silu = bf16 ? bf16_round(g / (1.f + std::exp(-g))) : g / (1.f + std::exp(-g));
                ffn[j] = bf16 ? bf16_round(silu * ffn[I + j]) : silu * ffn[I + j];
            }
            if (rows(l.down, ffn, t, bf16)) return -10 - li;
        }
        for (int64_t i = 0; i < H; ++i) x[i] = bf16 ? bf16_round(x[i] + t[i]) : x[i] + t[i];
    }
    rms_norm(x, p->final_norm, H, p->eps, bf16, n);
    if (rows(p->head, n, logits, bf16)) return -2;
    int64_t best = 0;
    for (int64_t i = 1; i < p->vocab; ++i)
        if (logits[i] > logits[best]) best = i;  // the first of equal maxima, as torch.argmax
    return best;
}

}  // extern "C"
