/* Row kernels of losskit.ops.cpu._native, written once for an accumulation type.
 *
 * Instantiated by _native.c through _native_instantiate.h (T = float and T = double); the shared row
 * passes (max, exp and sum, affine) come from _native_rowops.h.
 *
 * Reference expression, per row i (x: C logits, y: class index or t: C probabilities; w: class weights,
 * ones when absent; ls: label smoothing; scale: the reduction's per-element factor):
 *   lse = logsumexp(x), logp = x - lse
 *   loss = (1 - ls) w[y] (-logp[y]) + ls/C sum_c w[c] (-logp[c])       index target, gamma = 0
 *   loss = w[y] (1 - exp(logp[y]))^gamma (-logp[y])                   index target, focal
 *   loss = sum_c w[c] t'[c] (-logp[c]),  t' = (1 - ls) t + ls/C        probability target
 *   grad = scale * dloss/dx,  tgrad = scale * dloss/dt = scale (1 - ls) w (-logp)
 * Passes over a row: 1. max; 2. e = exp(x - max) and its sum, e kept in the gradient row; 3. the
 * gradient from e, in place. Pass 1 reads the row from DRAM, the others find it (and the gradient row)
 * in L1/L2 while they fit (C = 32768 float32: 128 KiB each, against a 512 KiB L2), so memory sees one
 * read of the row and one write of its gradient; one exp per element (the vector exp of _native_common.h).
 * The per-row scalars use the C library: log of the sum, and expm1 and pow for the focal factor.
 */

#include "_native_rowops.h"

/* One row with a class index y. x is a contiguous row in T, or x is NULL and xb the row in bfloat16
 * (T = float, no class weights: the pair-order passes of _native_rowops.h); g a contiguous output or
 * NULL, never x; with xb, g is scratch in pair order and the gradient goes to the bfloat16 row gb; next
 * is the next row to prefetch, or NULL. Returns the loss. Passes: max; e = exp(x - max) and its sum s
 * (e kept in g); then g = (alpha scale / s) e - ..., on the row while it is in cache. One exp per
 * element. */
static T FN(xent_row)(const struct xent_args *a, const T *x, const uint16_t *xb, int64_t y, T *g, uint16_t *gb,
                      const void *next)
{
    const int64_t C = a->C;
    const T *w = (const T *)a->weight;
    const T ls = (T)a->label_smoothing;
    const int smooth = ls != 0;
    const T m = xb ? FN(row_max_bf16)(xb, C) : FN(row_max)(x, C);
    const T x_y = y == a->ignore_index ? 0 : xb ? (T)bf16_to_f32(xb[y]) : x[y];
    const int64_t next_bytes = next ? C * dtype_size(a->x.dtype) : 0;
    double wx = 0;
    /* the exp of bfloat16 grade without smoothing only: with it, gradients p_c - ls/C can cancel */
    const double s = xb ? FN(exp_sum_bf16)(xb, C, m, g, smooth ? &wx : NULL, next, next_bytes, !smooth)
                        : FN(exp_sum_next)(x, C, m, g, w, smooth ? &wx : NULL, next, next_bytes);
    /* The row's scalars in double (s comes in double): a coefficient is rounded to T once, when pass 3
     * takes it, so a gradient entry a e_c has e's error (~1 ulp), a's and its product's (half an ulp
     * each): within 4 eps of the truth at any C (tests/ops/cpu/test_row_accuracy.py). log_s is the
     * log-sum-exp relative to m (float rows' exps are scaled: _native_rowops.h). */
    const double log_s = log(s) + (xb ? 0 : FN(exp_offset)(m));

    if (y == a->ignore_index) {
        /* loss 0; gradient 0 * softmax, so NaN where the row has a NaN (torch's log_softmax backward) */
        if (gb) FN(affine_bf16)(gb, g, C, (T)(0 / s), 0, 0);
        else if (g) FN(affine)(g, C, (T)(0 / s), 0, NULL);
        return 0;
    }
    /* (x_y - m) - log s, not x_y - lse: lse = m + log s would round log s to the ulp of m; the
     * difference of two floats is exact in double */
    const double w_y = w ? w[y] : 1, logp_y = ((double)x_y - m) - log_s, sc = a->scale, lsd = a->label_smoothing;
    double loss, alpha, beta;
    if (a->gamma != 0) {
        /* d/dx_c of -q^g log p_y, q = 1 - p_y, is b (p_c - [c == y]) with
         * b = q^g - g p_y q^(g-1) log p_y; q^(g-1) log p_y = q^g (log p_y / q), whose limit at q = 0 is -q^g. */
        const double gm = a->gamma, q = -expm1(logp_y), q_g = pow(q, gm);
        const double ratio = q > 0 ? logp_y / q : -1;
        loss = -w_y * q_g * logp_y;
        beta = w_y * q_g * (1 - gm * exp(logp_y) * ratio);
        alpha = beta;
    } else {
        loss = -(1 - lsd) * w_y * logp_y;
        beta = (1 - lsd) * w_y;
        alpha = beta + lsd * a->weight_sum / (double)C;
    }
    if (smooth) loss += lsd / (double)C * (a->weight_sum * log_s - wx);
    const T ka = (T)(sc * alpha / s), kb = (T)(sc * lsd / (double)C);
    /* the target's entry sc (alpha e_y / s - beta) - kb w_y in double: its terms are near each other when
     * p_y is near 1 */
    const double e_y = g ? g[gb ? FN(pair_index)(y, C) : y] : 0;
    const T g_y = (T)(sc * (alpha * e_y / s - beta) - sc * lsd / (double)C * w_y);
    if (gb) {
        /* s is NaN when some e is (a NaN logit, or a row of -inf); else every e is in [0, 1] and the
         * coefficients are finite: no gradient is NaN */
        FN(affine_bf16)(gb, g, C, ka, kb, s == s && alpha == alpha);
        gb[y] = f32_to_bf16((float)g_y);
    } else if (g) {
        FN(affine)(g, C, ka, kb, w);
        g[y] = g_y;
    }
    return (T)loss;
}

/* ---- probability targets -------------------------------------------------------------------------------
 * Pass 1 finds the max m and sums wt = w (keep t + add) (w = 1 when absent), reading x and t from
 * memory side by side; pass 2 stores e = exp(x - m) and sums it and wt (x - m); the loss is
 * log(s) sum wt - sum wt (x - m) (two terms >= 0 for targets >= 0), and pass 3 writes
 * g = scale ((sum wt / s) e - wt) and tg = scale keep w (log s - (x - m)). Each sum is kept per residue
 * of c modulo 2W (two vectors per block of 2W elements; pass 1 keeps two such pairs, for alternate
 * blocks, added vector-wise at the end), the residues added in the order 0, 1, ..., 2W - 1, then the
 * last C % 2W elements one by one in element order. Float rows hold residues 0..W-1 in the first
 * vector of a block and W..2W-1 in the second; contiguous bfloat16 rows (T = float, 2W = 16) are read
 * as pairs, whose vectors hold the even and the odd residues (e then kept in pair order, see
 * _native_rowops.h). Either way each sum is the same float operations on the same values in the same
 * order, so a bfloat16 row's loss and gradients are the float path's on its values, the gradients
 * rounded once (bit for bit, tested). The gradient p - t cancels where p ~ t: the full exp, never the
 * bfloat16 grade. Each pass is inlined into one copy per case (pairs or float rows; class weights, then
 * with smoothing; label smoothing; neither), its options constants: no test in the loops.
 * Per element, 1 thread, 1024x8192 from memory (loaded machine): float32 2.3 -> 0.7-0.8 ns (it had two
 * scalar loops whose serial add chains cost about 4 cycles an element), bfloat16 2.75 -> 0.63 ns. */

/* The row's pointers and constants: x or (pairs) xb; t or tb; gradients g or gb (g then scratch for
 * e in pair order), tg or tgb, absent ones NULL; next and next_t: the next rows of x and t to prefetch
 * (next_bytes each), or NULL. */
struct FN(prob_row) {
    const T *x, *t, *w;
    const uint16_t *xb, *tb;
    T *g, *tg;
    uint16_t *gb, *tgb;
    const void *next, *next_t;
    int64_t C, next_bytes;
    T keep, add;
};

/* Block [c, c + 2W) of a row as its two vectors: a float row's halves, or a bfloat16 row's pairs. */
INLINE void FN(block)(const T *x, const uint16_t *xb, int64_t c, VT *lo, VT *hi, const int pairs)
{
    if (pairs) {
        FN(bf16_pairs)(xb, c, lo, hi);
    } else {
        *lo = FN(load)(x + c);
        *hi = FN(load)(x + c + W);
    }
}

/* Lanes [0, n) of the row from c in element order (x or the bfloat16 xb), the rest fill. */
INLINE VT FN(part)(const T *x, const uint16_t *xb, int64_t c, int64_t n, T fill, const int pairs)
{
    return pairs ? FN(bf16_part)(xb, c, n, fill) : FN(load_part)(x + c, n, fill);
}

/* A sum's 2W residues (see above) in double: each loop iteration adds its float vectors (at most two
 * blocks' terms a lane) here, so a sum over a whole row keeps a double's accuracy at any C, where its
 * float residues had drifted (loss 9.6 eps, gradient 25-42 eps normwise at C = 1e6). */
typedef struct { FN(acc_t) lo, hi; } FN(res_acc);

INLINE void FN(res_add)(FN(res_acc) *a, VT lo, VT hi)
{
    FN(acc_add)(&a->lo, lo);
    FN(acc_add)(&a->hi, hi);
}

/* The residues 0, 1, ..., 2W - 1 added in order (the same for both layouts, see above). */
INLINE double FN(residue_sum)(FN(res_acc) a, const int pairs)
{
    double s = 0;
    for (int r = 0; r < 2 * W; r++)
        s += pairs ? FN(acc_lane)(r & 1 ? &a.hi : &a.lo, r >> 1) : FN(acc_lane)(r < W ? &a.lo : &a.hi, r % W);
    return s;
}

/* wt = w (keep t + add) on lanes [c, c + n) of the row's layout (with pairs, w is in pair order too;
 * keep t + add without class weights, t itself without smoothing either: keep = 1, add = 0). */
INLINE VT FN(target_weight)(VT t, VT vkeep, VT vadd, const T *w, int64_t c, int64_t n, const int opts)
{
    const VT wt = opts & PROB_SMOOTH ? vkeep * t + vadd : t;
    if (!(opts & PROB_WEIGHTS)) return wt;
    return (n == W ? FN(load)(w + c) : FN(load_part)(w + c, n, 0)) * wt;
}

/* One block of pass 1 at c: the max of x into (*m0, *m1) and the sum of wt into (*s0, *s1). */
INLINE void FN(prob_max_block)(const struct FN(prob_row) *r, int64_t c, VT vkeep, VT vadd, VT *m0, VT *m1, VT *s0,
                               VT *s1, const int opts)
{
    const int pairs = opts & PROB_PAIRS;
    VT x0, x1, t0, t1;
    FN(block)(r->x, r->xb, c, &x0, &x1, pairs);
    FN(block)(r->t, r->tb, c, &t0, &t1, pairs);
    *m0 = FN(vmax)(*m0, x0);
    *m1 = FN(vmax)(*m1, x1);
    *s0 += FN(target_weight)(t0, vkeep, vadd, r->w, c, W, opts);
    *s1 += FN(target_weight)(t1, vkeep, vadd, r->w, c + W, W, opts);
}

/* Pass 1: returns the max of x and writes sum wt to *wt_sum. Two blocks at a time into two sets of
 * vectors (the max and the sum are each a chain of dependent operations: two chains hide their
 * latency), the sets added block-wise (sum), whatever the layout, before the residues. */
INLINE T FN(prob_max_impl)(const struct FN(prob_row) *r, double *wt_sum, const int opts)
{
    const int pairs = opts & PROB_PAIRS;
    const int64_t C = r->C;
    const VT vkeep = FN(splat)(r->keep), vadd = FN(splat)(r->add), zero = FN(splat)(0);
    VT m0 = FN(splat)(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    FN(res_acc) acc = {FN(acc_zero)(), FN(acc_zero)()};
    int64_t c = 0;
    for (; c + 4 * W <= C; c += 4 * W) {
        VT s0 = zero, s1 = zero, s2 = zero, s3 = zero;
        FN(prob_max_block)(r, c, vkeep, vadd, &m0, &m1, &s0, &s1, opts);
        FN(prob_max_block)(r, c + 2 * W, vkeep, vadd, &m2, &m3, &s2, &s3, opts);
        FN(res_add)(&acc, s0 + s2, s1 + s3);
    }
    if (c + 2 * W <= C) {
        VT s0 = zero, s1 = zero;
        FN(prob_max_block)(r, c, vkeep, vadd, &m0, &m1, &s0, &s1, opts);
        FN(res_add)(&acc, s0, s1);
        c += 2 * W;
    }
    double sw = FN(residue_sum)(acc, pairs);
    for (; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        m0 = FN(vmax)(m0, FN(part)(r->x, r->xb, c, n, -INFINITY, pairs));
        const VT wv = FN(target_weight)(FN(part)(r->t, r->tb, c, n, 0, pairs), vkeep, vadd, r->w, c, n, opts);
        for (int64_t j = 0; j < n; j++) sw += wv[j];
    }
    *wt_sum = sw;
    return FN(hmax)(FN(vmax)(FN(vmax)(m0, m2), FN(vmax)(m1, m3)));
}

/* One block of pass 2 at c: e stored (if e), its sum into (*se0, *se1), sum wt (x - m) into (*sd0, *sd1). */
INLINE void FN(prob_exp_block)(const struct FN(prob_row) *r, int64_t c, T *e, VT vm, VT vkeep, VT vadd, VT *se0,
                               VT *se1, VT *sd0, VT *sd1, const int opts)
{
    const int pairs = opts & PROB_PAIRS;
    VT x0, x1, t0, t1;
    FN(block)(r->x, r->xb, c, &x0, &x1, pairs);
    FN(block)(r->t, r->tb, c, &t0, &t1, pairs);
    const VT d0 = x0 - vm, d1 = x1 - vm, e0 = VEXP(d0), e1 = VEXP(d1);
    if (e) {
        FN(store)(e + c, e0);
        FN(store)(e + c + W, e1);
    }
    *se0 += e0;
    *se1 += e1;
    *sd0 += FN(target_weight)(t0, vkeep, vadd, r->w, c, W, opts) * d0;
    *sd1 += FN(target_weight)(t1, vkeep, vadd, r->w, c + W, W, opts) * d1;
}

/* Pass 2: stores e (into r->g if given) and returns s; sum wt (x - m) into *wtd. Two blocks at a time
 * (the same sums in the same order as one at a time), the next rows of x and t prefetched a line at a
 * time (as in exp_sum_impl): in L2 when pass 1 reads them. */
INLINE double FN(prob_exp_impl)(const struct FN(prob_row) *r, T m, double *wtd, const int opts)
{
    const int pairs = opts & PROB_PAIRS;
    const int64_t C = r->C, esize = pairs ? 2 : (int64_t)sizeof(T); /* bytes of an element of x and t */
    const char *next = r->next, *next_t = r->next_t;
    const int64_t next_bytes = r->next_bytes;
    T *e = r->g;
    const uint16_t *gb = r->gb;
    const VT vm = FN(splat)(m), vkeep = FN(splat)(r->keep), vadd = FN(splat)(r->add);
    const VT zero = FN(splat)(0);
    FN(res_acc) acc_e = {FN(acc_zero)(), FN(acc_zero)()}, acc_d = acc_e;
    int64_t c = 0;
    for (; c + 4 * W <= C; c += 4 * W) {
        VT se0 = zero, se1 = zero, sd0 = zero, sd1 = zero;
        if (c * esize < next_bytes) {
            for (int64_t o = 0; o < 4 * W * esize; o += 64) {
                __builtin_prefetch(next + c * esize + o, 0, 2);
                __builtin_prefetch(next_t + c * esize + o, 0, 2);
            }
        }
        /* pairs: this row's bfloat16 gradient, first written by pass 3 (a float row's is e, written here) */
        if (pairs && gb) __builtin_prefetch(gb + c, 1, 2);
        FN(prob_exp_block)(r, c, e, vm, vkeep, vadd, &se0, &se1, &sd0, &sd1, opts);
        FN(prob_exp_block)(r, c + 2 * W, e, vm, vkeep, vadd, &se0, &se1, &sd0, &sd1, opts);
        FN(res_add)(&acc_e, se0, se1);
        FN(res_add)(&acc_d, sd0, sd1);
    }
    if (c + 2 * W <= C) {
        VT se0 = zero, se1 = zero, sd0 = zero, sd1 = zero;
        FN(prob_exp_block)(r, c, e, vm, vkeep, vadd, &se0, &se1, &sd0, &sd1, opts);
        FN(res_add)(&acc_e, se0, se1);
        FN(res_add)(&acc_d, sd0, sd1);
        c += 2 * W;
    }
    double s = FN(residue_sum)(acc_e, pairs), sd = FN(residue_sum)(acc_d, pairs);
    for (; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        const VT d = FN(part)(r->x, r->xb, c, n, -INFINITY, pairs) - vm, ev = VEXP(d);
        const VT wd = FN(target_weight)(FN(part)(r->t, r->tb, c, n, 0, pairs), vkeep, vadd, r->w, c, n, opts) * d;
        if (e) FN(store_part)(e + c, n, ev);
        for (int64_t j = 0; j < n; j++) {
            s += ev[j];
            sd += wd[j];
        }
    }
    *wtd = sd;
    return s;
}

/* Pass 3's arithmetic on one vector of elements [c, c + n) (element order, or a pair-order half): the
 * gradient scale (b e - wt), b = sum wt / s, and the target's gradient sk w (log s - d), sk = scale keep.
 * Without class weights each has one product that an add or subtract could absorb (b e: p - t, fused
 * where the clone has FMA, is p - t rounded once), so the compiler contracts it alike on float rows
 * and on pairs; a e - scale wt had two, and the two paths' copies did not pick the same one. */
INLINE VT FN(prob_grad_v)(VT e, VT wt, VT vb, VT vscale) { return vscale * (vb * e - wt); }

INLINE VT FN(prob_tgrad_v)(VT d, VT vsk, VT vlog_s, const T *w, int64_t c, int64_t n, const int opts)
{
    const VT f = opts & PROB_WEIGHTS ? vsk * (n == W ? FN(load)(w + c) : FN(load_part)(w + c, n, 0)) : vsk;
    return f * (vlog_s - d);
}

/* Outputs of a block stored: a float row's two halves at p + c, or (pairs) rounded to bfloat16 in
 * registers and written in element order as even | odd << 16 words; no_nan: none is NaN (see
 * xent_prob_row), and the rounding leaves out its NaN fix-up. */
INLINE void FN(prob_store)(T *p, uint16_t *pb, int64_t c, VT lo, VT hi, const int no_nan, const int pairs)
{
    if (pairs) {
        const v8u32 words = bf16_round8_words((v8f)lo, no_nan) | (bf16_round8_words((v8f)hi, no_nan) << 16);
        memcpy(pb + c, &words, sizeof words);
    } else {
        FN(store)(p + c, lo);
        FN(store)(p + c + W, hi);
    }
}

/* Lanes [0, n) of a vector stored in element order at p + c, or at pb + c rounded to bfloat16. */
INLINE void FN(prob_store_part)(T *p, uint16_t *pb, int64_t c, int64_t n, VT v, const int no_nan, const int pairs)
{
    if (pairs) {
        const v8u32 words = bf16_round8_words((v8f)v, no_nan);
        for (int64_t j = 0; j < n; j++) pb[c + j] = (uint16_t)words[j];
    } else {
        FN(store_part)(p + c, n, v);
    }
}

/* Pass 3 (see above), on the row in cache; g may be the e of pass 2 (in place), tg may be t. */
INLINE void FN(prob_grad_impl)(const struct FN(prob_row) *r, T m, T b, T scale, T log_s, const int no_nan,
                               const int opts)
{
    const int pairs = opts & PROB_PAIRS;
    const int64_t C = r->C;
    const T *x = r->x, *t = r->t, *w = r->w, *e = r->g;
    const uint16_t *xb = r->xb, *tb = r->tb;
    T *g = r->g, *tg = r->tg;
    uint16_t *gb = r->gb, *tgb = r->tgb;
    const int want_g = g || gb, want_tg = tg || tgb;
    const VT vm = FN(splat)(m), vkeep = FN(splat)(r->keep), vadd = FN(splat)(r->add), vb = FN(splat)(b),
             vscale = FN(splat)(scale), vsk = FN(splat)(scale * r->keep), vlog_s = FN(splat)(log_s);
    VT t0, t1, x0, x1;
    int64_t c = 0;
    for (; c + 2 * W <= C; c += 2 * W) {
        FN(block)(t, tb, c, &t0, &t1, pairs);
        if (want_g)
            FN(prob_store)(g, gb, c,
                           FN(prob_grad_v)(FN(load)(e + c), FN(target_weight)(t0, vkeep, vadd, w, c, W, opts), vb,
                                           vscale),
                           FN(prob_grad_v)(FN(load)(e + c + W), FN(target_weight)(t1, vkeep, vadd, w, c + W, W, opts),
                                           vb, vscale),
                           no_nan, pairs);
        if (want_tg) {
            FN(block)(x, xb, c, &x0, &x1, pairs);
            FN(prob_store)(tg, tgb, c, FN(prob_tgrad_v)(x0 - vm, vsk, vlog_s, w, c, W, opts),
                           FN(prob_tgrad_v)(x1 - vm, vsk, vlog_s, w, c + W, W, opts), no_nan, pairs);
        }
    }
    for (; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        const VT wt = FN(target_weight)(FN(part)(t, tb, c, n, 0, pairs), vkeep, vadd, w, c, n, opts);
        if (want_g)
            FN(prob_store_part)(g, gb, c, n, FN(prob_grad_v)(FN(load_part)(e + c, n, 0), wt, vb, vscale), no_nan,
                                pairs);
        if (want_tg)
            FN(prob_store_part)(tg, tgb, c, n,
                                FN(prob_tgrad_v)(FN(part)(x, xb, c, n, 0, pairs) - vm, vsk, vlog_s, w, c, n, opts),
                                no_nan, pairs);
    }
}

/* One row with a probability target, its three passes inlined with options opts (see above); returns
 * its loss. */
INLINE T FN(prob_row_impl)(const struct xent_args *a, const struct FN(prob_row) *row, const int opts)
{
    /* a copy that no store of the passes can alias: its pointers stay in registers through the loops */
    const struct FN(prob_row) local = *row, *r = &local;
    const T scale = (T)a->scale;
    double wt_sum, wtd;
    const T m = FN(prob_max_impl)(r, &wt_sum, opts);
    /* the row's scalars in double, rounded once for pass 3 */
    const double s = FN(prob_exp_impl)(r, m, &wtd, opts), log_s = log(s);
    const T b = (T)(wt_sum / s);
    if (r->g || r->gb || r->tg || r->tgb) {
        /* s is NaN when some e is (a NaN logit, or a row of -inf), else in [1, C]; every wt is finite
         * when their sum is. Then every e is in [0, 1] and no gradient is NaN: scale (b e - wt) has
         * finite factors, and scale keep w (log s - (x - m)) is +inf at x = -inf, NaN only times 0 (a
         * zero scale keep, or a zero class weight: then the target's gradient keeps the fix-up). */
        const T sk = scale * r->keep;
        const int no_nan = (opts & PROB_PAIRS) && s == s && isfinite(wt_sum) && isfinite(b) && isfinite(scale) &&
                           (!r->tgb || (sk != 0 && isfinite(sk) && !r->w));
        if (no_nan) FN(prob_grad_impl)(r, m, b, scale, (T)log_s, 1, opts);
        else FN(prob_grad_impl)(r, m, b, scale, (T)log_s, 0, opts);
    }
    /* sum wt (log s - (x - m)): both terms >= 0 for targets >= 0, no cancellation */
    return (T)(log_s * wt_sum - wtd);
}

/* One row with a probability target: r->xb set for pairs (T = float), else float rows. */
HOT static T FN(xent_prob_row)(const struct xent_args *a, const struct FN(prob_row) *r)
{
    const int smooth = r->keep != 1 || r->add != 0;
    if (DTYPE_OF_T == DT_F32 && r->xb) {
        if (r->w) return FN(prob_row_impl)(a, r, PROB_PAIRS | PROB_WEIGHTS | PROB_SMOOTH);
        return smooth ? FN(prob_row_impl)(a, r, PROB_PAIRS | PROB_SMOOTH) : FN(prob_row_impl)(a, r, PROB_PAIRS);
    }
    if (r->w) return FN(prob_row_impl)(a, r, PROB_WEIGHTS | PROB_SMOOTH);
    return smooth ? FN(prob_row_impl)(a, r, PROB_SMOOTH) : FN(prob_row_impl)(a, r, 0);
}

/* Rows [r0, r1) of one call: load (or point at) each row, run it, store the outputs. */
static int FN(xent_range)(const struct xent_args *a, int64_t r0, int64_t r1)
{
    const int64_t C = a->C;
    const int prob = a->t.ptr != NULL;
    const int x_direct = a->x.dtype == DTYPE_OF_T && a->x.sc == 1;
    const int g_direct = a->g.dtype == DTYPE_OF_T && a->g.sc == 1;
    /* Contiguous bfloat16 rows with index targets and no class weights, or with contiguous bfloat16
     * probability targets, are read, and their gradients written, in bfloat16 by the pair-order passes
     * (no float copy of a row made or stored back); probability targets' class weights are copied in
     * pair order (wp: C floats), as their passes read them beside t. */
    const int pairs = DTYPE_OF_T == DT_F32 && is_bf16_row(&a->x) && (!a->g.ptr || is_bf16_row(&a->g)) &&
                      (prob ? is_bf16_row(&a->t) && (!a->tg.ptr || is_bf16_row(&a->tg)) : !a->weight);
    const int t_direct = a->t.dtype == DTYPE_OF_T && a->t.sc == 1;
    const int tg_direct = a->tg.dtype == DTYPE_OF_T && a->tg.sc == 1;
    /* Scratch rows (C * sizeof(T) each, in cache beside the row): x and t converted to T where they
     * are not contiguous rows of T, and the gradients formed there before they are stored (with pairs,
     * e in pair order). */
    T *xs = NULL, *gs = NULL, *ts = NULL, *wp = NULL;
    const T *w = (const T *)a->weight;
    int err = 0;
    if ((!x_direct && !pairs && !(xs = malloc((size_t)C * sizeof(T)))) ||
        (a->g.ptr && !g_direct && !(gs = malloc((size_t)C * sizeof(T)))) ||
        (prob && !pairs && (!t_direct || (a->tg.ptr && !tg_direct)) && !(ts = malloc((size_t)C * sizeof(T)))) ||
        (prob && pairs && w && !(wp = malloc((size_t)C * sizeof(T)))))
        err = ERR_NOMEM;
    if (wp)
        for (int64_t c = 0; c < C; c++) wp[FN(pair_index)(c, C)] = w[c];
    T *loss = (T *)a->loss;
    for (int64_t r = r0; r < r1 && !err; r++) {
        const int64_t y = prob ? 0 : a->target[r];
        if (!prob && y != a->ignore_index && (y < 0 || y >= C)) { err = ERR_TARGET; break; }
        const T *x = xs;
        const uint16_t *xb = pairs ? (const uint16_t *)a->x.ptr + row_offset(&a->x, r, a->L) : NULL;
        if (x_direct) x = (const T *)a->x.ptr + row_offset(&a->x, r, a->L);
        else if (!pairs) FN(load_row)(xs, &a->x, r, a->L, C);
        T *g = NULL;
        uint16_t *gb = NULL;
        if (a->g.ptr) g = g_direct ? (T *)a->g.ptr + row_offset(&a->g, r, a->L) : gs;
        if (a->g.ptr && pairs) gb = (uint16_t *)a->g.ptr + row_offset(&a->g, r, a->L);
        /* the next row, where its elements are contiguous, is prefetched during this row's exp pass */
        const void *next = a->x.sc == 1 && r + 1 < r1
                               ? (const char *)a->x.ptr + row_offset(&a->x, r + 1, a->L) * dtype_size(a->x.dtype)
                               : NULL;
        if (!prob) {
            loss[r] = FN(xent_row)(a, x, xb, y, g, gb, next);
            if (g && !g_direct && !gb) FN(store_row)(&a->g, r, a->L, C, g);
            continue;
        }
        struct FN(prob_row) row = {.x = x, .w = wp ? wp : w, .xb = xb, .g = g, .gb = gb, .C = C,
                                   .keep = 1 - (T)a->label_smoothing, .add = (T)a->label_smoothing / (T)C};
        /* the next rows of x and t, where both are contiguous in one dtype, are prefetched in pass 2 */
        if (next && a->t.sc == 1 && a->t.dtype == a->x.dtype) {
            row.next = next;
            row.next_t = (const char *)a->t.ptr + row_offset(&a->t, r + 1, a->L) * dtype_size(a->t.dtype);
            row.next_bytes = C * dtype_size(a->x.dtype);
        }
        if (pairs) {
            row.tb = (const uint16_t *)a->t.ptr + row_offset(&a->t, r, a->L);
            if (a->tg.ptr) row.tgb = (uint16_t *)a->tg.ptr + row_offset(&a->tg, r, a->L);
        } else {
            /* tg is formed in place of t (each t[c] is read before tg[c] is written) */
            if (t_direct) row.t = (const T *)a->t.ptr + row_offset(&a->t, r, a->L);
            if (!t_direct || (a->tg.ptr && !tg_direct)) {
                if (t_direct) memcpy(ts, row.t, (size_t)C * sizeof(T));
                else FN(load_row)(ts, &a->t, r, a->L, C);
                row.t = ts;
            }
            if (a->tg.ptr) row.tg = tg_direct ? (T *)a->tg.ptr + row_offset(&a->tg, r, a->L) : ts;
        }
        loss[r] = FN(xent_prob_row)(a, &row);
        if (g && !g_direct && !gb) FN(store_row)(&a->g, r, a->L, C, g);
        if (row.tg && !tg_direct) FN(store_row)(&a->tg, r, a->L, C, row.tg);
    }
    free(xs);
    free(gs);
    free(ts);
    free(wp);
    return err;
}
