// Bank-sparse SwiGLU FFN for CPU inference: read only the kept channels' weights.
//
// For T tokens (rows of x, T small: decoding), per token and bank of `bank` channels the `keep` channels
// with the largest predictor logits z are kept; the FFN output is
//     out[t] = sum over kept j of  s[t,j] * silu(W_gate[j] . x[t]) * (W_up[j] . x[t]) * W_down^T[j]
// where s is the gate value (1 for `hard`, sigmoid(z) for `sigmoid`, keep * softmax over the bank's
// kept logits for `softmax`), exactly as the masked dense reference in upcycle/modules/bank_sparse.py.
//
// Why it is fast: decoding is memory-bound, and every kept channel j needs three contiguous rows of H
// floats (W_gate[j], W_up[j] and W_down^T[j], the down projection stored transposed), so a token reads
// keep/bank of the FFN weights. The loop is channel-major: a channel kept by several tokens of the
// batch is read once and used for all of them, so a batch reads the union of its tokens' channels.
// Threads split the banks; each accumulates into its own output rows, summed at the end.
//
// The logits z come from the caller, from a low-rank predictor (z = (x A) B + c) or from a shadow: the
// FFN's own activation |silu(x̂ . Ĝ[j]) * (x̂ . Û[j])| from 2- or 4-bit copies of its gate and up rows (one
// fp32 scale per group of inputs), read at a sixteenth or an eighth of the fp32 bytes, against x̂, the token quantized to 8
// bits per group, so that the group dots are integer dot products (AVX-512 VNNI: 64 per instruction),
// computed 16 channels at a time (see shadow_block for the layout).
//
// The packed weights are fp32, bf16 or int8 (one fp32 scale per row: W[j] = scale[j] * code[j]); each is
// widened to fp32 in registers and every product and sum is fp32, so a narrower copy reads 1/2 or 1/4 of
// the bytes (decoding is memory-bound) and computes what fp32 arithmetic on the stored values gives. Or
// int4 with an fp16 scale per group of 32 (q4_rows.h): 0.14 of the fp32 bytes, the gate and up dots
// integer dot products against the token at 8 bits, as llama.cpp's Q4_0.
//
// Plain C ABI (called through ctypes with raw pointers, row-major, contiguous; activations fp32). OpenMP comes
// from the runtime torch has already loaded (same soname), so torch and this code share one pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>  // F16C's _cvtsh_ss too: a CPU with AVX2 and no AVX-512 (AMD EPYC) uses it
#endif

namespace {

inline float dot(const float* __restrict a, const float* __restrict x, int64_t n) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += a[i] * x[i];
    return acc;
}

// Into L1 (prefetcht0): on an AMD EPYC (AVX-512, 32 MB L3) the 30-layer cold stream of SmolLM2's sparse FFNs took
// 2.93 ms against 3.17 ms with prefetcht1 and 3.19 ms with no software prefetch (same process, 25 rounds).
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

// The weight types a packed copy may hold: fp32, bf16 (the upper half of an fp32, so widening is a
// shift) and int8 codes (the row's scale applied to the finished dot product or to h).
using bf16_t = uint16_t;
inline float to_float(float v) { return v; }
inline float to_float(bf16_t v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
inline float to_float(int8_t v) { return static_cast<float>(v); }

#if defined(__AVX2__)
// The sum of 8 fp32 lanes (the 256-bit integer paths use it on AVX-512 machines as well).
inline float hsum8(__m256 v) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#endif

// The fp32 vector the dense loops compute with: 16 lanes with AVX-512, 8 with AVX2 + FMA (AMD EPYC before
// Zen 4, most desktop CPUs), else none (scalar loops). vload widens a weight type to fp32 in registers.
#if defined(__AVX512F__)
#define UPCYCLE_VW 16
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float v) { return _mm512_set1_ps(v); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload(const bf16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline vf vload(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define UPCYCLE_VW 8
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float v) { return _mm256_set1_ps(v); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const bf16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline vf vload(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vf v) { return hsum8(v); }
#endif
#if defined(UPCYCLE_VW)
constexpr int VW = UPCYCLE_VW;
#endif

// Prefetch a cache line ahead in a row of W at element i (a multiple of 16): once per 64 bytes.
template <typename W>
inline void prefetch_line(const W* row, int64_t i) {
    if (i % (64 / static_cast<int64_t>(sizeof(W))) == 0) prefetch(row + i);
}

// The dot products of R weight rows with N token rows at once (out[r][k] = rows[r] . xs[k]), each weight
// element loaded once for all N tokens and each token element once for all R rows; the rows `next` (the
// next kept channels', the next block of dense rows) are prefetched a cache line per step, since the
// hardware prefetcher restarts at every row (the rows of kept channels are not adjacent). More rows at
// once keep more row streams in flight (see CHANNELS). Each row's sum is one accumulator chain over the
// row, whatever R and N, so its value does not depend on what it was computed together with.
template <int R, int N, typename W>
inline void block_dots(const W* const* rows, const float* const* xs, int64_t n, const W* const* next, float (*out)[N]) {
    int64_t i = 0;
#if defined(UPCYCLE_VW)
    vf acc[R][N];
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < N; ++k) acc[r][k] = vzero();
    for (; i + VW <= n; i += VW) {
        for (int r = 0; r < R; ++r) prefetch_line(next[r], i);
        vf xv[N];
        for (int k = 0; k < N; ++k) xv[k] = vload(xs[k] + i);
        for (int r = 0; r < R; ++r) {
            const vf wv = vload(rows[r] + i);
            for (int k = 0; k < N; ++k) acc[r][k] = vfmadd(wv, xv[k], acc[r][k]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < N; ++k) out[r][k] = vsum(acc[r][k]);
#else
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < N; ++k) out[r][k] = 0.f;
#endif
    for (; i < n; ++i)
        for (int r = 0; r < R; ++r)
            for (int k = 0; k < N; ++k) out[r][k] += to_float(rows[r][i]) * xs[k][i];
}

// acc[k] += h[r][k] * rows[r] for R weight rows (down^T rows) and N output rows: each weight element loaded
// once for all N outputs and each output element loaded and stored once for all R rows, the rows added in
// order r = 0, 1, ... (so R rows at once give bitwise what R calls of one row give); prefetches `next`.
template <int R, int N, typename W>
inline void block_axpys(const W* const* rows, float* const* acc, const float (*h)[N], int64_t n, const W* const* next) {
    int64_t i = 0;
#if defined(UPCYCLE_VW)
    vf hv[R][N];
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < N; ++k) hv[r][k] = vset1(h[r][k]);
    for (; i + VW <= n; i += VW) {
        vf wv[R];
        for (int r = 0; r < R; ++r) prefetch_line(next[r], i), wv[r] = vload(rows[r] + i);
        for (int k = 0; k < N; ++k) {
            vf v = vload(acc[k] + i);
            for (int r = 0; r < R; ++r) v = vfmadd(hv[r][k], wv[r], v);
            vstore(acc[k] + i, v);
        }
    }
#endif
    for (; i < n; ++i)
        for (int k = 0; k < N; ++k)
            for (int r = 0; r < R; ++r) acc[k][i] += h[r][k] * to_float(rows[r][i]);
}

// One token's activations as the shadow reads them: per group of G inputs a scale sx = max|x| / 127 and
// codes xq = round(x / sx) in [-127, 127] (x̂ = xq * sx), and sx * (sum of the group's codes), which
// takes the bias of the stored weight codes back out.
struct ShadowInput {
    std::vector<int8_t> xq;
    std::vector<float> sx, sx_sum;
};

void quantize_token(const float* x, int64_t H, int64_t G, ShadowInput& in) {
    const int64_t ng = H / G;
    in.xq.resize(H), in.sx.resize(ng), in.sx_sum.resize(ng);
    for (int64_t g = 0; g < ng; ++g) {
        float m = 0.f;
        for (int64_t k = 0; k < G; ++k) m = std::max(m, std::fabs(x[g * G + k]));
        const float sx = m > 0.f ? m / 127.f : 1.f;
        int32_t qs = 0;
        for (int64_t k = 0; k < G; ++k) {
            const float q = std::min(127.f, std::max(-127.f, std::nearbyint(x[g * G + k] / sx)));
            in.xq[g * G + k] = static_cast<int8_t>(q);
            qs += static_cast<int32_t>(q);
        }
        in.sx[g] = sx, in.sx_sum[g] = sx * static_cast<float>(qs);
    }
}

// The shadow is read 16 channels at a time (one fp32 vector of results, no horizontal sums). Codes are
// stored in BITS-bit fields (4: codes of 3 or 4 bits; 2: codes of 2 bits), each as its level c on a
// midrise grid (worth (c - (2^BITS - 1) / 2) steps; the scales are steps), 8 / BITS to a byte. A block of 16 channels holds, per matrix (gate, then up), runs of 64 bytes, run o
// covering R = 32 / BITS inputs: byte 4c + k holds channel c's inputs R o + 4p + k in its field p. Then
// the scales, per matrix and group the 16 channels' scales side by side. So one load and a mask per field
// (for 2 bits also a shift) give 16 channels x 4 inputs, and one VNNI dot product (u8 codes x the token's 4 s8
// inputs, broadcast) adds them into 16 lanes: the codes are unpacked once for up to 4 tokens.
constexpr int64_t SHADOW_LANES = 16;

inline int32_t four_codes(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// Gate and up pre-activations (as the shadow sees them) of one block of 16 channels for N tokens:
// gate[k * 16 + c], up[k * 16 + c].
template <int N, int BITS>
void shadow_block(const uint8_t* __restrict codes, const float* __restrict scales, const ShadowInput* const* in,
                  int64_t H, int64_t G, float* gate, float* up) {
    constexpr int FIELDS = 8 / BITS, RUN = 4 * FIELDS;
    const float offset = static_cast<float>((1 << BITS) - 1) / 2.f;  // midrise: level c means c - offset steps
    const int64_t ng = H / G, runs = G / RUN;
    const uint8_t* up_codes = codes + (H / RUN) * 64;
    const float* up_scales = scales + ng * SHADOW_LANES;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    __m512 fg[N], fu[N];  // the finished sums, group scales applied
    for (int k = 0; k < N; ++k) fg[k] = fu[k] = _mm512_setzero_ps();
    if constexpr (BITS == 4) {
        // Each field is masked in place, not shifted down: field f's byte holds code * 2^(f BITS), so its dot
        // products land 2^(f BITS) times too large, in an accumulator of its own, shifted back (exactly: a
        // multiple of 2^(f BITS)) once per group. That saves a shift per field and run - the shifts and masks
        // cost more than the dot products did. A single token also splits each field's sum between even and
        // odd runs so that the dot products do not wait on one another (5 cycles each); with several tokens,
        // the tokens are the independent chains.
        constexpr int C = N == 1 ? 2 : 1;
        __m512i fmask[FIELDS];
        for (int f = 0; f < FIELDS; ++f) fmask[f] = _mm512_set1_epi8(static_cast<char>(((1 << BITS) - 1) << (f * BITS)));
        const int8_t* xq[N];
        for (int k = 0; k < N; ++k) xq[k] = in[k]->xq.data();
        for (int64_t g = 0; g < ng; ++g) {
            __m512i ig[N][C][FIELDS], iu[N][C][FIELDS];
            for (int k = 0; k < N; ++k)
                for (int c = 0; c < C; ++c)
                    for (int f = 0; f < FIELDS; ++f) ig[k][c][f] = iu[k][c][f] = _mm512_setzero_si512();
            // run o into chain c (every index a constant once unrolled, so the accumulators stay in registers)
            const auto run = [&](int64_t o, auto c) {
                const uint8_t *pg = codes + o * 64, *pu = up_codes + o * 64;
#pragma GCC unroll 8
                for (int f = 0; f < FIELDS; ++f) {
                    const __m512i cg = _mm512_and_si512(_mm512_loadu_si512(pg), fmask[f]);
                    const __m512i cu = _mm512_and_si512(_mm512_loadu_si512(pu), fmask[f]);
#pragma GCC unroll 4
                    for (int k = 0; k < N; ++k) {
                        const __m512i xv = _mm512_set1_epi32(four_codes(xq[k] + RUN * o + 4 * f));
                        ig[k][c][f] = _mm512_dpbusd_epi32(ig[k][c][f], cg, xv);
                        iu[k][c][f] = _mm512_dpbusd_epi32(iu[k][c][f], cu, xv);
                    }
                }
            };
            const int64_t end = (g + 1) * runs;
            int64_t o = g * runs;
            for (; o + C <= end; o += C) {
                run(o, std::integral_constant<int, 0>{});
                if constexpr (C == 2) run(o + 1, std::integral_constant<int, C - 1>{});
            }
            if (o < end) run(o, std::integral_constant<int, 0>{});  // an odd number of runs: the last in chain 0
            const __m512 sg = _mm512_loadu_ps(scales + g * SHADOW_LANES), su = _mm512_loadu_ps(up_scales + g * SHADOW_LANES);
            for (int k = 0; k < N; ++k) {
                const __m512 sx = _mm512_set1_ps(in[k]->sx[g]), bias = _mm512_set1_ps(-offset * in[k]->sx_sum[g]);
                __m512i dg = _mm512_setzero_si512(), du = _mm512_setzero_si512();
                for (int f = 0; f < FIELDS; ++f) {
                    __m512i sg_f = ig[k][0][f], su_f = iu[k][0][f];
                    if (C == 2) sg_f = _mm512_add_epi32(sg_f, ig[k][C - 1][f]), su_f = _mm512_add_epi32(su_f, iu[k][C - 1][f]);
                    dg = _mm512_add_epi32(dg, _mm512_srai_epi32(sg_f, f * BITS));
                    du = _mm512_add_epi32(du, _mm512_srai_epi32(su_f, f * BITS));
                }
                fg[k] = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(dg), sx, bias), sg, fg[k]);
                fu[k] = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(du), sx, bias), su, fu[k]);
            }
        }
    } else {  // 2 bits: four fields, too many accumulators to keep apart - shift each field down
        // a single token splits each sum in two so the dot products do not all wait on one another; with
        // several tokens, the tokens are the independent chains
        constexpr int S = N == 1 ? 2 : 1;
        const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << BITS) - 1));
        for (int64_t g = 0; g < ng; ++g) {
            __m512i ig[N][S], iu[N][S];
            for (int k = 0; k < N; ++k)
                for (int s = 0; s < S; ++s) ig[k][s] = iu[k][s] = _mm512_setzero_si512();
            for (int64_t o = g * runs; o < (g + 1) * runs; ++o) {
                const __m512i vg = _mm512_loadu_si512(codes + o * 64), vu = _mm512_loadu_si512(up_codes + o * 64);
                for (int f = 0; f < FIELDS; ++f) {
                    const __m512i cg = _mm512_and_si512(f ? _mm512_srli_epi16(vg, f * BITS) : vg, mask);
                    const __m512i cu = _mm512_and_si512(f ? _mm512_srli_epi16(vu, f * BITS) : vu, mask);
                    for (int k = 0; k < N; ++k) {
                        const __m512i xv = _mm512_set1_epi32(four_codes(in[k]->xq.data() + RUN * o + 4 * f));
                        ig[k][f % S] = _mm512_dpbusd_epi32(ig[k][f % S], cg, xv);
                        iu[k][f % S] = _mm512_dpbusd_epi32(iu[k][f % S], cu, xv);
                    }
                }
            }
            const __m512 sg = _mm512_loadu_ps(scales + g * SHADOW_LANES), su = _mm512_loadu_ps(up_scales + g * SHADOW_LANES);
            for (int k = 0; k < N; ++k) {
                const __m512 sx = _mm512_set1_ps(in[k]->sx[g]), bias = _mm512_set1_ps(-offset * in[k]->sx_sum[g]);
                __m512i dg = ig[k][0], du = iu[k][0];
                if (S == 2) dg = _mm512_add_epi32(dg, ig[k][1]), du = _mm512_add_epi32(du, iu[k][1]);
                fg[k] = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(dg), sx, bias), sg, fg[k]);
                fu[k] = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(du), sx, bias), su, fu[k]);
            }
        }
    }
    for (int k = 0; k < N; ++k) {
        _mm512_storeu_ps(gate + k * SHADOW_LANES, fg[k]);
        _mm512_storeu_ps(up + k * SHADOW_LANES, fu[k]);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    // AVX2: a 64-byte run is two vectors (channels 0-7, 8-15). No VNNI: u8 x s8 pairs (maddubs) summed to
    // 32-bit lanes of 4 (madd by ones). maddubs saturates at 2^15, so each field is shifted down to its
    // code (at most 2 * 15 * 127) rather than masked in place as the AVX-512 path does.
    const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1)), ones = _mm256_set1_epi16(1);
    __m256 fg[N][2], fu[N][2];
    for (int k = 0; k < N; ++k)
        for (int h = 0; h < 2; ++h) fg[k][h] = fu[k][h] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        __m256i ig[N][2], iu[N][2];
        for (int k = 0; k < N; ++k)
            for (int h = 0; h < 2; ++h) ig[k][h] = iu[k][h] = _mm256_setzero_si256();
        for (int64_t o = g * runs; o < (g + 1) * runs; ++o) {
            __m256i vg[2], vu[2];
            for (int h = 0; h < 2; ++h) {
                vg[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + o * 64 + 32 * h));
                vu[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(up_codes + o * 64 + 32 * h));
            }
            for (int f = 0; f < FIELDS; ++f) {
                __m256i cg[2], cu[2];
                for (int h = 0; h < 2; ++h) {
                    cg[h] = _mm256_and_si256(f ? _mm256_srli_epi16(vg[h], f * BITS) : vg[h], mask);
                    cu[h] = _mm256_and_si256(f ? _mm256_srli_epi16(vu[h], f * BITS) : vu[h], mask);
                }
                for (int k = 0; k < N; ++k) {
                    const __m256i xv = _mm256_set1_epi32(four_codes(in[k]->xq.data() + RUN * o + 4 * f));
                    for (int h = 0; h < 2; ++h) {
                        ig[k][h] = _mm256_add_epi32(ig[k][h], _mm256_madd_epi16(_mm256_maddubs_epi16(cg[h], xv), ones));
                        iu[k][h] = _mm256_add_epi32(iu[k][h], _mm256_madd_epi16(_mm256_maddubs_epi16(cu[h], xv), ones));
                    }
                }
            }
        }
        for (int h = 0; h < 2; ++h) {
            const __m256 sg = _mm256_loadu_ps(scales + g * SHADOW_LANES + 8 * h);
            const __m256 su = _mm256_loadu_ps(up_scales + g * SHADOW_LANES + 8 * h);
            for (int k = 0; k < N; ++k) {
                const __m256 sx = _mm256_set1_ps(in[k]->sx[g]), bias = _mm256_set1_ps(-offset * in[k]->sx_sum[g]);
                fg[k][h] = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_cvtepi32_ps(ig[k][h]), sx, bias), sg, fg[k][h]);
                fu[k][h] = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_cvtepi32_ps(iu[k][h]), sx, bias), su, fu[k][h]);
            }
        }
    }
    for (int k = 0; k < N; ++k)
        for (int h = 0; h < 2; ++h) {
            _mm256_storeu_ps(gate + k * SHADOW_LANES + 8 * h, fg[k][h]);
            _mm256_storeu_ps(up + k * SHADOW_LANES + 8 * h, fu[k][h]);
        }
#else
    for (int k = 0; k < N; ++k)
        for (int64_t c = 0; c < SHADOW_LANES; ++c)
            for (int m = 0; m < 2; ++m) {
                const uint8_t* cm = m == 0 ? codes : up_codes;
                const float* sm = m == 0 ? scales : up_scales;
                float total = 0.f;
                for (int64_t g = 0; g < ng; ++g) {
                    int32_t dots = 0;
                    for (int64_t o = g * runs; o < (g + 1) * runs; ++o)
                        for (int f = 0; f < FIELDS; ++f)
                            for (int q = 0; q < 4; ++q) {
                                const int code = (cm[o * 64 + 4 * c + q] >> (f * BITS)) & ((1 << BITS) - 1);
                                dots += code * in[k]->xq[RUN * o + 4 * f + q];
                            }
                    total += sm[g * SHADOW_LANES + c] *
                             (static_cast<float>(dots) * in[k]->sx[g] - offset * in[k]->sx_sum[g]);
                }
                (m == 0 ? gate : up)[k * SHADOW_LANES + c] = total;
            }
#endif
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

#if defined(__AVX512F__)
// e^v for 16 lanes: v = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative
// error below 2e-7 there), times 2^n by scalef (which saturates to 0 and inf as e^v does). The scalar
// expf per channel cost as much as the shadow's dot products of a 576-input layer.
inline __m512 exp16(__m512 v) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), v);  // ln2 in two parts: exact n * hi
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

inline __m512 silu16(__m512 v) {
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}
#endif

// The shadow logits |silu(gate) * up| of channels [c0, c1) (whole 16-channel blocks) for all T tokens
// into z [T, I], four tokens at a time: each block's codes come from memory once (from L1 for the next
// four tokens).
template <int BITS>
void shadow_logits(const uint8_t* codes, const float* scales, int64_t H, int64_t G, int64_t I,
                   const ShadowInput* tokens, int64_t T, int64_t c0, int64_t c1, float* z) {
    const int64_t block_bytes = 2 * H * SHADOW_LANES * BITS / 8, block_scales = 2 * (H / G) * SHADOW_LANES;
    float gate[4 * SHADOW_LANES], up[4 * SHADOW_LANES];
    const ShadowInput* in[4];
    for (int64_t c = c0; c < c1; c += SHADOW_LANES) {
        const uint8_t* cb = codes + (c / SHADOW_LANES) * block_bytes;
        const float* sb = scales + (c / SHADOW_LANES) * block_scales;
        for (int64_t t0 = 0; t0 < T; t0 += 4) {
            const int n = static_cast<int>(std::min<int64_t>(4, T - t0));
            for (int k = 0; k < n; ++k) in[k] = tokens + t0 + k;
            if (n == 4) shadow_block<4, BITS>(cb, sb, in, H, G, gate, up);
            else if (n == 3) shadow_block<3, BITS>(cb, sb, in, H, G, gate, up);
            else if (n == 2) shadow_block<2, BITS>(cb, sb, in, H, G, gate, up);
            else shadow_block<1, BITS>(cb, sb, in, H, G, gate, up);
            for (int k = 0; k < n; ++k) {
#if defined(__AVX512F__)
                const __m512 gv = _mm512_loadu_ps(gate + k * SHADOW_LANES), uv = _mm512_loadu_ps(up + k * SHADOW_LANES);
                _mm512_storeu_ps(z + (t0 + k) * I + c, _mm512_abs_ps(_mm512_mul_ps(silu16(gv), uv)));
#else
                for (int64_t l = 0; l < SHADOW_LANES; ++l)
                    z[(t0 + k) * I + c + l] = std::fabs(silu(gate[k * SHADOW_LANES + l]) * up[k * SHADOW_LANES + l]);
#endif
            }
        }
    }
}

// Decoding (one token) streams its kept channels this many at a time: 16 row streams in flight per thread
// where one channel has 2 (gate, up) then 1 (down). On an AMD EPYC (2 cores) 30 cold SmolLM2 layers took
// 2.11-2.21 ms against 2.62-2.71 ms one channel at a time (same process, 31 rounds; 4: 2.26-2.30, 6:
// 2.16-2.22, 12: 2.12-2.19). Without the predictor's reads the kept rows then stream at ~50 GB/s there
// (benchmarks/ffn_cold_stream.py), where one channel at a time read them at ~31.
// With AVX2's 16 vector registers, 4 (8 row accumulators; 8 would spill them).
#if defined(__AVX512F__) || !defined(UPCYCLE_VW)
constexpr int CHANNELS = 8;
#else
constexpr int CHANNELS = 4;
#endif

// The weight of one channel's down row for one token: its gate value s times up * silu(gate), from the
// gate and up dots; rs: the channel's three row scales (gate, up, down) for int8 codes, null otherwise.
inline float channel_h(float gv, float uv, float s, const float* rs) {
    if (rs) gv *= rs[0], uv *= rs[1];
    return s * uv * silu(gv) * (rs ? rs[2] : 1.f);
}

// One channel for the tokens that kept it (count up to 4 at a time).
template <int N, typename W>
inline void channel_block(const W* g, const W* u, const W* d, const W* ng, const W* nu, const W* nd,
                          const float* const* xs, float* const* acc, const float* s, const float* rs, int64_t H) {
    const W *rows[2] = {g, u}, *next[2] = {ng, nu};
    float dots[2][N], h[1][N];
    block_dots<2, N>(rows, xs, H, next, dots);
    for (int k = 0; k < N; ++k) h[0][k] = channel_h(dots[0][k], dots[1][k], s[k], rs);
    block_axpys<1, N>(&d, acc, h, H, &nd);
}

// block(n0, t0, std::integral_constant<int, n>) for every block of R rows from n0 and each run of n <= 4
// tokens from t0, the threads splitting the blocks: how the row dots of every weight type share out.
template <int R, typename Block>
void for_row_blocks(int64_t T, int64_t N, Block&& block) {
    const int64_t blocks = (N + R - 1) / R;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b)
        for (int64_t t0 = 0; t0 < T; t0 += 4) {
            const int64_t c = std::min<int64_t>(4, T - t0), n0 = b * R;
            if (c == 4) block(n0, t0, std::integral_constant<int, 4>{});
            else if (c == 3) block(n0, t0, std::integral_constant<int, 3>{});
            else if (c == 2) block(n0, t0, std::integral_constant<int, 2>{});
            else block(n0, t0, std::integral_constant<int, 1>{});
        }
}

#include "q4_rows.h"  // int4 rows (group 32): their dots, axpys and streams
#include "q8_rows.h"  // int8 rows against tokens rounded to 8 bits per 32 (the dense row dots)

// Phase 2 of the kernel for one thread: stream its kept channels as one list (no stall at bank
// boundaries), at one token CHANNELS at a time, each channel's (or group's) successor prefetched while it
// is computed. Rows of channel j: W_gate[j] at base + j * stride, W_up[j] at + hidden, W_down^T[j] at
// + 2 hidden (elements of W).
template <typename W>
void stream_channels(const W* base, const float* row_scales, int64_t stride, int64_t H, const std::vector<int64_t>& kept,
                     const float* x, const float* scale, int64_t T, float* acc) {
    std::vector<const float*> xs(T);
    std::vector<float*> outs(T);
    std::vector<float> ss(T);
    size_t a = 0;
    if (T == 1)  // decoding: CHANNELS channels at a time (2 CHANNELS gate/up row streams); the rest one by one below
        for (const size_t last = kept.size() - 1; a + CHANNELS <= kept.size(); a += CHANNELS) {
            // rows 2c and 2c + 1: channel c's gate and up; its down^T row follows them in the packed copy
            const W *rows[2 * CHANNELS], *next[2 * CHANNELS], *d[CHANNELS], *nd[CHANNELS];
            for (int c = 0; c < CHANNELS; ++c) {
                const W *g = base + kept[a + c] * stride, *ng = base + kept[std::min(a + CHANNELS + c, last)] * stride;
                rows[2 * c] = g, rows[2 * c + 1] = g + H, d[c] = g + 2 * H;
                next[2 * c] = ng, next[2 * c + 1] = ng + H, nd[c] = ng + 2 * H;
            }
            float dots[2 * CHANNELS][1], h[CHANNELS][1];
            block_dots<2 * CHANNELS, 1>(rows, &x, H, next, dots);
            for (int c = 0; c < CHANNELS; ++c)
                h[c][0] = channel_h(dots[2 * c][0], dots[2 * c + 1][0], scale[kept[a + c]],
                                    row_scales ? row_scales + 3 * kept[a + c] : nullptr);
            block_axpys<CHANNELS, 1>(d, &acc, h, H, nd);
        }
    for (; a < kept.size(); ++a) {
        const int64_t j = kept[a];
        const int64_t nj = kept[std::min(a + 2, kept.size() - 1)];
        const W *g = base + j * stride, *u = g + H, *d = g + 2 * H;
        const W *ng = base + nj * stride, *nu = ng + H, *nd = ng + 2 * H;
        const float* rs = row_scales ? row_scales + 3 * j : nullptr;
        int m = 0;  // the tokens that kept channel j
        for (int64_t t = 0; t < T; ++t) {
            const float st = scale[j * T + t];
            if (st == 0.f) continue;
            xs[m] = x + t * H;
            outs[m] = acc + t * H;
            ss[m++] = st;
        }
        int k = 0;
        for (; k + 4 <= m; k += 4) channel_block<4>(g, u, d, ng, nu, nd, &xs[k], &outs[k], &ss[k], rs, H);
        if (m - k == 3) channel_block<3>(g, u, d, ng, nu, nd, &xs[k], &outs[k], &ss[k], rs, H);
        if (m - k == 2) channel_block<2>(g, u, d, ng, nu, nd, &xs[k], &outs[k], &ss[k], rs, H);
        if (m - k == 1) channel_block<1>(g, u, d, ng, nu, nd, &xs[k], &outs[k], &ss[k], rs, H);
    }
}

enum GateMode { HARD = 0, SIGMOID = 1, SOFTMAX = 2 };

// The kept channels of one bank for one token: the `keep` largest logits, ties to the lower index (a
// strict order, so exactly `keep` whatever the ties), as indices within the bank into `chosen`.
int top_k(const float* zb, int64_t bank, int64_t keep, int* chosen) {
#if defined(__AVX512F__)
    if (bank % 16 == 0 && bank <= 256) {  // bank^2/16 compares: beyond, a partial sort is cheaper
        // Branch-free: the rank of each channel (how many channels precede it in that order), 16
        // channels at a time against every channel of the bank; kept where the rank is below keep.
        const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i one = _mm512_set1_epi32(1), limit = _mm512_set1_epi32(static_cast<int>(keep));
        int n = 0;
        for (int64_t i0 = 0; i0 < bank; i0 += 16) {
            const __m512 zi = _mm512_loadu_ps(zb + i0);
            const __m512i ii = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(i0)), lane);
            __m512i rank = _mm512_setzero_si512();
            for (int64_t j = 0; j < bank; ++j) {
                const __m512 zj = _mm512_set1_ps(zb[j]);
                const __mmask16 later = _mm512_cmpgt_epi32_mask(ii, _mm512_set1_epi32(static_cast<int>(j)));
                const __mmask16 before = _mm512_cmp_ps_mask(zj, zi, _CMP_GT_OQ) |
                                         _mm512_mask_cmp_ps_mask(later, zj, zi, _CMP_EQ_OQ);
                rank = _mm512_mask_add_epi32(rank, before, rank, one);
            }
            for (__mmask16 kept = _mm512_cmplt_epi32_mask(rank, limit); kept; kept &= kept - 1)
                chosen[n++] = static_cast<int>(i0) + __builtin_ctz(kept);
        }
        return n;
    }
#endif
    for (int64_t i = 0; i < bank; ++i) chosen[i] = static_cast<int>(i);
    if (keep < bank)
        std::nth_element(chosen, chosen + keep, chosen + bank,
                         [zb](int a, int b) { return zb[a] > zb[b] || (zb[a] == zb[b] && a < b); });
    return static_cast<int>(keep);
}

// Per token and bank: the kept channels' gate values into scale[j * T + t] (0 where dropped).
void select_bank(const float* z, int64_t T, int64_t t, int64_t I, int64_t b0, int64_t bank, int64_t keep,
                 int mode, int* chosen, float* scale) {
    const float* zb = z + t * I + b0;
    const int n = top_k(zb, bank, keep, chosen);
    float zmax = -INFINITY, total = 0.f;
    if (mode == SOFTMAX) {
        for (int i = 0; i < n; ++i) zmax = std::max(zmax, zb[chosen[i]]);
        for (int i = 0; i < n; ++i) total += std::exp(zb[chosen[i]] - zmax);
    }
    for (int i = 0; i < n; ++i) {
        const float v = zb[chosen[i]];
        float s = 1.f;
        if (mode == SIGMOID) s = 1.f / (1.f + std::exp(-v));
        else if (mode == SOFTMAX) s = static_cast<float>(keep) * std::exp(v - zmax) / total;
        scale[(b0 + chosen[i]) * T + t] = s;
    }
}

// Dense rows for the layers outside the sparse FFNs (attention, dense FFNs, the LM head) at batch 1 to
// 4: y[t, n] = s[n] * (W[n] . x[t]) for rows n of W [N, K] (fp32, bf16, or int8 with row scales s; else
// s = 1). R rows at a time (8 for up to 2 tokens, else 2) for up to 4 tokens: as many row streams in flight
// as the bank-sparse kernel's decoding path has (see CHANNELS), so that dense and sparse layers stream
// alike; each row's dot is block_dots' (the same widening in registers and fp32 sums as the FFN
// kernel's). Threads split the rows. What it replaces: PyTorch's bf16 matmul
// at one row costs 25-45 us a call even on a 0.2-0.7 MB matrix in cache (oneDNN), several times what
// reading the matrix takes, and attention makes 120 such calls a token in SmolLM2.
template <int R, int N, typename W>
inline void block_rows(const W* w, const float* scales, const float* x, int64_t t0, int64_t N_rows, int64_t K,
                       int64_t n0, float* y) {
    const W *rows[R], *next[R];
    for (int r = 0; r < R; ++r) {  // past the last row: the last row again (read, not written)
        rows[r] = w + std::min<int64_t>(n0 + r, N_rows - 1) * K;
        next[r] = w + std::min<int64_t>(n0 + R + r, N_rows - 1) * K;
    }
    const float* xs[N];
    for (int k = 0; k < N; ++k) xs[k] = x + (t0 + k) * K;
    float out[R][N];
    block_dots<R, N>(rows, xs, K, next, out);
    for (int r = 0; r < R && n0 + r < N_rows; ++r)
        for (int k = 0; k < N; ++k) y[(t0 + k) * N_rows + n0 + r] = out[r][k] * (scales ? scales[n0 + r] : 1.f);
}

template <int R, typename W>
void row_dots_by(const W* w, const float* scales, const float* x, int64_t T, int64_t N, int64_t K, float* y) {
    for_row_blocks<R>(T, N, [&](int64_t n0, int64_t t0, auto tokens) {
        block_rows<R, decltype(tokens)::value>(w, scales, x, t0, N, K, n0, y);
    });
}

template <typename W>
void row_dots(const W* w, const float* scales, const float* x, int64_t T, int64_t N, int64_t K, float* y) {
    // 8 rows for one or two tokens (SmolLM2's 30 layers and LM head at one token, same process: 12.3-12.5 ms
    // against 13.3-13.5 ms two rows at a time); from 3 tokens two rows (4 rows x 4 tokens was 5 % slower)
    // (AVX2: 4 rows, its 16 vector registers holding 4 x 2 accumulators)
#if defined(__AVX512F__) || !defined(UPCYCLE_VW)
    if (T <= 2) row_dots_by<8>(w, scales, x, T, N, K, y);
#else
    if (T <= 2) row_dots_by<4>(w, scales, x, T, N, K, y);
#endif
    else row_dots_by<2>(w, scales, x, T, N, K, y);
}

}  // namespace

extern "C" {

int upcycle_kernels_abi_version() { return 11; }

// One module's weights as the kernel reads them (filled once per module on the Python side).
struct FFNWeights {
    const float* pred_down;  // [r, H]
    const float* pred_up;    // [I, r]
    const float* pred_bias;  // [I] or null
    int64_t rank;
    const void* w_gate;  // row j at w_gate + j * stride (elements of the weight type; int4: bytes), H of them;
    const void* w_up;    // likewise w_up and w_down_t (in a packed copy: w_gate + H, w_gate + 2 H)
    const void* w_down_t;
    int64_t stride;
    int64_t hidden;
    int64_t width;
    const uint8_t* shadow_codes;  // [I/16, 2, H * BITS / 32, 64] packed codes (see shadow_block), or null
    const float* shadow_scales;   // [I/16, 2, H/G, 16]
    int64_t shadow_group;         // G: inputs per scale (a multiple of 32 / BITS that divides H)
    int64_t shadow_bits;          // BITS: 4 or 2, the width of each stored code
    int64_t weight_type;          // of w_gate / w_up / w_down_t: 0 fp32, 1 bf16, 2 int8, 3 int4, 4 int4 with
                                  // minimums (q4_rows.h)
    const void* row_scales;       // int8: fp32 [I, 3] (gate, up, down^T row of each channel); int4: fp16
                                  // [I, 3, H/32] (each row's group scales; type 4: [I, 3, H/16], the steps
                                  // then the minimums); else null
};

// x: [T, H]; z: [T, I] predictor logits, or null to compute them here; out: [T, H].
// Returns 0, or a negative value on bad arguments.
int upcycle_bank_sparse_ffn_f32(const FFNWeights* w, const float* x, int64_t T, const float* z_in, int64_t bank,
                                int64_t keep, int mode, float* out) {
    const int64_t H = w->hidden, I = w->width, r = w->rank, stride = w->stride;
    const float *pred_down = w->pred_down, *pred_up = w->pred_up, *pred_bias = w->pred_bias;
    if (T < 1 || H < 1 || I < 1 || bank < 1 || keep < 1 || keep > bank || I % bank != 0) return -1;
    const int64_t wtype = w->weight_type;
    if (wtype < 0 || wtype > 4 || (wtype >= 2) != (w->row_scales != nullptr) || (wtype >= 3 && H % 64 != 0)) return -4;
    // the kernel walks rows from w_gate (the packed layout: up and down^T follow each gate row)
    const char* w_base = static_cast<const char*>(w->w_gate);
    const int64_t row_bytes = wtype == 0 ? 4 * H : wtype == 1 ? 2 * H : wtype == 2 ? H : H / 2;
    const int64_t stride_bytes = wtype >= 3 ? stride : stride * (row_bytes / H);  // int4's stride is in bytes
    if (static_cast<const char*>(w->w_up) != w_base + row_bytes || static_cast<const char*>(w->w_down_t) != w_base + 2 * row_bytes ||
        (wtype >= 3 && stride != 3 * H / 2))
        return -5;
    const uint8_t* shadow = w->shadow_codes;
    const int64_t G = w->shadow_group;
    const bool lowrank = pred_down != nullptr && pred_up != nullptr && r >= 1;
    if (z_in == nullptr && !lowrank && shadow == nullptr) return -2;
    if (z_in == nullptr && !lowrank &&
        (w->shadow_bits != 2 && w->shadow_bits != 4 || G % (32 / w->shadow_bits) != 0 || H % G != 0 ||
         bank % SHADOW_LANES != 0 || w->shadow_scales == nullptr))
        return -3;
    const bool shadow_z = z_in == nullptr && !lowrank;
    const int64_t banks = I / bank;
    const int threads = omp_get_max_threads();

    std::vector<float> z_own(z_in ? 0 : T * I), y(z_in || shadow_z ? 0 : T * r);
    std::vector<ShadowInput> tokens(shadow_z ? T : 0);  // each token quantized once for the whole layer
    for (int64_t t = 0; shadow_z && t < T; ++t) quantize_token(x + t * H, H, G, tokens[t]);
    std::vector<Q4Input> q4_tokens(wtype >= 3 ? T : 0);  // likewise for int4 rows' dots
    for (int64_t t = 0; wtype >= 3 && t < T; ++t) quantize_q4_input(x + t * H, H, q4_tokens[t]);
    std::vector<float> scale(I * T, 0.f);
    std::vector<float> partial(static_cast<size_t>(threads) * T * H);
    const float* z = z_in ? z_in : z_own.data();

#pragma omp parallel num_threads(threads)
    {
        const int me = omp_get_thread_num();
        const int team = omp_get_num_threads();
        if (!z_in && !shadow_z) {  // the predictor's first factor, y = x A (read once for the whole batch)
#pragma omp for schedule(static)
            for (int64_t q = 0; q < r; ++q)
                for (int64_t t = 0; t < T; ++t) y[t * r + q] = dot(pred_down + q * H, x + t * H, H);
        }
        float* acc = partial.data() + static_cast<size_t>(me) * T * H;
        std::memset(acc, 0, sizeof(float) * T * H);
        std::vector<int> chosen(bank);
        std::vector<int64_t> kept;  // this thread's channels kept by at least one token, in order
        // Phase 1: this thread's banks (a contiguous share) - their logits and top-k. The predictor rows
        // are read in order, so the hardware prefetcher streams them.
        const int64_t lo = banks * me / team, hi = banks * (me + 1) / team;
        for (int64_t bi = lo; bi < hi; ++bi) {
            const int64_t b0 = bi * bank;
            if (shadow_z) {
                if (w->shadow_bits == 2)
                    shadow_logits<2>(shadow, w->shadow_scales, H, G, I, tokens.data(), T, b0, b0 + bank, z_own.data());
                else
                    shadow_logits<4>(shadow, w->shadow_scales, H, G, I, tokens.data(), T, b0, b0 + bank, z_own.data());
            } else if (!z_in) {
                for (int64_t j = b0; j < b0 + bank; ++j)
                    for (int64_t t = 0; t < T; ++t)
                        z_own[t * I + j] = dot(pred_up + j * r, y.data() + t * r, r) + (pred_bias ? pred_bias[j] : 0.f);
            }
            for (int64_t t = 0; t < T; ++t) select_bank(z, T, t, I, b0, bank, keep, mode, chosen.data(), scale.data());
            for (int64_t j = b0; j < b0 + bank; ++j)
                for (int64_t t = 0; t < T; ++t)
                    if (scale[j * T + t] != 0.f) {
                        kept.push_back(j);
                        break;
                    }
            if (bi == lo)  // start fetching the first kept channels while selecting the rest
                for (size_t a = 0; a < std::min<size_t>(2, kept.size()); ++a) {
                    const char* first = w_base + kept[a] * stride_bytes;
                    for (int64_t off = 0; off < 3 * row_bytes; off += 64) prefetch(first + off);
                }
        }
        // Phase 2: stream the kept channels as one list
        if (wtype == 0)
            stream_channels(reinterpret_cast<const float*>(w_base), nullptr, stride, H, kept, x, scale.data(), T, acc);
        else if (wtype == 1)
            stream_channels(reinterpret_cast<const bf16_t*>(w_base), nullptr, stride, H, kept, x, scale.data(), T, acc);
        else if (wtype == 2)
            stream_channels(reinterpret_cast<const int8_t*>(w_base), static_cast<const float*>(w->row_scales), stride, H, kept, x,
                            scale.data(), T, acc);
        else if (wtype == 3)
            stream_channels_q4<false>(reinterpret_cast<const uint8_t*>(w_base), static_cast<const uint16_t*>(w->row_scales), H, kept,
                                      q4_tokens.data(), scale.data(), T, acc);
        else
            stream_channels_q4<true>(reinterpret_cast<const uint8_t*>(w_base), static_cast<const uint16_t*>(w->row_scales), H, kept,
                                     q4_tokens.data(), scale.data(), T, acc);
#pragma omp barrier
        // sum the per-thread partial outputs
#pragma omp for schedule(static)
        for (int64_t i = 0; i < T * H; ++i) {
            float v = 0.f;
            for (int th = 0; th < team; ++th) v += partial[static_cast<size_t>(th) * T * H + i];
            out[i] = v;
        }
    }
    return 0;
}

// Dense rows (see row_dots): w [N, K] of weight_type 0 fp32, 1 bf16, 2 int8 (row_scales fp32 [N]; K a
// multiple of 32: against the tokens rounded to 8 bits per 32 inputs, q8_rows.h), 3 int4
// (w [N, K/2] codes, row_scales fp16 [N, K/32]: q4_rows.h; K a multiple of 64), 4 int4 with minimums
// (row_scales [N, K/16]: each row's steps, then its minimums); else row_scales null; x
// [T, K] fp32; y [T, N] fp32. Returns 0, or a negative value on bad arguments.
int upcycle_row_dots(const void* w, int64_t weight_type, const void* row_scales, const float* x, int64_t T,
                     int64_t N, int64_t K, float* y) {
    if (T < 1 || N < 1 || K < 1 || weight_type < 0 || weight_type > 4 || (weight_type >= 2) != (row_scales != nullptr) ||
        (weight_type >= 3 && K % 64 != 0))
        return -1;
    const float* scales = static_cast<const float*>(row_scales);
    if (weight_type == 0) row_dots(static_cast<const float*>(w), scales, x, T, N, K, y);
    else if (weight_type == 1) row_dots(static_cast<const bf16_t*>(w), scales, x, T, N, K, y);
    else if (weight_type == 2 && K % Q8_GROUP == 0) q8_row_dots(static_cast<const int8_t*>(w), scales, x, T, N, K, y);
    else if (weight_type == 2) row_dots(static_cast<const int8_t*>(w), scales, x, T, N, K, y);
    else if (weight_type == 3) q4_row_dots<false>(static_cast<const uint8_t*>(w), static_cast<const uint16_t*>(row_scales), x, T, N, K, y);
    else q4_row_dots<true>(static_cast<const uint8_t*>(w), static_cast<const uint16_t*>(row_scales), x, T, N, K, y);
    return 0;
}

}  // extern "C"

#include "decode_step.h"  // a whole decoding step of a Llama-shaped model in one call
