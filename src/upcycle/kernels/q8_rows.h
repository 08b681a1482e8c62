// int8 weight rows (one fp32 scale per row) against tokens quantized as Q8_0 does: the dense row dots at
// int8. Included by bank_sparse_ffn.cpp inside its anonymous namespace (it uses prefetch, quantize_token
// and hsum8 from there).
//
// Why the tokens are rounded: widening every int8 weight to fp32 in registers (block_dots) costs three
// instructions per 8 weights, so on AVX2 a decoding step's row dots ran at 9-11 GB/s where the memory gives
// 22 (SmolLM2's attention and head, 2 threads, AVX2 EPYC). Integer products of the weights with the token's
// 8-bit codes, one fp32 step per group of 32 inputs (what llama.cpp's Q8_0 x Q8_0 computes), take five
// instructions per 32 weights. A row's dot is s_w sum over groups g of d_x[g] (sum of w xq over g): the
// integer part exact, the float part differing from a plain loop only in the order of its sums; the token's
// rounding is the only difference from the fp32 product (about 1/254 of each group's largest input).
// Measured by hand on the AVX2 EPYC (2 threads, eager calls with ~15 us of fixed cost each): a 3072 x 576
// matrix in cache 99 -> 50 us a call. From memory the integer products alone bought little (172 -> 164 us:
// 4 rows read at once stall on memory); read one row at a time (q8_row_dots_one) 107 us, and the LM head
// (49152 x 576, 28 MB) 2.0 -> 1.3-1.4 ms (21 GB/s; a plain read gets 22); SmolLM2's 120 attention and FFN
// calls a token 11.2-11.7 -> 8.9-9.5 ms. Its int8 lean decoding, old and new code alternating a process
// each: 52.2 -> 58.7, 43.7 -> 57.3, 50.2 -> 48.0 tok/s (medians of 7; that machine is noisy).
//
// AVX2 (AVX-512 machines too): pairs of |xq| (u8) and w with xq's sign (s8) summed to 16 bits (maddubs: at
// most 2 * 127 * 127, no saturation; the codes are in [-127, 127]), then to 32 bits in lanes of 4. (A VNNI
// variant would do a group in one instruction: w + 128 (u8) dot xq (s8), 128 * (the codes' sum) taken back
// out. Not written until it can be tested on a machine that has VNNI.)

constexpr int64_t Q8_GROUP = 32;

// A token rounded as Q8_0 rounds it: quantize_token's codes and steps at a group of 32 (its sx_sum unused).
using Q8Input = ShadowInput;
inline void quantize_q8_input(const float* x, int64_t K, Q8Input& in) { quantize_token(x, K, Q8_GROUP, in); }

// out[r][k] = rows[r] . token k (before the row's scale), for R rows of K int8 codes and N tokens; `next`
// prefetched a cache line per 64 weights.
template <int R, int N>
inline void q8_block_dots(const int8_t* const* rows, const Q8Input* const* xs, int64_t K, const int8_t* const* next,
                          float (*out)[N]) {
#if defined(__AVX2__) && defined(__FMA__)
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[R][N];
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < N; ++k) acc[r][k] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K; g += Q8_GROUP) {
        __m256i xq[N], xa[N];
        __m256 sv[N];
        for (int k = 0; k < N; ++k) {
            xq[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[k]->xq.data() + g));
            xa[k] = _mm256_abs_epi8(xq[k]);
            sv[k] = _mm256_set1_ps(xs[k]->sx[g / Q8_GROUP]);
        }
        for (int r = 0; r < R; ++r) {
            if (g % 64 == 0) prefetch(next[r] + g);
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + g));
            for (int k = 0; k < N; ++k) {
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(xa[k], _mm256_sign_epi8(w, xq[k])), ones);
                acc[r][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sv[k], acc[r][k]);
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
            for (int64_t g = 0; g < K; g += Q8_GROUP) {
                int32_t dot = 0;
                for (int64_t i = g; i < g + Q8_GROUP; ++i) dot += static_cast<int32_t>(rows[r][i]) * xs[k]->xq[i];
                total += xs[k]->sx[g / Q8_GROUP] * static_cast<float>(dot);
            }
            out[r][k] = total;
        }
#endif
}

template <int R, int N>
inline void q8_block_rows(const int8_t* w, const float* scales, const Q8Input* ins, int64_t t0, int64_t N_rows, int64_t K,
                          int64_t n0, float* y) {
    const int8_t *rows[R], *next[R];
    for (int r = 0; r < R; ++r) {  // past the last row: the last row again (read, not written)
        rows[r] = w + std::min<int64_t>(n0 + r, N_rows - 1) * K;
        next[r] = w + std::min<int64_t>(n0 + R + r, N_rows - 1) * K;
    }
    const Q8Input* xs[N];
    for (int k = 0; k < N; ++k) xs[k] = ins + t0 + k;
    float out[R][N];
    q8_block_dots<R, N>(rows, xs, K, next, out);
    for (int r = 0; r < R && n0 + r < N_rows; ++r)
        for (int k = 0; k < N; ++k) y[(t0 + k) * N_rows + n0 + r] = out[r][k] * scales[n0 + r];
}

template <int R>
void q8_row_dots_by(const int8_t* w, const float* scales, const float* x, int64_t T, int64_t N, int64_t K, float* y) {
    std::vector<Q8Input> ins(T);
    for (int64_t t = 0; t < T; ++t) quantize_q8_input(x + t * K, K, ins[t]);
    for_row_blocks<R>(T, N, [&](int64_t n0, int64_t t0, auto tokens) {
        q8_block_rows<R, decltype(tokens)::value>(w, scales, ins.data(), t0, N, K, n0, y);
    });
}

// One token (a decoding step): each thread reads its rows one after another, front to back, a prefetch
// 1 KB ahead, so that its reads are one sequential stream. Rows read 4 at a time (4 streams 1 row apart,
// as q8_block_dots does) stalled on memory: 3072 x 576 from memory 125 us against 84 one row at a time
// (21 GB/s, a plain read of the same bytes 22; 2 threads, AVX2 EPYC, a standalone loop of 40 matrices).
void q8_row_dots_one(const int8_t* w, const float* scales, const float* x, int64_t N, int64_t K, float* y) {
    Q8Input in;
    quantize_q8_input(x, K, in);
#if defined(__AVX2__) && defined(__FMA__)
    std::vector<int8_t> xa(K);  // |codes|: the unsigned side of maddubs
    for (int64_t i = 0; i < K; ++i) xa[i] = static_cast<int8_t>(std::abs(in.xq[i]));
    const __m256i ones = _mm256_set1_epi16(1);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const int8_t* row = w + n * K;
        const auto group = [&](int64_t g, __m256 acc) {  // acc + the step times group g's integer dots
            const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in.xq.data() + g));
            const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa.data() + g));
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + g));
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(v, q)), ones);
            return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(in.sx[g / Q8_GROUP]), acc);
        };
        __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();  // two chains of fmadds
        int64_t g = 0;
        for (; g + 2 * Q8_GROUP <= K; g += 2 * Q8_GROUP) {
            prefetch(row + g + 1024);
            even = group(g, even), odd = group(g + Q8_GROUP, odd);
        }
        if (g < K) even = group(g, even);
        y[n] = hsum8(_mm256_add_ps(even, odd)) * scales[n];
    }
#else
    const Q8Input* xs[1] = {&in};
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const int8_t* rows[1] = {w + n * K};
        float out[1][1];
        q8_block_dots<1, 1>(rows, xs, K, rows, out);
        y[n] = out[0][0] * scales[n];
    }
#endif
}

// y[t, n] = s[n] (W[n] . x̂[t]) for int8 rows W [N, K] (K a multiple of 32) and the tokens rounded to Q8_0.
void q8_row_dots(const int8_t* w, const float* scales, const float* x, int64_t T, int64_t N, int64_t K, float* y) {
    if (T == 1) q8_row_dots_one(w, scales, x, N, K, y);
    else if (T == 2) q8_row_dots_by<4>(w, scales, x, T, N, K, y);
    else q8_row_dots_by<2>(w, scales, x, T, N, K, y);
}
