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

/* One vector of pass 2: lanes [0, n) of x + c (the rest -inf, whose exp is 0). */
INLINE VT FN(exp_step)(const T *x, int64_t c, int64_t n, VT vm, T *e, const T *w, VT *swx, const int smooth)
{
    const VT d = (n == W ? FN(load)(x + c) : FN(load_part)(x + c, n, -INFINITY)) - vm;
    const VT ev = VEXP(d);
    if (e) {
        if (n == W) FN(store)(e + c, ev);
        else FN(store_part)(e + c, n, ev);
    }
    if (smooth) *swx += FN(smooth_term)(d, w, c, n);
    return ev;
}

/* Pass 2 with its options fixed (inlined into one copy per combination): full vectors two at a time,
 * then the rest. One sum: its add chain (3-4 cycles a vector) is shorter than the exp's throughput
 * (about 6), and a second sum would not fit in the 16 vector registers beside the exp's constants. */
INLINE T FN(exp_sum_impl)(const T *x, int64_t C, T m, T *e, const T *w, T *wx, const int smooth,
                          const void *next, int64_t next_bytes)
{
    const VT vm = FN(splat)(m);
    VT sum = FN(splat)(0), swx = sum;
    int64_t c = 0;
    for (; c + 2 * W <= C; c += 2 * W) {
        /* one 64-byte line of the next row per 2W elements of this one (at least as fast as this row
         * goes, as the next row is at most as wide in bytes): it is in L2 when pass 1 needs it */
        if (next && c * (int64_t)sizeof(T) < next_bytes) __builtin_prefetch((const char *)next + c * sizeof(T), 0, 2);
        sum += FN(exp_step)(x, c, W, vm, e, w, &swx, smooth);
        sum += FN(exp_step)(x, c + W, W, vm, e, w, &swx, smooth);
    }
    for (; c < C; c += W) sum += FN(exp_step)(x, c, C - c < W ? C - c : W, vm, e, w, &swx, smooth);
    if (smooth) *wx += FN(hsum)(swx);
    return FN(hsum)(sum);
}

/* Pass 2: returns sum_c exp(x[c] - m); writes e[c] = exp(x[c] - m) if e is given (e may be x); adds
 * sum_c w[c] (x[c] - m) to *wx if wx is given (w = 1 when absent; label smoothing's loss term). */
/* exp_sum_impl with its options as constants: each caller gets its own loop with no test inside. */
INLINE T FN(exp_sum_opts)(const T *x, int64_t C, T m, T *e, const T *w, T *wx, const void *next,
                          int64_t next_bytes)
{
    if (wx) return FN(exp_sum_impl)(x, C, m, e, w, wx, 1, next, next_bytes);
    return e ? FN(exp_sum_impl)(x, C, m, e, NULL, NULL, 0, next, next_bytes)
             : FN(exp_sum_impl)(x, C, m, NULL, NULL, NULL, 0, next, next_bytes);
}

/* Pass 2: returns sum_c exp(x[c] - m); writes e[c] = exp(x[c] - m) if e is given (e may be x); adds
 * sum_c w[c] (x[c] - m) to *wx if wx is given (w = 1 when absent; label smoothing's loss term). */
HOT static T FN(exp_sum)(const T *x, int64_t C, T m, T *e, const T *w, T *wx)
{
    return FN(exp_sum_opts)(x, C, m, e, w, wx, NULL, 0);
}

/* Pass 2 as exp_sum, prefetching the next_bytes at next (the next row in its storage dtype, at most
 * C * sizeof(T) bytes, which pass 1 will read from memory) while the exp keeps the core busy. */
HOT static T FN(exp_sum_next)(const T *x, int64_t C, T m, T *e, const T *w, T *wx, const void *next,
                              int64_t next_bytes)
{
    return FN(exp_sum_opts)(x, C, m, e, w, wx, next, next_bytes);
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
INLINE T FN(exp_sum_bf16_impl)(const uint16_t *xb, int64_t C, T m, T *e, T *wx, const void *next,
                               int64_t next_bytes, const int bf16_grade)
{
    const VT vm = FN(splat)(m);
    VT sum = FN(splat)(0), swx = sum, even, odd;
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
        sum += e0;
        sum += e1;
        if (wx) swx += d0 + d1;
    }
    for (; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        const VT d = FN(bf16_part)(xb, c, n, -INFINITY) - vm, ev = bf16_grade ? VEXP_BF16(d) : VEXP(d);
        if (e) FN(store_part)(e + c, n, ev);
        sum += ev;
        if (wx) swx += FN(smooth_term)(d, NULL, c, n);
    }
    if (wx) *wx += FN(hsum)(swx);
    return FN(hsum)(sum);
}

HOT static T FN(exp_sum_bf16)(const uint16_t *xb, int64_t C, T m, T *e, T *wx, const void *next,
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
