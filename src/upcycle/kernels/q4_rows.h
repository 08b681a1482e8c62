// int4 weight rows, group 32: dot products and axpys for the row dots and the bank-sparse FFN's kept rows.
// Included by bank_sparse_ffn.cpp inside its anonymous namespace (it uses prefetch, quantize_token and
// channel_h from there).
//
// Q4_0's grouping and bytes: 4 bits a weight and one fp16 scale d per group of 32 (4.5 bits a weight). A
// row of K weights (K a multiple of 64) is K/2 bytes of codes and K/32 scales. The codes come in chunks
// of n = min(128, K - k0) weights, n/2 bytes: byte b holds weight k0 + b in its low nibble and weight
// k0 + n/2 + b in its high nibble, each as c in [0, 16) standing for (c - 8) d. So the low and the high
// nibbles of one 64-byte load pair with two runs of the token in its own order, and one VNNI dot product
// (u8 codes x s8 inputs) sums each 4 of them into a 32-bit lane that lies inside one group. (Q4_0 pairs
// weights j and j + 16 of each 32 in a byte, which needs the token reordered per block.)
//
// Tokens are quantized as Q8_0 does (int8 codes, one scale per 32 inputs: quantize_token), so a row's dot
// is the sum over groups of d_w d_x (sum c xq - 8 sum xq) - what llama.cpp computes for Q4_0 x Q8_0. The
// integer part is exact; the float part differs from a plain loop only in the order of its sums.
//
// The down projection of the sparse FFN adds h (c - 8) d to the output: its codes are widened to fp32 in
// registers, 16 at a time, several channels' rows per pass over the output.
//
// With MIN (weight type 4, Q4_1's grid: 5 bits a weight) each group also has an fp16 minimum m and c stands
// for c d + m: a row's scales are its K/32 steps d followed by its K/32 minimums. Its dot is the sum over
// groups of d_x (d_w sum c xq + m_w sum xq), the second sum the one Q4_0 takes 8 times out (minus8).

constexpr int64_t Q4_GROUP = 32;

struct Q4Input {
    std::vector<int8_t> xq;       // [K] the token's int8 codes
    std::vector<float> sx4;       // [K/4] the scale of the group each 4 inputs are in
    std::vector<int32_t> minus8;  // [K/4] -8 * the sum of the 4 codes: the weight codes' offset, taken out
};

void quantize_q4_input(const float* x, int64_t K, Q4Input& in) {
    ShadowInput s;
    quantize_token(x, K, Q4_GROUP, s);
    in.xq = std::move(s.xq);
    in.sx4.resize(K / 4), in.minus8.resize(K / 4);
    for (int64_t i = 0; i < K / 4; ++i) {
        in.sx4[i] = s.sx[i * 4 / Q4_GROUP];
        in.minus8[i] = -8 * (in.xq[4 * i] + in.xq[4 * i + 1] + in.xq[4 * i + 2] + in.xq[4 * i + 3]);
    }
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float v = exponent == 0    ? std::ldexp(static_cast<float>(mantissa), -24)
              : exponent == 31 ? (mantissa ? NAN : INFINITY)
                               : std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
    return (h & 0x8000) ? -v : v;
#endif
}

// Weight i's code (0..15) in a row of K.
inline int q4_code(const uint8_t* row, int64_t K, int64_t i) {
    const int64_t k0 = i / 128 * 128, half = std::min<int64_t>(128, K - k0) / 2, off = i - k0;
    const uint8_t byte = row[k0 / 2 + (off < half ? off : off - half)];
    return off < half ? byte & 15 : byte >> 4;
}

// fp16 scales a row of K weights has: d per group, and m per group with MIN.
template <bool MIN>
constexpr int64_t q4_scales(int64_t K) {
    return (MIN ? 2 : 1) * K / Q4_GROUP;
}

// out[r][k] = rows[r] . token k, for R rows (codes, fp16 scales) and N tokens; `next` prefetched.
template <int R, int N, bool MIN>
inline void q4_block_dots(const uint8_t* const* rows, const uint16_t* const* scales, const Q4Input* const* xs, int64_t K,
                          const uint8_t* const* next, float (*out)[N]) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
    const __m512i low = _mm512_set1_epi8(0x0F);
    // which of a chunk's (up to) 4 scales each lane's 4 weights use: low nibbles groups 0, 1; high 2, 3
    // (a 64-weight chunk: low group 0, high group 1, lanes 8-15 empty)
    const __m512i lo_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i hi_idx = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m512i hi_idx_half = _mm512_set1_epi32(1);
    __m512 acc[R][N];
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < N; ++k) acc[r][k] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 128) {
        const bool full = K - k0 >= 128;
        const int64_t half = full ? 64 : 32;
        const __mmask64 bytes = full ? ~0ULL : 0xFFFFFFFFULL;
        const __mmask16 lanes = full ? 0xFFFF : 0x00FF;
        __m512i xlo[N], xhi[N], blo[N], bhi[N];
        __m512 slo[N], shi[N];
        for (int k = 0; k < N; ++k) {
            const Q4Input* in = xs[k];
            xlo[k] = _mm512_maskz_loadu_epi8(bytes, in->xq.data() + k0);
            xhi[k] = _mm512_maskz_loadu_epi8(bytes, in->xq.data() + k0 + half);
            blo[k] = _mm512_maskz_loadu_epi32(lanes, in->minus8.data() + k0 / 4);
            bhi[k] = _mm512_maskz_loadu_epi32(lanes, in->minus8.data() + (k0 + half) / 4);
            slo[k] = _mm512_maskz_loadu_ps(lanes, in->sx4.data() + k0 / 4);
            shi[k] = _mm512_maskz_loadu_ps(lanes, in->sx4.data() + (k0 + half) / 4);
        }
        for (int r = 0; r < R; ++r) {
            prefetch(next[r] + k0 / 2);
            const __m512i v = _mm512_maskz_loadu_epi8(bytes, rows[r] + k0 / 2);
            const __m512i clo = _mm512_and_si512(v, low), chi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            const __m512 d = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_maskz_loadu_epi16(full ? 0xF : 0x3, scales[r] + k0 / 32)));
            const __m512 dlo = _mm512_permutexvar_ps(lo_idx, d), dhi = _mm512_permutexvar_ps(full ? hi_idx : hi_idx_half, d);
            if constexpr (MIN) {  // c d + m: sum c xq from the codes alone, m sum xq = (-m / 8) minus8
                const __m512 m = _mm512_mul_ps(
                    _mm512_castps128_ps512(_mm_cvtph_ps(_mm_maskz_loadu_epi16(full ? 0xF : 0x3, scales[r] + K / Q4_GROUP + k0 / 32))),
                    _mm512_set1_ps(-0.125f));
                const __m512 mlo = _mm512_permutexvar_ps(lo_idx, m), mhi = _mm512_permutexvar_ps(full ? hi_idx : hi_idx_half, m);
                const __m512i zero = _mm512_setzero_si512();
                for (int k = 0; k < N; ++k) {
                    const __m512i ilo = _mm512_dpbusd_epi32(zero, clo, xlo[k]), ihi = _mm512_dpbusd_epi32(zero, chi, xhi[k]);
                    acc[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ilo), _mm512_mul_ps(dlo, slo[k]), acc[r][k]);
                    acc[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ihi), _mm512_mul_ps(dhi, shi[k]), acc[r][k]);
                    acc[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(blo[k]), _mm512_mul_ps(mlo, slo[k]), acc[r][k]);
                    acc[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(bhi[k]), _mm512_mul_ps(mhi, shi[k]), acc[r][k]);
                }
                continue;
            }
            for (int k = 0; k < N; ++k) {
                const __m512i ilo = _mm512_dpbusd_epi32(blo[k], clo, xlo[k]);
                const __m512i ihi = _mm512_dpbusd_epi32(bhi[k], chi, xhi[k]);
                acc[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ilo), _mm512_mul_ps(dlo, slo[k]), acc[r][k]);
                acc[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ihi), _mm512_mul_ps(dhi, shi[k]), acc[r][k]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < N; ++k) out[r][k] = _mm512_reduce_add_ps(acc[r][k]);
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    // 32 bytes of codes at a time: their low nibbles are one group of 32 weights, their high nibbles another,
    // so each group's step multiplies a whole vector. u8 x s8 pairs (maddubs: at most 2 * 15 * 127, no
    // saturation) summed to 32-bit lanes of 4 (madd by ones) - what one VNNI dot product gives.
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[R][N];
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < N; ++k) acc[r][k] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 128) {
        const int64_t half = K - k0 >= 128 ? 64 : 32;
        for (int r = 0; r < R; ++r) prefetch(next[r] + k0 / 2);
        for (int64_t p = 0; p < half; p += 32) {
            const int64_t ilo = k0 + p, ihi = k0 + half + p;  // the first weight of each nibble's group
            __m256i xlo[N], xhi[N], blo[N], bhi[N];
            float slo[N], shi[N];
            for (int k = 0; k < N; ++k) {
                const Q4Input* in = xs[k];
                xlo[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in->xq.data() + ilo));
                xhi[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in->xq.data() + ihi));
                blo[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in->minus8.data() + ilo / 4));
                bhi[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in->minus8.data() + ihi / 4));
                slo[k] = in->sx4[ilo / 4], shi[k] = in->sx4[ihi / 4];
            }
            for (int r = 0; r < R; ++r) {
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + k0 / 2 + p));
                const __m256i clo = _mm256_and_si256(v, low), chi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                const float dlo = half_to_float(scales[r][ilo / Q4_GROUP]), dhi = half_to_float(scales[r][ihi / Q4_GROUP]);
                for (int k = 0; k < N; ++k) {
                    __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(clo, xlo[k]), ones);
                    __m256i phi = _mm256_madd_epi16(_mm256_maddubs_epi16(chi, xhi[k]), ones);
                    if constexpr (!MIN) plo = _mm256_add_epi32(plo, blo[k]), phi = _mm256_add_epi32(phi, bhi[k]);
                    acc[r][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(plo), _mm256_set1_ps(dlo * slo[k]), acc[r][k]);
                    acc[r][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(phi), _mm256_set1_ps(dhi * shi[k]), acc[r][k]);
                    if constexpr (MIN) {  // m sum xq = (-m / 8) minus8, as above
                        const float mlo = half_to_float(scales[r][K / Q4_GROUP + ilo / Q4_GROUP]);
                        const float mhi = half_to_float(scales[r][K / Q4_GROUP + ihi / Q4_GROUP]);
                        acc[r][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(blo[k]), _mm256_set1_ps(-0.125f * mlo * slo[k]), acc[r][k]);
                        acc[r][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(bhi[k]), _mm256_set1_ps(-0.125f * mhi * shi[k]), acc[r][k]);
                    }
                }
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < N; ++k) out[r][k] = hsum8(acc[r][k]);
#else
    (void)next;
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < N; ++k) {
            float total = 0.f;
            for (int64_t g = 0; g < K / Q4_GROUP; ++g) {
                int32_t dot = 0, sum = 0;
                for (int64_t i = g * Q4_GROUP; i < (g + 1) * Q4_GROUP; ++i) {
                    dot += (q4_code(rows[r], K, i) - (MIN ? 0 : 8)) * xs[k]->xq[i];
                    sum += xs[k]->xq[i];
                }
                const float m = MIN ? half_to_float(scales[r][K / Q4_GROUP + g]) : 0.f;
                total += xs[k]->sx4[g * Q4_GROUP / 4] *
                         (half_to_float(scales[r][g]) * static_cast<float>(dot) + m * static_cast<float>(sum));
            }
            out[r][k] = total;
        }
#endif
}

// acc[k] += h[r][k] * rows[r] for R rows of K (codes, fp16 scales) and N output rows, the rows added in
// order r = 0, 1, ... (so R rows at once give bitwise what R calls of one row give); `next` prefetched.
// Each weight is (c - 8) * (d h): the scale times h once per group, a table lookup (pshufb) for c - 8.
// With MIN, c * (d h) + m h.
template <int R, int N, bool MIN>
inline void q4_block_axpys(const uint8_t* const* rows, const uint16_t* const* scales, float* const* acc, const float (*h)[N],
                           int64_t K, const uint8_t* const* next) {
#if defined(__AVX512F__) && defined(__F16C__)
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i level = MIN ? _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                               : _mm_setr_epi8(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t k0 = 0; k0 < K; k0 += 128) {
        const bool full = K - k0 >= 128;
        const int64_t half = full ? 64 : 32;
        alignas(16) float hd[R][N][4];  // d h of the chunk's (up to) 4 groups
        alignas(16) float hm[R][N][4];  // m h (MIN)
        for (int r = 0; r < R; ++r) {
            prefetch(next[r] + k0 / 2);
            const __m128 d4 = _mm_cvtph_ps(_mm_maskz_loadu_epi16(full ? 0xF : 0x3, scales[r] + k0 / Q4_GROUP));
            for (int k = 0; k < N; ++k) _mm_store_ps(hd[r][k], _mm_mul_ps(d4, _mm_set1_ps(h[r][k])));
            if constexpr (MIN) {
                const __m128 m4 = _mm_cvtph_ps(_mm_maskz_loadu_epi16(full ? 0xF : 0x3, scales[r] + K / Q4_GROUP + k0 / Q4_GROUP));
                for (int k = 0; k < N; ++k) _mm_store_ps(hm[r][k], _mm_mul_ps(m4, _mm_set1_ps(h[r][k])));
            }
        }
        for (int64_t b = 0; b < half; b += 16) {  // weights k0 + b.. (low nibbles) and k0 + half + b.. (high)
            const int glo = static_cast<int>(b / 32), ghi = (full ? 2 : 1) + glo;
            __m512 wlo[R], whi[R];
            for (int r = 0; r < R; ++r) {
                const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + k0 / 2 + b));
                wlo[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(level, _mm_and_si128(v, low))));
                whi[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(level, _mm_and_si128(_mm_srli_epi16(v, 4), low))));
            }
            for (int k = 0; k < N; ++k) {
                float *lo = acc[k] + k0 + b, *hi = acc[k] + k0 + half + b;
                __m512 a = _mm512_loadu_ps(lo), c = _mm512_loadu_ps(hi);
                for (int r = 0; r < R; ++r) {
                    a = _mm512_fmadd_ps(wlo[r], _mm512_set1_ps(hd[r][k][glo]), a);
                    c = _mm512_fmadd_ps(whi[r], _mm512_set1_ps(hd[r][k][ghi]), c);
                    if constexpr (MIN) {
                        a = _mm512_add_ps(a, _mm512_set1_ps(hm[r][k][glo]));
                        c = _mm512_add_ps(c, _mm512_set1_ps(hm[r][k][ghi]));
                    }
                }
                _mm512_storeu_ps(lo, a), _mm512_storeu_ps(hi, c);
            }
        }
    }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i level = MIN ? _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                               : _mm_setr_epi8(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t k0 = 0; k0 < K; k0 += 128) {
        const bool full = K - k0 >= 128;
        const int64_t half = full ? 64 : 32;
        float hd[R][N][4], hm[R][N][4];  // d h and m h of the chunk's (up to) 4 groups
        for (int r = 0; r < R; ++r) {
            prefetch(next[r] + k0 / 2);
            for (int g = 0; g < (full ? 4 : 2); ++g) {
                const float d = half_to_float(scales[r][k0 / Q4_GROUP + g]);
                const float m = MIN ? half_to_float(scales[r][K / Q4_GROUP + k0 / Q4_GROUP + g]) : 0.f;
                for (int k = 0; k < N; ++k) hd[r][k][g] = d * h[r][k], hm[r][k][g] = m * h[r][k];
            }
        }
        // 8 weights a vector: the 16 bytes at b give low nibbles k0 + b.. and high nibbles k0 + half + b..
        for (int64_t b = 0; b < half; b += 16)
            for (int part = 0; part < 4; ++part) {  // low 0-7, low 8-15, high 0-7, high 8-15
                const bool high = part >= 2;
                const int64_t at = k0 + (high ? half : 0) + b + (part % 2) * 8;
                const int g = static_cast<int>((at - k0) / Q4_GROUP);
                __m256 w[R];
                for (int r = 0; r < R; ++r) {
                    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + k0 / 2 + b));
                    __m128i c = _mm_shuffle_epi8(level, _mm_and_si128(high ? _mm_srli_epi16(v, 4) : v, low));
                    if (part % 2) c = _mm_srli_si128(c, 8);
                    w[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
                }
                for (int k = 0; k < N; ++k) {
                    __m256 a = _mm256_loadu_ps(acc[k] + at);
                    for (int r = 0; r < R; ++r) {
                        a = _mm256_fmadd_ps(w[r], _mm256_set1_ps(hd[r][k][g]), a);
                        if constexpr (MIN) a = _mm256_add_ps(a, _mm256_set1_ps(hm[r][k][g]));
                    }
                    _mm256_storeu_ps(acc[k] + at, a);
                }
            }
    }
#else
    (void)next;
    for (int r = 0; r < R; ++r)
        for (int64_t i = 0; i < K; ++i) {
            const float c = static_cast<float>(q4_code(rows[r], K, i) - (MIN ? 0 : 8)), d = half_to_float(scales[r][i / Q4_GROUP]);
            const float m = MIN ? half_to_float(scales[r][K / Q4_GROUP + i / Q4_GROUP]) : 0.f;
            for (int k = 0; k < N; ++k) acc[k][i] += MIN ? c * (d * h[r][k]) + m * h[r][k] : c * (d * h[r][k]);
        }
#endif
}

// One kept channel (packed: gate, up, down^T codes of H/2 bytes each; their scales side by side) for the
// N tokens that kept it.
template <int N, bool MIN>
inline void q4_channel(const uint8_t* g, const uint16_t* sg, const uint8_t* ng, const Q4Input* const* ins,
                       float* const* outs, const float* s, int64_t H) {
    const uint8_t *rows[2] = {g, g + H / 2}, *next[2] = {ng, ng + H / 2};
    const uint16_t* sc[2] = {sg, sg + q4_scales<MIN>(H)};
    float dots[2][N], h[1][N];
    q4_block_dots<2, N, MIN>(rows, sc, ins, H, next, dots);
    for (int k = 0; k < N; ++k) h[0][k] = channel_h(dots[0][k], dots[1][k], s[k], nullptr);
    const uint8_t *down = g + H, *next_down = ng + H;
    const uint16_t* sd = sg + 2 * q4_scales<MIN>(H);
    q4_block_axpys<1, N, MIN>(&down, &sd, outs, h, H, &next_down);
}

// Phase 2 of the bank-sparse kernel for int4 rows (see stream_channels): at one token Q4_CHANNELS
// channels' gate and up rows in one pass; otherwise each channel for the tokens that kept it, 4 at a time.
constexpr int Q4_CHANNELS = 4;

template <bool MIN>
void stream_channels_q4(const uint8_t* base, const uint16_t* sbase, int64_t H, const std::vector<int64_t>& kept,
                        const Q4Input* tokens, const float* scale, int64_t T, float* acc) {
    const int64_t stride = 3 * H / 2, rs = q4_scales<MIN>(H), sstride = 3 * rs;
    std::vector<const Q4Input*> ins(T);
    std::vector<float*> outs(T);
    std::vector<float> ss(T);
    size_t a = 0;
    if (T == 1)
        for (const size_t last = kept.size() - 1; a + Q4_CHANNELS <= kept.size(); a += Q4_CHANNELS) {
            const uint8_t *rows[2 * Q4_CHANNELS], *next[2 * Q4_CHANNELS];
            const uint16_t* sc[2 * Q4_CHANNELS];
            for (int c = 0; c < Q4_CHANNELS; ++c) {
                const int64_t nj = kept[std::min(a + Q4_CHANNELS + c, last)];
                const uint8_t *g = base + kept[a + c] * stride, *ng = base + nj * stride;
                rows[2 * c] = g, rows[2 * c + 1] = g + H / 2, next[2 * c] = ng, next[2 * c + 1] = ng + H / 2;
                sc[2 * c] = sbase + kept[a + c] * sstride, sc[2 * c + 1] = sc[2 * c] + rs;
                // the next channels' scales too: apart from their codes, a jump the hardware cannot foresee
                const char* nsc = reinterpret_cast<const char*>(sbase + nj * sstride);
                for (int64_t off = 0; off < 2 * sstride; off += 64) prefetch(nsc + off);
            }
            float dots[2 * Q4_CHANNELS][1], h[Q4_CHANNELS][1];
            q4_block_dots<2 * Q4_CHANNELS, 1, MIN>(rows, sc, &tokens, H, next, dots);
            const uint8_t *down[Q4_CHANNELS], *next_down[Q4_CHANNELS];
            const uint16_t* sd[Q4_CHANNELS];
            for (int c = 0; c < Q4_CHANNELS; ++c) {
                h[c][0] = channel_h(dots[2 * c][0], dots[2 * c + 1][0], scale[kept[a + c]], nullptr);
                down[c] = rows[2 * c] + H, next_down[c] = next[2 * c] + H, sd[c] = sc[2 * c] + 2 * rs;
            }
            q4_block_axpys<Q4_CHANNELS, 1, MIN>(down, sd, &acc, h, H, next_down);
        }
    for (; a < kept.size(); ++a) {
        const int64_t j = kept[a];
        const uint8_t *g = base + j * stride, *ng = base + kept[std::min(a + 1, kept.size() - 1)] * stride;
        const uint16_t* sg = sbase + j * sstride;
        int m = 0;  // the tokens that kept channel j
        for (int64_t t = 0; t < T; ++t) {
            const float st = scale[j * T + t];
            if (st == 0.f) continue;
            ins[m] = tokens + t, outs[m] = acc + t * H, ss[m++] = st;
        }
        int k = 0;
        for (; k + 4 <= m; k += 4) q4_channel<4, MIN>(g, sg, ng, &ins[k], &outs[k], &ss[k], H);
        if (m - k == 3) q4_channel<3, MIN>(g, sg, ng, &ins[k], &outs[k], &ss[k], H);
        if (m - k == 2) q4_channel<2, MIN>(g, sg, ng, &ins[k], &outs[k], &ss[k], H);
        if (m - k == 1) q4_channel<1, MIN>(g, sg, ng, &ins[k], &outs[k], &ss[k], H);
    }
}

// Dense int4 rows: y[t, n] = W[n] . x[t] for w [N, K/2] codes, scales [N, K/32]. R rows at a time (4 for up
// to 2 tokens, else 2: the int4 dot keeps six vectors a token in registers), threads split the rows.
template <int R, int C, bool MIN>
inline void q4_block_rows(const uint8_t* w, const uint16_t* scales, const Q4Input* ins, int64_t t0, int64_t N, int64_t K,
                          int64_t n0, float* y) {
    const uint8_t *rows[R], *next[R];
    const uint16_t* sc[R];
    for (int r = 0; r < R; ++r) {  // past the last row: the last row again (read, not written)
        const int64_t n = std::min<int64_t>(n0 + r, N - 1);
        rows[r] = w + n * (K / 2), sc[r] = scales + n * q4_scales<MIN>(K);
        next[r] = w + std::min<int64_t>(n0 + R + r, N - 1) * (K / 2);
    }
    const Q4Input* xs[C];
    for (int k = 0; k < C; ++k) xs[k] = ins + t0 + k;
    float out[R][C];
    q4_block_dots<R, C, MIN>(rows, sc, xs, K, next, out);
    for (int r = 0; r < R && n0 + r < N; ++r)
        for (int k = 0; k < C; ++k) y[(t0 + k) * N + n0 + r] = out[r][k];
}

template <int R, bool MIN>
void q4_row_dots_by(const uint8_t* w, const uint16_t* scales, const float* x, int64_t T, int64_t N, int64_t K, float* y) {
    std::vector<Q4Input> ins(T);
    for (int64_t t = 0; t < T; ++t) quantize_q4_input(x + t * K, K, ins[t]);
    for_row_blocks<R>(T, N, [&](int64_t n0, int64_t t0, auto tokens) {
        q4_block_rows<R, decltype(tokens)::value, MIN>(w, scales, ins.data(), t0, N, K, n0, y);
    });
}

template <bool MIN>
void q4_row_dots(const uint8_t* w, const uint16_t* scales, const float* x, int64_t T, int64_t N, int64_t K, float* y) {
    if (T <= 2) q4_row_dots_by<4, MIN>(w, scales, x, T, N, K, y);
    else q4_row_dots_by<2, MIN>(w, scales, x, T, N, K, y);
}
