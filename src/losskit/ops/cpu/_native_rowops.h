/* Row operations shared by the row kernels (_native_rows.h and the other families' row headers),
 * written once for an accumulation type T: instantiated by _native_instantiate.h through each
 * family's template, which includes this file first. Macros (from _native_instantiate.h):
 *   T      the accumulation type,           VT  a vector of W values of T (32 bytes),
 *   W      lanes per vector,                VI  the integer vector of the same size,
 *   VEXP   the vector exp of VT (x <= 0),   FN(name) the name suffixed with the type,
 *   VEXP_BF16  a vector exp accurate enough for results rounded to bfloat16 (T = float).
 */
typedef T FN(vt_u) __attribute__((vector_size(32), aligned(sizeof(T)), may_alias));

INLINE VT FN(load)(const T *p) { return *(const FN(vt_u) *)p; }
INLINE void FN(store)(T *p, VT v) { *(FN(vt_u) *)p = v; }
INLINE VT FN(splat)(T v) { return (VT){0} + v; }
/* a where mask else b; mask lanes are all ones or all zeros (a vector comparison's result). */
INLINE VT FN(select)(VI mask, VT a, VT b) { return (VT)((mask & (VI)a) | (~mask & (VI)b)); }

/* A partial vector: lanes [0, n) from p, the rest fill. */
INLINE VT FN(load_part)(const T *p, int64_t n, T fill)
{
    T buf[W];
    for (int j = 0; j < W; j++) buf[j] = j < n ? p[j] : fill;
    return FN(load)(buf);
}

INLINE void FN(store_part)(T *p, int64_t n, VT v)
{
    for (int j = 0; j < n; j++) p[j] = v[j];
}

/* The larger of v and acc per lane; a NaN in v is not picked (it reaches the loss through the sum of
 * exp instead). */
INLINE VT FN(vmax)(VT acc, VT v) { return FN(select)(v > acc, v, acc); }

INLINE T FN(hmax)(VT v)
{
    T m = v[0];
    for (int j = 1; j < W; j++) m = v[j] > m ? v[j] : m;
    return m;
}

INLINE T FN(hsum)(VT v)
{
    T s = 0;
    for (int j = 0; j < W; j++) s += v[j];
    return s;
}

/* Pass 1: the row max. Four independent accumulators: the loop is bound by loads, not by the latency
 * of one compare-and-blend chain. */
HOT static T FN(row_max)(const T *x, int64_t C)
{
    VT m0 = FN(splat)(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    int64_t c = 0;
    for (; c + 4 * W <= C; c += 4 * W) {
        m0 = FN(vmax)(m0, FN(load)(x + c));
        m1 = FN(vmax)(m1, FN(load)(x + c + W));
        m2 = FN(vmax)(m2, FN(load)(x + c + 2 * W));
        m3 = FN(vmax)(m3, FN(load)(x + c + 3 * W));
    }
    for (; c + W <= C; c += W) m0 = FN(vmax)(m0, FN(load)(x + c));
    if (c < C) m0 = FN(vmax)(m0, FN(load_part)(x + c, C - c, -INFINITY));
    return FN(hmax)(FN(vmax)(FN(vmax)(m0, m1), FN(vmax)(m2, m3)));
}

/* w (x - m) over lanes [0, n) for the label-smoothing term (w = 1 when absent); a lane with w = 0,
 * and every lane from n on, gives 0 even where x - m = -inf. */
INLINE VT FN(smooth_term)(VT d, const T *w, int64_t c, int64_t n)
{
    if (!w && n == W) return d;
    VT vw;
    if (w) {
        vw = n == W ? FN(load)(w + c) : FN(load_part)(w + c, n, 0);
    } else {
        T lanes[W];
        for (int j = 0; j < W; j++) lanes[j] = j < n;
        vw = FN(load)(lanes);
    }
    return FN(select)(vw != 0, vw * d, FN(splat)(0));
}

/* ---- sums carried in double ---------------------------------------------------------------------
 * A row's sums (of exps, label smoothing's w (x - m), dot products, entropy terms) run over up to
 * millions of terms: each is carried in double lanes. Where the terms come two vectors at a time, each
 * pair of vectors (2W terms) is added in T, one rounding, then converted and added into double lanes:
 * for terms of one sign the sum's relative error stays below 2^-24 (half a float epsilon) however long
 * the row, where a float accumulator's grows with C / W (softmax at C = 1e6 had 150 eps). The price is
 * about three vector operations per 2W terms (convert, convert, add, against one float add). */
typedef struct { v4d lo, hi; } FN(acc_t);

INLINE FN(acc_t) FN(acc_zero)(void) { return (FN(acc_t)){{0}, {0}}; }

INLINE void FN(acc_add)(FN(acc_t) *a, VT v)
{
#if W == 8
    a->lo += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), v4d);
    a->hi += __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), v4d);
#else
    a->lo += v;
#endif
}

/* Lane j of the vectors that acc_add carried into a. */
INLINE double FN(acc_lane)(const FN(acc_t) *a, int j) { return j < 4 ? a->lo[j] : a->hi[j - 4]; }

/* Double lanes (lo, hi) rounded once to a vector of T. */
#if W == 8
typedef float FN(v4f) __attribute__((vector_size(16)));
INLINE VT FN(narrow)(v4d lo, v4d hi)
{
    return __builtin_shufflevector(__builtin_convertvector(lo, FN(v4f)), __builtin_convertvector(hi, FN(v4f)), 0, 1,
                                   2, 3, 4, 5, 6, 7);
}
#else
INLINE VT FN(narrow)(v4d lo, v4d hi) { return (void)hi, lo; }
#endif

/* Per lane, a / b in double, rounded once to T (the high half of a double's acc_t is unused). */
INLINE VT FN(acc_div)(FN(acc_t) a, FN(acc_t) b) { return FN(narrow)(a.lo / b.lo, a.hi / b.hi); }

INLINE double FN(acc_total)(FN(acc_t) a)
{
    const v4d t = a.lo + a.hi;
    return (t[0] + t[1]) + (t[2] + t[3]);
}

/* ---- the scale of pass 2's exps ---------------------------------------------------------------------
 * The exps of a row e_c = exp(x_c - m) need x - m, whose rounding to T costs up to |x - m| 2^-24 relative
 * (8 eps at x - m = -16, where 32768 logits randn * 2 have their smallest). For float rows whose max has
 * |m| < 1024, pass 2 computes e_c = 2^-K exp(x_c) with K = floor(m log2 e) instead: the argument is
 * exact, the scaling is folded into the exp's rounding constant (no operation added), and e_c is in
 * [0, 2). Other rows (a huge or infinite max, and double rows, whose x - m rounds to 2^-53) take
 * exp(x - m) with the difference made exact by TwoSum (exp_v8f_diff, five operations more a vector).
 * exp_offset(m) is log(2^K e^-m) = K ln2 - m in (-ln2, 0], or 0: the log-sum-exp relative to m is
 * log(s) + exp_offset(m) for pass 2's sum s. */
INLINE int FN(exp_scaled)(T m) { return W == 8 && fabs((double)m) < 1024; }

INLINE double FN(exp_offset)(T m)
{
    return FN(exp_scaled)(m) ? floor((double)m * M_LOG2E) * M_LN2 - (double)m : 0;
}

/* One vector of pass 2: lanes [0, n) of x + c (the rest -inf, whose exp is 0); their exps (2^-K e^x when
 * scaled, else e^(x - m)), and w (x - m) added to *swx when smoothing. */
INLINE VT FN(exp_step)(const T *x, int64_t c, int64_t n, VT vm, int K, T *e, const T *w, VT *swx,
                       const int smooth, const int scaled)
{
    const VT xv = n == W ? FN(load)(x + c) : FN(load_part)(x + c, n, -INFINITY);
#if W == 8
    const VT ev = scaled ? exp_v8f_scaled(xv, K) : VEXP_DIFF(xv, vm);
#else
    const VT ev = VEXP_DIFF(xv, vm);
#endif
    if (e) {
        if (n == W) FN(store)(e + c, ev);
        else FN(store_part)(e + c, n, ev);
    }
    if (smooth) *swx += FN(smooth_term)(xv - vm, w, c, n);
    return ev;
}

/* Pass 2 with its options fixed (inlined into one copy per combination): full vectors two at a time,
 * then the rest; each pair's sum goes into the double sums. */
INLINE double FN(exp_sum_impl)(const T *x, int64_t C, T m, T *e, const T *w, double *wx, const int smooth,
                               const void *next, int64_t next_bytes, const int scaled)
{
    const VT vm = FN(splat)(m);
    const int K = scaled ? (int)floor((double)m * M_LOG2E) : 0;
    FN(acc_t) sum = FN(acc_zero)(), swx = sum;
    int64_t c = 0;
    /* Four vectors a step, added as a tree in T ((e0 + e1) + (e2 + e3): two roundings, 2^-23 relative
     * at most for terms of one sign) and then into double: a conversion per 4W terms, not per 2W (the
     * double sums cost cross_entropy 4096x32768 about 12% at two conversions per 2W). */
    for (; c + 4 * W <= C; c += 4 * W) {
        /* one 64-byte line of the next row per 2W elements of this one (at least as fast as this row
         * goes, as the next row is at most as wide in bytes): it is in L2 when pass 1 needs it */
        if (next && c * (int64_t)sizeof(T) < next_bytes) {
            __builtin_prefetch((const char *)next + c * sizeof(T), 0, 2);
            __builtin_prefetch((const char *)next + (c + 2 * W) * sizeof(T), 0, 2);
        }
        VT pw = FN(splat)(0);
        const VT e0 = FN(exp_step)(x, c, W, vm, K, e, w, &pw, smooth, scaled);
        const VT e1 = FN(exp_step)(x, c + W, W, vm, K, e, w, &pw, smooth, scaled);
        const VT e2 = FN(exp_step)(x, c + 2 * W, W, vm, K, e, w, &pw, smooth, scaled);
        const VT e3 = FN(exp_step)(x, c + 3 * W, W, vm, K, e, w, &pw, smooth, scaled);
        FN(acc_add)(&sum, (e0 + e1) + (e2 + e3));
        if (smooth) FN(acc_add)(&swx, pw);
    }
    for (; c + 2 * W <= C; c += 2 * W) {
        VT pw = FN(splat)(0);
        const VT e0 = FN(exp_step)(x, c, W, vm, K, e, w, &pw, smooth, scaled);
        FN(acc_add)(&sum, e0 + FN(exp_step)(x, c + W, W, vm, K, e, w, &pw, smooth, scaled));
        if (smooth) FN(acc_add)(&swx, pw);
    }
    for (; c < C; c += W) {
        VT pw = FN(splat)(0);
        FN(acc_add)(&sum, FN(exp_step)(x, c, C - c < W ? C - c : W, vm, K, e, w, &pw, smooth, scaled));
        if (smooth) FN(acc_add)(&swx, pw);
    }
    if (smooth) *wx += FN(acc_total)(swx);
    return FN(acc_total)(sum);
}

INLINE double FN(exp_sum_case)(const T *x, int64_t C, T m, T *e, const T *w, double *wx, const void *next,
                               int64_t next_bytes, const int scaled)
{
    if (wx) return FN(exp_sum_impl)(x, C, m, e, w, wx, 1, next, next_bytes, scaled);
    return e ? FN(exp_sum_impl)(x, C, m, e, NULL, NULL, 0, next, next_bytes, scaled)
             : FN(exp_sum_impl)(x, C, m, NULL, NULL, NULL, 0, next, next_bytes, scaled);
}

/* Pass 2: returns s, the sum of the row's exps in double (scaled as above: log(s) + exp_offset(m) is the
 * log-sum-exp relative to m); writes the exps to e if e is given (e may be x); adds
 * sum_c w[c] (x[c] - m) to *wx if wx is given (w = 1 when absent; label smoothing's loss term).
 * exact_diff: exps of the TwoSum-exact x - m whatever m (the entropy, whose terms need x - m exactly).
 * exp_sum_impl with its options as constants: each caller gets its own loop with no test inside. */
INLINE double FN(exp_sum_opts)(const T *x, int64_t C, T m, T *e, const T *w, double *wx, const void *next,
                               int64_t next_bytes, int exact_diff)
{
    if (!exact_diff && FN(exp_scaled)(m)) return FN(exp_sum_case)(x, C, m, e, w, wx, next, next_bytes, 1);
    return FN(exp_sum_case)(x, C, m, e, w, wx, next, next_bytes, 0);
}

/* Pass 2, as exp_sum_opts. */
HOT static double FN(exp_sum)(const T *x, int64_t C, T m, T *e, const T *w, double *wx)
{
    return FN(exp_sum_opts)(x, C, m, e, w, wx, NULL, 0, 0);
}

/* Pass 2 with the exps of the exact x - m: e[c] = exp(x[c] - m), s their sum (exp_offset does not apply). */
HOT static double FN(exp_sum_diff)(const T *x, int64_t C, T m, T *e)
{
    return FN(exp_sum_opts)(x, C, m, e, NULL, NULL, NULL, 0, 1);
}

/* Pass 2 as exp_sum, prefetching the next_bytes at next (the next row in its storage dtype, at most
 * C * sizeof(T) bytes, which pass 1 will read from memory) while the exp keeps the core busy. */
HOT static double FN(exp_sum_next)(const T *x, int64_t C, T m, T *e, const T *w, double *wx, const void *next,
                                   int64_t next_bytes)
{
    return FN(exp_sum_opts)(x, C, m, e, w, wx, next, next_bytes, 0);
}

/* Pass 3's arithmetic on lanes [c, c + n): a e - b w (w = 1 when absent). Every element of pass 3 goes
 * through this one expression (full vectors and the tail alike), so an element computed alone is
 * bit-identical to the same element computed in its row. */
INLINE VT FN(affine_v)(const T *e, int64_t c, int64_t n, VT va, VT vb, const T *w)
{
    const VT v = n == W ? FN(load)(e + c) : FN(load_part)(e + c, n, 0);
    if (!w) return va * v - vb;
    return va * v - vb * (n == W ? FN(load)(w + c) : FN(load_part)(w + c, n, 0));
}

/* Pass 3, on the row in cache: g[c] = a g[c] - b w[c] (w = 1 when absent). */
HOT static void FN(affine)(T *g, int64_t C, T a, T b, const T *w)
{
    const VT va = FN(splat)(a), vb = FN(splat)(b);
    int64_t c = 0;
    for (; c + W <= C; c += W) FN(store)(g + c, FN(affine_v)(g, c, W, va, vb, w));
    if (c < C) FN(store_part)(g + c, C - c, FN(affine_v)(g, c, C - c, va, vb, w));
}

/* ---- contiguous bfloat16 rows (T = float), read and written in pairs ----------------------------------
 * 16 bfloat16 are 8 32-bit words: a word's low half is an even-indexed element and its high half the
 * odd one after it, so `word << 16` and `word & 0xffff0000` are the two as floats, with no shuffle
 * (GCC 12 widens 8 bfloat16 to 8 floats with five instructions, two of them cross-lane, which made the
 * exp pass 40% slower). Passes 1 and 2 work on these pairs; pass 2 keeps e in "pair order" (per block
 * of 16: the 8 even elements, then the 8 odd ones) and pass 3 reads it so and writes each block back
 * in element order, rounded to nearest even. The last C % 16 elements are in element order. */

INLINE void FN(bf16_pairs)(const uint16_t *xb, int64_t c, VT *even, VT *odd)
{
    v8u32 u;
    memcpy(&u, xb + c, sizeof u);
    *even = (VT)(u << 16);
    *odd = (VT)(u & 0xffff0000u);
}

INLINE VT FN(bf16_part)(const uint16_t *xb, int64_t c, int64_t n, T fill)
{
    T buf[W];
    for (int j = 0; j < W; j++) buf[j] = j < n ? (T)bf16_to_f32(xb[c + j]) : fill;
    return FN(load)(buf);
}

/* Where element c of a row lives in pair order. */
INLINE int64_t FN(pair_index)(int64_t c, int64_t C)
{
    return c < (C & ~(int64_t)15) ? (c & ~(int64_t)15) + (c & 1) * 8 + ((c & 15) >> 1) : c;
}

/* Pass 1 on a bfloat16 row. */
HOT static T FN(row_max_bf16)(const uint16_t *xb, int64_t C)
{
    VT m0 = FN(splat)(-INFINITY), m1 = m0, even, odd;
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) {
        FN(bf16_pairs)(xb, c, &even, &odd);
        m0 = FN(vmax)(m0, even);
        m1 = FN(vmax)(m1, odd);
    }
    for (; c < C; c += W) m0 = FN(vmax)(m0, FN(bf16_part)(xb, c, C - c < W ? C - c : W, -INFINITY));
    return FN(hmax)(FN(vmax)(m0, m1));
}

/* Pass 2 on a bfloat16 row: as exp_sum_next(x, C, m, e, NULL, wx, next, next_bytes), e in pair order;
 * bf16_grade: with VEXP_BF16 (relative error 4.0e-6), for a caller whose results keep that error
 * relative, i.e. no result is a difference that cancels (softmax; cross-entropy without smoothing,
 * whose only cancelling gradient, p_y - 1 with p_y near 1, has y the row max and e_y = 1 exactly).
 * Where outputs may cancel (log-probabilities near 0, p - t, log p + H), the full exp. */
INLINE double FN(exp_sum_bf16_impl)(const uint16_t *xb, int64_t C, T m, T *e, double *wx, const void *next,
                                    int64_t next_bytes, const int bf16_grade)
{
    const VT vm = FN(splat)(m);
    FN(acc_t) sum = FN(acc_zero)(), swx = sum;
    VT even, odd;
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) {
        if (next && 2 * c < next_bytes) __builtin_prefetch((const char *)next + 2 * c, 0, 2);
        FN(bf16_pairs)(xb, c, &even, &odd);
        const VT d0 = even - vm, d1 = odd - vm;
        const VT e0 = bf16_grade ? VEXP_BF16(d0) : VEXP(d0), e1 = bf16_grade ? VEXP_BF16(d1) : VEXP(d1);
        if (e) {
            FN(store)(e + c, e0);
            FN(store)(e + c + W, e1);
        }
        FN(acc_add)(&sum, e0 + e1);
        if (wx) FN(acc_add)(&swx, d0 + d1);
    }
    for (; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        const VT d = FN(bf16_part)(xb, c, n, -INFINITY) - vm, ev = bf16_grade ? VEXP_BF16(d) : VEXP(d);
        if (e) FN(store_part)(e + c, n, ev);
        FN(acc_add)(&sum, ev);
        if (wx) FN(acc_add)(&swx, FN(smooth_term)(d, NULL, c, n));
    }
    if (wx) *wx += FN(acc_total)(swx);
    return FN(acc_total)(sum);
}

HOT static double FN(exp_sum_bf16)(const uint16_t *xb, int64_t C, T m, T *e, double *wx, const void *next,
                                   int64_t next_bytes, int bf16_grade)
{
    /* one loop per case, its options constants (no test inside, no vector spilled to the stack) */
    if (wx) return bf16_grade ? FN(exp_sum_bf16_impl)(xb, C, m, e, wx, next, next_bytes, 1)
                              : FN(exp_sum_bf16_impl)(xb, C, m, e, wx, next, next_bytes, 0);
    if (e) return bf16_grade ? FN(exp_sum_bf16_impl)(xb, C, m, e, NULL, next, next_bytes, 1)
                             : FN(exp_sum_bf16_impl)(xb, C, m, e, NULL, next, next_bytes, 0);
    return bf16_grade ? FN(exp_sum_bf16_impl)(xb, C, m, NULL, NULL, next, next_bytes, 1)
                      : FN(exp_sum_bf16_impl)(xb, C, m, NULL, NULL, next, next_bytes, 0);
}

/* Pass 3 into a bfloat16 row: gb[c] = bf16(a e[c] - b), e in pair order (see above). */
INLINE void FN(affine_bf16_impl)(uint16_t *gb, const T *e, int64_t C, T a, T b, const int no_nan)
{
    const VT va = FN(splat)(a), vb = FN(splat)(b);
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) {
        const v8u32 lo = bf16_round8_words((v8f)FN(affine_v)(e, c, W, va, vb, NULL), no_nan),
                    hi = bf16_round8_words((v8f)FN(affine_v)(e, c + W, W, va, vb, NULL), no_nan);
        const v8u32 words = lo | (hi << 16);
        memcpy(gb + c, &words, sizeof words);
    }
    for (; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        const v8u32 words = bf16_round8_words((v8f)FN(affine_v)(e, c, n, va, vb, NULL), no_nan);
        for (int64_t j = 0; j < n; j++) gb[c + j] = (uint16_t)words[j];
    }
}

/* no_nan: a, b and every e are known not to be NaN (so no result is), and rounding skips the NaN test. */
HOT static void FN(affine_bf16)(uint16_t *gb, const T *e, int64_t C, T a, T b, int no_nan)
{
    if (no_nan) FN(affine_bf16_impl)(gb, e, C, a, b, 1);
    else FN(affine_bf16_impl)(gb, e, C, a, b, 0);
}

/* exp of a contiguous array, in place: the kernels' vector exp (or its bfloat16 grade), exposed for the
 * accuracy tests. */
HOT static void FN(exp_array)(T *p, int64_t n, int bf16_grade)
{
    int64_t i = 0;
    for (; i + W <= n; i += W) FN(store)(p + i, bf16_grade ? VEXP_BF16(FN(load)(p + i)) : VEXP(FN(load)(p + i)));
    if (i < n) {
        const VT v = FN(load_part)(p + i, n - i, 0);
        FN(store_part)(p + i, n - i, bf16_grade ? VEXP_BF16(v) : VEXP(v));
    }
}

/* Each lane's entry of a float table over the 65536 bfloat16 bit patterns (idx: the lanes' patterns), as
 * T. Scalar loads: on Zen 3 they beat vgatherdps (4 table reads per 16 elements in cache, 1 thread: 0.62
 * against 0.87 ns an element), and they need no AVX2 in the default clone. */
INLINE VT FN(table_lanes)(const float *table, v8u32 idx)
{
    VT v;
    for (int j = 0; j < W; j++) v[j] = (T)table[idx[j]];
    return v;
}
