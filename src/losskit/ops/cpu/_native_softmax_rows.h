/* Row kernels of losskit.ops.cpu._native_softmax, written once for an accumulation type T.
 *
 * Instantiated by _native_softmax.c through _native_instantiate.h (T = float and T = double); the
 * shared row passes (max, exp and sum, affine, vector load/store) come from _native_rowops.h.
 *
 * Reference expressions, per row of C entries (x: input, y: output, g: grad_output):
 *   softmax        y = exp(x - m) / s,        m = max x, s = sum exp(x - m)
 *   log_softmax    y = (x - m) - log s
 *   backward       gin = y (g - sum(g y))     (softmax),   gin = g - exp(y) sum(g)   (log_softmax)
 *   entropy        H = log s - sum_c p_c z_c, z = x - m, p = exp(z) / s   (logits)
 *                  dH/dx_c = p_c (sum_k p_k z_k - z_c), 0 where p_c = 0
 *   entropy        H = -sum_c xlogy(p_c, p_c), dH/dp_c = -(log p_c + 1), 0 where p_c = 0   (probabilities)
 * Passes over a row: the first reads it from memory; the later ones find it (and the output row) in
 * L1/L2 while they fit (C = 8192 float32: 32 KiB per row), so memory sees one read of each input row and
 * one write of each output row. One exp per element (forward; log_softmax's backward recomputes exp(y)).
 * Rows whose entries are strided (L > 1) and short rows run W at a time in column tiles instead, one row
 * per vector lane (section "column tiles" below); nll_loss writes its gradient in tiles at the end.
 * Calls whose operands are all contiguous bfloat16 rows read and write them in registers, as pairs
 * (section "contiguous bfloat16 rows").
 */

#include "_native_rowops.h"

/* A vector of lanes [0, n) of p (n <= W), the rest fill; and its store. */
INLINE VT FN(get)(const T *p, int64_t n, T fill) { return n == W ? FN(load)(p) : FN(load_part)(p, n, fill); }
INLINE void FN(put)(T *p, int64_t n, VT v)
{
    if (n == W) FN(store)(p, v);
    else FN(store_part)(p, n, v);
}

/* ---- operand rows -------------------------------------------------------------------------------------- */

INLINE int FN(direct)(const struct view *v) { return v->dtype == DTYPE_OF_T && v->sc == 1; }

/* Row r of v as C contiguous T: a pointer into v when its rows are contiguous T, else converted into
 * scratch. */
INLINE const T *FN(row_in)(const struct view *v, int64_t r, int64_t L, int64_t C, T *scratch)
{
    if (FN(direct)(v)) return (const T *)v->ptr + row_offset(v, r, L);
    FN(load_row)(scratch, v, r, L, C);
    return scratch;
}

/* Where output row r of v is formed: in v when its rows are contiguous T, else in scratch and stored
 * by row_out_done. */
INLINE T *FN(row_out)(const struct view *v, int64_t r, int64_t L, T *scratch)
{
    return FN(direct)(v) ? (T *)v->ptr + row_offset(v, r, L) : scratch;
}

INLINE void FN(row_out_done)(const struct view *v, int64_t r, int64_t L, int64_t C, const T *row)
{
    if (!FN(direct)(v)) FN(store_row)(v, r, L, C, row);
}

/* v rounded to the storage dtype dt (DT_BF16 or DT_F16; any other code: v). */
INLINE T FN(round_to)(T v, int dt)
{
    if (dt == DT_BF16) return (T)bf16_to_f32(f32_to_bf16((float)v));
    if (dt == DT_F16) return (T)(_Float16)v;
    return v;
}

/* The dtype log_softmax rounds its log-sum to (see softmax_row): the output's, for bfloat16/float16 rows
 * along the innermost dim (L = 1); else -1. */
INLINE int FN(round_dt)(const struct rows_args *a)
{
    return (a->out.dtype == DT_BF16 || a->out.dtype == DT_F16) && a->L == 1 ? a->out.dtype : -1;
}

/* ---- per-element expressions (one each, shared by the passes on T rows and on bfloat16 pairs) ---------- */

INLINE VT FN(shifted)(VT x, T a, T b) { return (x - a) - b; }
INLINE VT FN(softmax_gin)(VT y, VT g, T d) { return y * (g - d); }
/* log_softmax backward from ey = exp(y) */
INLINE VT FN(log_softmax_gin)(VT ey, VT g, T sg) { return g - ey * sg; }
/* e (x - m) where e != 0 (a -inf logit has e = 0 and contributes 0, not 0 * -inf); a NaN e propagates */
INLINE VT FN(ez)(VT x, VT e, T m) { return FN(select)(e != 0, e * (x - m), FN(splat)(0)); }
INLINE VT FN(entropy_gin)(VT x, VT e, T m, T mz, T s)
{
    return FN(select)(e != 0, e * (mz - (x - m)), FN(splat)(0)) / s;
}

/* ---- passes -------------------------------------------------------------------------------------------- */

/* y = (x - a) - b */
HOT static void FN(shift)(const T *x, T *y, int64_t C, T a, T b)
{
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        FN(put)(y + c, n, FN(shifted)(FN(get)(x + c, n, 0), a, b));
    }
}

/* sum_c a[c] b[c] (b NULL: sum_c a[c]) */
HOT static T FN(dot)(const T *a, const T *b, int64_t C)
{
    FN(acc_t) acc = FN(acc_zero)();
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        const VT va = FN(get)(a + c, n, 0);
        FN(acc_add)(&acc, b ? va * FN(get)(b + c, n, 0) : va);
    }
    return FN(acc_total)(acc);
}

/* softmax backward: gin = y (g - d), d = sum(g y); gin may be g. */
HOT static void FN(softmax_grad)(const T *y, const T *g, T *gin, int64_t C, T d)
{
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        FN(put)(gin + c, n, FN(softmax_gin)(FN(get)(y + c, n, 0), FN(get)(g + c, n, 0), d));
    }
}

/* log_softmax backward: gin = g - exp(y) sg, sg = sum(g); y <= 0 (log-probabilities); gin may be g. */
HOT static void FN(log_softmax_grad)(const T *y, const T *g, T *gin, int64_t C, T sg)
{
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        FN(put)(gin + c, n, FN(log_softmax_gin)(VEXP(FN(get)(y + c, n, -INFINITY)), FN(get)(g + c, n, 0), sg));
    }
}

/* sum_c e[c] (x[c] - m) over the entries with e[c] != 0 (see ez). */
HOT static double FN(sum_ez)(const T *x, const T *e, int64_t C, T m)
{
    FN(acc_t) acc = FN(acc_zero)();
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        FN(acc_add)(&acc, FN(ez)(FN(get)(x + c, n, 0), FN(get)(e + c, n, 0), m));
    }
    return FN(acc_total)(acc);
}

/* entropy gradient from e = exp(x - m) (g may be e): g = e (mz - (x - m)) / s, where e = 0 0 / s (NaN in a
 * row whose s is NaN, as the torch path). */
HOT static void FN(entropy_grad)(const T *x, const T *e, T *g, int64_t C, T m, T mz, T s)
{
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        FN(put)(g + c, n, FN(entropy_gin)(FN(get)(x + c, n, 0), FN(get)(e + c, n, 0), m, mz, s));
    }
}

/* Vector natural log, for any x: 0 -> -inf, inf -> inf, x < 0 or NaN -> NaN; subnormals exact-scaled.
 * x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...),
 * s = (m - 1) / (m + 1), |s| <= 0.1716: the series to s^11 (float) or s^21 (double) leaves a first
 * omitted term below 2^-28 (2^-60) relative; log 2 split hi/lo (Cephes / fdlibm) as in the vector exp. */
INLINE VT FN(vlog)(VT x)
{
    typedef __typeof__(((VI){0})[0]) I;
    const int f32 = sizeof(T) == 4, mant = f32 ? 23 : 52, bias = f32 ? 127 : 1023, terms = f32 ? 5 : 10;
    const T smallest = f32 ? FLT_MIN : DBL_MIN, scale = (T)((I)1 << mant);
    const T ln2_hi = f32 ? 0.693359375 : 6.93147180369123816490e-01;
    const T ln2_lo = f32 ? -2.12194440e-4 : 1.90821492927058770002e-10;
    const VI sub = x < smallest; /* subnormal (or <= 0): scaled by 2^mant, its exponent corrected */
    const VI bits = (VI)FN(select)(sub, x * scale, x);
    const VI mant_mask = (VI){0} + (((I)1 << mant) - 1);
    VI e = (bits >> mant) - bias - (sub & mant);
    VT m = (VT)((bits & mant_mask) | ((VI){0} + ((I)bias << mant))); /* [1, 2) */
    const VI big = m > (T)1.41421356237309504880;
    m = FN(select)(big, m * (T)0.5, m);
    e -= big; /* big lanes are -1 */
    const VT s = (m - 1) / (m + 1), s2 = s * s;
    VT q = FN(splat)((T)1 / (2 * terms + 1));
    for (int k = terms - 1; k >= 1; k--) q = q * s2 + (T)1 / (2 * k + 1);
    /* e as T without an int64 -> double conversion (none in AVX2): magic + e in the bits of magic =
     * 1.5 * 2^mant, then minus magic; exact for |e| < 2^(mant - 1) */
    const T magic = (T)1.5 * scale;
    const VT ef = (VT)((VI)FN(splat)(magic) + e) - magic;
    VT r = ef * ln2_hi + ((2 * s) * (s2 * q) + ef * ln2_lo + 2 * s);
    r = FN(select)(x == 0, FN(splat)(-INFINITY), r);
    r = FN(select)(x == INFINITY, FN(splat)(INFINITY), r);
    return FN(select)((x < 0) | (x != x), FN(splat)(NAN), r);
}

/* log of x holding bfloat16 values (the low 16 bits of each float 0): the table log of _native_log.h
 * (log_bf16_v8f, every value and special value); the entropy tables' entries (build_bf16_tables) use it. */
INLINE VT FN(vlog_bf16)(VT x)
{
#if W == 8
    return log_bf16_v8f(x);
#else
    return FN(vlog)(x);
#endif
}

/* The entropy of probabilities' terms from lp = log p: p log p and the gradient -(log p + 1), each 0
 * where p = 0. */
INLINE VT FN(plogp)(VT vp, VT lp) { return FN(select)(vp != 0, vp * lp, FN(splat)(0)); }
INLINE VT FN(plogp_gin)(VT vp, VT lp) { return FN(select)(vp != 0, -(lp + 1), FN(splat)(0)); }

/* Entropy of probabilities: returns -sum_c xlogy(p, p); writes g = -(log p + 1), 0 where p = 0, if g.
 * bf16: p holds bfloat16 values (vlog_bf16). */
INLINE T FN(entropy_probs_impl)(const T *p, T *g, int64_t C, const int bf16)
{
    FN(acc_t) acc = FN(acc_zero)();
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        const VT vp = FN(get)(p + c, n, 0), lp = bf16 ? FN(vlog_bf16)(vp) : FN(vlog)(vp);
        FN(acc_add)(&acc, FN(plogp)(vp, lp));
        if (g) FN(put)(g + c, n, FN(plogp_gin)(vp, lp));
    }
    return -FN(acc_total)(acc);
}

HOT static T FN(entropy_probs)(const T *p, T *g, int64_t C, int bf16)
{
    return bf16 ? FN(entropy_probs_impl)(p, g, C, 1) : FN(entropy_probs_impl)(p, g, C, 0);
}

#if W == 8
/* ---- contiguous bfloat16 rows, in registers (T = float) -------------------------------------------------
 * Operands that are contiguous bfloat16 rows are read 16 elements at a time as even/odd pairs
 * (bf16_pairs, _native_rowops.h) and results written back as words lo | hi << 16, rounded to nearest
 * even, with no float copy of a row (the float rows' convert-in and convert-out passes cost more than
 * the arithmetic). One thread, C = 8192, ns/element from float rows to pairs (float32): in cache, softmax
 * 0.75 -> 0.53 (0.55), its backward 0.69 -> 0.40 (0.39), log_softmax's backward 0.86 -> 0.73 (0.55),
 * entropy of logits 1.03 -> 0.88 (0.83); 1024 rows from memory: 0.86 -> 0.50 (0.68), 0.80 -> 0.39
 * (0.77), 0.97 -> 0.74 (0.79), 1.14 -> 0.83 (0.98).
 * Every element goes through the expressions above; the exp is of bfloat16 grade (VEXP_BF16) for
 * softmax only, whose outputs e / s keep its 4.0e-6 relative error, and the full exp where a result
 * may cancel (log_softmax near 0 and its backward g - e^y sum g, the entropy gradient's log p + H);
 * the row sums add in pair order, so results agree with the float rows' to one bfloat16 step. e (exp(x - m))
 * is kept in pair order, as exp_sum_bf16 writes it; the last C % 16 elements are in element order.
 * Tables: a function of one bfloat16 value has 65536 arguments, so where an element's arithmetic is a
 * function of a bfloat16 operand alone it is read from a table over the bit patterns (build_bf16_tables)
 * instead of computed: exp(y) of log_softmax's backward, and p log p with the gradient -(log p + 1) of
 * the entropy of probabilities. Each entry is the float rows' own expression on that value, computed in
 * the same clone (HOT) as the loops that read it, so a table read gives the float rows' bits (tested
 * over every bit pattern; the entropy of probabilities adds its terms as the float rows do and equals
 * them bit for bit). log_softmax's forward sum, sum exp(x - m) = exp(-m) sum exp(x), reads exp(x) in
 * double from a table too (exp_sum_table: more accurate than the float exps, so not their bits; rounded
 * to bfloat16 as ATen rounds it, the output stays torch's to the bit, tested). One thread, C = 8192,
 * ns/element computed -> tables (float32), loaded machine: in cache, log_softmax forward 0.64 -> 0.47
 * (0.55), its backward 0.80 -> 0.55 (0.55), entropy of probabilities 1.40 -> 0.49 (1.31, through float
 * rows); 1024 rows from memory 0.73 -> 0.47 (0.85), 0.78 -> 0.54 (0.80), 1.43 -> 0.48 (1.28). The
 * backward's table read (two loads and an insert a lane) costs about what the exp it replaces does in
 * cache; from memory it wins. */

enum { BF_SHIFT, BF_SOFTMAX_GIN, BF_LOG_SOFTMAX_GIN, BF_ENTROPY_GIN, BF_EZ, BF_GY, BF_G };

/* One lane vector of an operation: x the row (or the saved output y), g grad_output, e exp(x - m). */
INLINE VT FN(bf16_op)(const int op, VT x, VT g, VT e, T k0, T k1, T k2)
{
    switch (op) {
    case BF_SHIFT: return FN(shifted)(x, k0, k1);
    case BF_SOFTMAX_GIN: return FN(softmax_gin)(x, g, k0);
    case BF_LOG_SOFTMAX_GIN: return FN(log_softmax_gin)(x, g, k0); /* x: exp(y), read from bf16_exp_table */
    case BF_ENTROPY_GIN: return FN(entropy_gin)(x, e, k0, k1, k2);
    case BF_EZ: return FN(ez)(x, e, k0);
    case BF_GY: return g * x;
    default: return g;
    }
}

/* Lanes [0, n) of a bfloat16 table's entries at the bit patterns xb[0], xb[step], ... (lanes from n on:
 * the entry of pattern 0). Scalar loads of the patterns and of the entries (extracting the patterns
 * from a vector cost two instructions a lane; vgatherdps is slower on Zen 3, see _native_binary.h's
 * lookup, and needs AVX2). */
INLINE VT FN(lookup)(const float *table, const uint16_t *xb, int step, int64_t n)
{
    VT v;
    for (int j = 0; j < W; j++) v[j] = table[j < n ? xb[j * step] : 0];
    return v;
}

/* The operands of block [c, c + 16) (pairs; lanes of e in pair order), or of the tail vector [c, c + n)
 * when n < 16, lanes from n on 0 (so that they add 0 to bf16_sum's sums). Operands an op does not read
 * stay 0. BF_LOG_SOFTMAX_GIN's x is exp(y), read from bf16_exp_table (tail lanes from n on: exp(0)). */
INLINE void FN(bf16_operands)(const int op, const uint16_t *xb, const uint16_t *gb, const T *e, int64_t c, int64_t n,
                              VT x[2], VT g[2], VT ev[2])
{
    const int use_x = op != BF_G, use_g = op == BF_SOFTMAX_GIN || op == BF_LOG_SOFTMAX_GIN || op >= BF_GY,
              use_e = op == BF_ENTROPY_GIN || op == BF_EZ, exp_x = op == BF_LOG_SOFTMAX_GIN;
    x[0] = x[1] = g[0] = g[1] = ev[0] = ev[1] = FN(splat)(0);
    if (exp_x && n == 16) { /* the even and the odd elements */
        x[0] = FN(lookup)(bf16_exp_table, xb + c, 2, W);
        x[1] = FN(lookup)(bf16_exp_table, xb + c + 1, 2, W);
    } else if (exp_x) x[0] = FN(lookup)(bf16_exp_table, xb + c, 1, n);
    if (n == 16) {
        if (use_x && !exp_x) FN(bf16_pairs)(xb, c, &x[0], &x[1]);
        if (use_g) FN(bf16_pairs)(gb, c, &g[0], &g[1]);
        if (use_e) {
            ev[0] = FN(load)(e + c);
            ev[1] = FN(load)(e + c + W);
        }
        return;
    }
    if (use_x && !exp_x) x[0] = FN(bf16_part)(xb, c, n, 0);
    if (use_g) g[0] = FN(bf16_part)(gb, c, n, 0);
    if (use_e) ev[0] = FN(get)(e + c, n, 0);
}

/* sum_c op(x, g, e)[c] over a row (ops BF_EZ, BF_GY, BF_G), in double lanes as dot. */
INLINE T FN(bf16_sum_impl)(const int op, const uint16_t *xb, const uint16_t *gb, const T *e, int64_t C, T k0)
{
    FN(acc_t) acc = FN(acc_zero)();
    VT x[2], g[2], ev[2];
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) {
        FN(bf16_operands)(op, xb, gb, e, c, 16, x, g, ev);
        FN(acc_add)(&acc, FN(bf16_op)(op, x[0], g[0], ev[0], k0, 0, 0));
        FN(acc_add)(&acc, FN(bf16_op)(op, x[1], g[1], ev[1], k0, 0, 0));
    }
    for (; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        FN(bf16_operands)(op, xb, gb, e, c, n, x, g, ev);
        FN(acc_add)(&acc, FN(bf16_op)(op, x[0], g[0], ev[0], k0, 0, 0));
    }
    return FN(acc_total)(acc);
}

HOT static T FN(bf16_sum)(int op, const uint16_t *xb, const uint16_t *gb, const T *e, int64_t C, T k0)
{
    switch (op) {
    case BF_EZ: return FN(bf16_sum_impl)(BF_EZ, xb, gb, e, C, k0);
    case BF_GY: return FN(bf16_sum_impl)(BF_GY, xb, gb, e, C, k0);
    default: return FN(bf16_sum_impl)(BF_G, xb, gb, e, C, k0);
    }
}

/* Write lanes [0, n) of v (element order) to ob + c, rounded to bfloat16. */
INLINE void FN(bf16_put_part)(uint16_t *ob, int64_t c, int64_t n, VT v)
{
    const v8u32 words = bf16_round8_words((v8f)v, 0);
    for (int64_t j = 0; j < n; j++) ob[c + j] = (uint16_t)words[j];
}

/* ob[c] = bf16(op(x, g, e)[c]) over a row (ops BF_SHIFT .. BF_ENTROPY_GIN); ob may be xb or gb (each
 * block is read before it is written). no_nan: as affine_bf16. */
INLINE void FN(bf16_map_impl)(const int op, const uint16_t *xb, const uint16_t *gb, const T *e, uint16_t *ob,
                              int64_t C, T k0, T k1, T k2, const int no_nan)
{
    VT x[2], g[2], ev[2];
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) {
        FN(bf16_operands)(op, xb, gb, e, c, 16, x, g, ev);
        const v8u32 lo = bf16_round8_words((v8f)FN(bf16_op)(op, x[0], g[0], ev[0], k0, k1, k2), no_nan),
                    hi = bf16_round8_words((v8f)FN(bf16_op)(op, x[1], g[1], ev[1], k0, k1, k2), no_nan);
        const v8u32 words = lo | (hi << 16);
        memcpy(ob + c, &words, sizeof words);
    }
    for (; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        FN(bf16_operands)(op, xb, gb, e, c, n, x, g, ev);
        FN(bf16_put_part)(ob, c, n, FN(bf16_op)(op, x[0], g[0], ev[0], k0, k1, k2));
    }
}

/* bf16_map_impl with op a constant in each case */
INLINE void FN(bf16_map_ops)(int op, const uint16_t *xb, const uint16_t *gb, const T *e, uint16_t *ob, int64_t C,
                             T k0, T k1, T k2, const int no_nan)
{
    switch (op) {
    case BF_SHIFT: FN(bf16_map_impl)(BF_SHIFT, xb, gb, e, ob, C, k0, k1, k2, no_nan); break;
    case BF_SOFTMAX_GIN: FN(bf16_map_impl)(BF_SOFTMAX_GIN, xb, gb, e, ob, C, k0, k1, k2, no_nan); break;
    case BF_LOG_SOFTMAX_GIN: FN(bf16_map_impl)(BF_LOG_SOFTMAX_GIN, xb, gb, e, ob, C, k0, k1, k2, no_nan); break;
    default: FN(bf16_map_impl)(BF_ENTROPY_GIN, xb, gb, e, ob, C, k0, k1, k2, no_nan); break;
    }
}

HOT static void FN(bf16_map)(int op, const uint16_t *xb, const uint16_t *gb, const T *e, uint16_t *ob, int64_t C,
                             T k0, T k1, T k2, int no_nan)
{
    if (no_nan) FN(bf16_map_ops)(op, xb, gb, e, ob, C, k0, k1, k2, 1);
    else FN(bf16_map_ops)(op, xb, gb, e, ob, C, k0, k1, k2, 0);
}

/* Entropy of a contiguous bfloat16 row of probabilities pb (gradient into gb unless NULL), each
 * element's p log p (as double) and gradient read from the tables: the terms of entropy_probs_impl
 * (bf16), added in the same double lanes and order (lane k: the elements c = k mod W), so the entropy and
 * the gradient are the float rows' to the bit. The float rows' fill lanes past C add +0, which changes no
 * lane (a lane starting at +0 is never -0). Scalar: a double lane per element position, no vector built. */
INLINE T FN(entropy_probs_bf16_impl)(const uint16_t *pb, uint16_t *gb, int64_t C, const int grad)
{
    double lane[W] = {0};
    int64_t c = 0;
    for (; c + W <= C; c += W)
        for (int j = 0; j < W; j += 2) { /* a word: elements j (low half) and j + 1 (high half) */
            uint32_t w;
            memcpy(&w, pb + c + j, sizeof w);
            lane[j] += bf16_plogp_table[w & 0xffff];
            lane[j + 1] += bf16_plogp_table[w >> 16];
            if (grad) {
                const uint32_t g =
                    bf16_entropy_grad_table[w & 0xffff] | (uint32_t)bf16_entropy_grad_table[w >> 16] << 16;
                memcpy(gb + c + j, &g, sizeof g);
            }
        }
    for (int j = 0; c + j < C; j++) {
        const uint16_t i = pb[c + j];
        lane[j] += bf16_plogp_table[i];
        if (grad) gb[c + j] = bf16_entropy_grad_table[i];
    }
    const FN(acc_t) acc = {{lane[0], lane[1], lane[2], lane[3]}, {lane[4], lane[5], lane[6], lane[7]}};
    return -FN(acc_total)(acc);
}

HOT static T FN(entropy_probs_bf16)(const uint16_t *pb, uint16_t *gb, int64_t C)
{
    return gb ? FN(entropy_probs_bf16_impl)(pb, gb, C, 1) : FN(entropy_probs_bf16_impl)(pb, NULL, C, 0);
}

/* log_softmax's sum on a bfloat16 row, sum_c exp(x_c - m) = exp(-m) sum_c exp(x_c), each exp(x_c) read
 * from bf16_exp_double_table (exp of every bit pattern, in double) and added in double (8 lanes): no
 * exp per element. NaN when the row's sum is not within [2^-960, 2^1000] (a NaN or +inf entry, only -inf,
 * logits past about +-660; the caller then takes exp_sum_bf16): inside, every term lost to underflow is
 * below 2^-62 of the sum, exp(-m) is finite and normal, and the result has a double's accuracy (the
 * float exps' sum: float rounding) before it is rounded to T. */
HOT static T FN(exp_sum_table)(const uint16_t *xb, int64_t C, T m, const void *next, int64_t next_bytes)
{
    double lane[8] = {0};
    int64_t c = 0;
    for (; c + 32 <= C; c += 32) {
        if (next && 2 * c < next_bytes) __builtin_prefetch((const char *)next + 2 * c, 0, 2); /* 64 bytes */
        for (int k = 0; k < 32; k += 8) { /* the patterns four to a 64-bit load: fewer loads than one each */
            uint64_t w[2];
            memcpy(w, xb + c + k, sizeof w);
            for (int j = 0; j < 8; j++) lane[j] += bf16_exp_double_table[(uint16_t)(w[j >> 2] >> (16 * (j & 3)))];
        }
    }
    for (int j = 0; c < C; c++, j = (j + 1) & 7) lane[j] += bf16_exp_double_table[xb[c]];
    const double sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    return sum >= 0x1p-960 && sum <= 0x1p1000 ? (T)(sum * exp(-(double)m)) : NAN;
}

/* The bfloat16 tables' entries (entropy: bf16_plogp_table and bf16_entropy_grad_table, else
 * bf16_exp_table): the float rows' own expressions on every bit pattern (VEXP of log_softmax_grad;
 * plogp and plogp_gin of vlog_bf16, the gradient rounded as store_row rounds it), in the same clone of
 * the kernels (HOT) as the loops that read them, so a table read gives the bits the float rows compute. */
HOT static void FN(build_bf16_tables)(int entropy)
{
    for (int64_t i = 0; i < 65536; i += W) {
        VT x;
        for (int j = 0; j < W; j++) x[j] = bf16_to_f32((uint16_t)(i + j));
        if (!entropy) {
            FN(store)(bf16_exp_table + i, VEXP(x));
            for (int j = 0; j < W; j++) bf16_exp_double_table[i + j] = exp((double)x[j]);
            continue;
        }
        const VT lp = FN(vlog_bf16)(x);
        const v8u32 g = bf16_round8_words((v8f)FN(plogp_gin)(x, lp), 0);
        const VT t = FN(plogp)(x, lp);
        for (int j = 0; j < W; j++) {
            bf16_plogp_table[i + j] = t[j];
            bf16_entropy_grad_table[i + j] = (uint16_t)g[j];
        }
    }
}
#endif

/* ---- one row of each operation ------------------------------------------------------------------------- */


/* Forward: y = softmax(x) or log_softmax(x); y is not x. round_dt: log_softmax rounds the sum and its
 * log to this storage dtype (bfloat16/float16 rows along the innermost dim: what ATen's last-dim kernel
 * does, so that the output is torch's to the bit), else -1. */
static void FN(softmax_row)(const T *x, T *y, int64_t C, int is_log, int round_dt)
{
    const T m = FN(row_max)(x, C);
    if (is_log) {
        /* the log-sum-exp relative to m from the double sum, rounded once; rows rounded like ATen's
         * (round_dt) round the sum of exp(x - m) first */
        if (round_dt < 0) {
            const double s = FN(exp_sum)(x, C, m, NULL, NULL, NULL);
            FN(shift)(x, y, C, m, (T)(log(s) + FN(exp_offset)(m)));
        } else {
            const T s = (T)FN(exp_sum_diff)(x, C, m, NULL);
            FN(shift)(x, y, C, m, FN(round_to)((T)LOG_SCALAR(FN(round_to)(s, round_dt)), round_dt));
        }
    } else {
        const double s = FN(exp_sum)(x, C, m, y, NULL, NULL);
        FN(affine)(y, C, (T)(1 / s), 0, NULL); /* y = e (1 / s): e's ulp, and half an ulp each for 1 / s and the product */
    }
}

/* Backward from the saved output y and grad_output g. */
static void FN(softmax_backward_row)(const T *y, const T *g, T *gin, int64_t C, int is_log)
{
    if (is_log) FN(log_softmax_grad)(y, g, gin, C, FN(dot)(g, NULL, C));
    else FN(softmax_grad)(y, g, gin, C, FN(dot)(g, y, C));
}

/* Entropy of softmax(x); e: C scratch entries that receive exp(x - m), or g itself; g: the gradient or
 * NULL. Returns H. */
static T FN(entropy_logits_row)(const T *x, T *e, T *g, int64_t C)
{
    const T m = FN(row_max)(x, C);
    const double s = FN(exp_sum_diff)(x, C, m, e); /* e = exp(z), z = x - m: unscaled, as the terms need */
    const double mz = FN(sum_ez)(x, e, C, m) / s; /* sum_c p_c z_c <= 0 */
    if (g) FN(entropy_grad)(x, e, g, C, m, (T)mz, (T)s);
    return (T)(log(s) - mz); /* two terms >= 0 */
}

#if W == 8
/* Whether the call's rows run on pairs (bf16_row): every operand a contiguous bfloat16 row (entries 1
 * apart). Other layouts and mixed dtypes convert rows into float scratch. */
static int FN(bf16_rows)(const struct rows_args *a)
{
    const int backward = a->op == OP_SOFTMAX_BACKWARD || a->op == OP_LOG_SOFTMAX_BACKWARD;
    const int entropy = a->op == OP_ENTROPY_LOGITS || a->op == OP_ENTROPY_PROBS;
    return a->x.dtype == DT_BF16 && a->x.sc == 1 && (!backward || (a->g.dtype == DT_BF16 && a->g.sc == 1)) &&
           ((entropy && !a->out.ptr) || (a->out.dtype == DT_BF16 && a->out.sc == 1));
}

/* Row r of a call whose operands are contiguous bfloat16 rows: the row functions above on pairs; e: C
 * floats of scratch; next (next_bytes): the next row of x, prefetched during the exp pass (or NULL).
 * Returns the entropy for OP_ENTROPY_LOGITS and OP_ENTROPY_PROBS. */
static T FN(bf16_row)(const struct rows_args *a, int64_t r, T *e, const void *next, int64_t next_bytes)
{
    const int64_t C = a->C, L = a->L;
    const uint16_t *xb = (const uint16_t *)a->x.ptr + row_offset(&a->x, r, L);
    uint16_t *ob = a->out.ptr ? (uint16_t *)a->out.ptr + row_offset(&a->out, r, L) : NULL;
    const uint16_t *gb = a->g.ptr ? (const uint16_t *)a->g.ptr + row_offset(&a->g, r, L) : NULL;
    switch (a->op) {
    case OP_SOFTMAX:
    case OP_LOG_SOFTMAX: {
        const T m = FN(row_max_bf16)(xb, C);
        const int is_log = a->op == OP_LOG_SOFTMAX, rd = FN(round_dt)(a);
        double s = is_log ? FN(exp_sum_table)(xb, C, m, next, next_bytes) : NAN;
        if (s != s) s = FN(exp_sum_bf16)(xb, C, m, is_log ? NULL : e, NULL, next, next_bytes, !is_log);
        /* s is NaN when the row holds a NaN, +inf, or only -inf: otherwise no result is NaN */
        if (is_log)
            FN(bf16_map)(BF_SHIFT, xb, NULL, NULL, ob, C, m, FN(round_to)((T)LOG_SCALAR(FN(round_to)((T)s, rd)), rd), 0,
                         s == s);
        else FN(affine_bf16)(ob, e, C, (T)(1 / s), 0, s == s);
        return 0;
    }
    case OP_SOFTMAX_BACKWARD: {
        /* d finite: every product g y was, so y and g are finite; |g| <= 3.39e38 (bfloat16's largest)
         * and |d| < 1e36 keep g - d finite, and y (g - d) is then finite or +-inf, never NaN */
        const T d = FN(bf16_sum)(BF_GY, xb, gb, NULL, C, 0);
        FN(bf16_map)(BF_SOFTMAX_GIN, xb, gb, NULL, ob, C, d, 0, 0, fabsf(d) < 1e36f);
        return 0;
    }
    case OP_LOG_SOFTMAX_BACKWARD:
        FN(bf16_map)(BF_LOG_SOFTMAX_GIN, xb, gb, NULL, ob, C, FN(bf16_sum)(BF_G, NULL, gb, NULL, C, 0), 0, 0, 0);
        return 0;
    case OP_ENTROPY_PROBS: return FN(entropy_probs_bf16)(xb, ob, C);
    default: { /* OP_ENTROPY_LOGITS */
        const T m = FN(row_max_bf16)(xb, C);
        const double sd = FN(exp_sum_bf16)(xb, C, m, e, NULL, next, next_bytes, 0);
        const T s = (T)sd, mz = (T)(FN(bf16_sum)(BF_EZ, xb, NULL, e, C, m) / sd);
        /* s not NaN: no x is NaN or +inf; a lane with e != 0 has x - m in (-87, 0], so every term is
         * finite, as mz is, and s >= 1 */
        if (ob) FN(bf16_map)(BF_ENTROPY_GIN, xb, NULL, e, ob, C, m, mz, s, s == s && mz == mz);
        return (T)LOG_SCALAR(s) - mz;
    }
    }
}
#endif

/* ---- column tiles: rows of the (N, C, L > 1) layout, and short rows ------------------------------------ */

/* With L > 1 the C entries of a row are L apart in memory; gathering each row costs a cache line per
 * entry per row, and every row pays the row passes' fixed cost (~200 cycles: 3-4x slower than torch
 * measured at C = 21 and C = 1000, and at C <= 5 with L = 1). Instead W consecutive rows r0 .. r0 + W - 1
 * are loaded as a C x W tile, vector c holding entry c of the W rows (for L > 1, W neighbouring
 * positions: W contiguous elements of memory when the position stride is 1), and each pass works
 * lane-wise, one row per lane, without horizontal reductions. Lanes past the last row are 0 and never
 * stored. Per tile three C x W scratch tiles (C <= COLUMN_MAX_C: 3 x 4096 x 32 B = 384 KiB, in L2). */

#define TILE_LOOP(BODY)                                                                                 \
    for (int64_t c = 0; c < C; c++)                                                                     \
        for (int64_t j = 0, o = c * v->sc; j < nr; j++) BODY

/* Entry c of the W rows of a tile. */
INLINE VT FN(col)(const T *tile, int64_t c) { return FN(load)(tile + c * W); }

/* Offsets of rows [r0, r0 + nr) of v; returns whether they are W consecutive elements of T (W positions
 * of one sample, position stride 1): then entry c of the tile is one vector load or store. */
INLINE int FN(tile_offsets)(int64_t *off, const struct view *v, int64_t r0, int64_t nr, int64_t L)
{
    for (int64_t j = 0; j < nr; j++) off[j] = row_offset(v, r0 + j, L);
    return nr == W && v->dtype == DTYPE_OF_T && v->sl == 1 && off[W - 1] - off[0] == W - 1;
}

/* Rows [r0, r0 + nr) of v into tile (entry c of row r0 + j at tile[c W + j]). */
HOT static void FN(load_tile)(T *tile, const struct view *v, int64_t r0, int64_t nr, int64_t L, int64_t C)
{
    int64_t off[W];
    if (FN(tile_offsets)(off, v, r0, nr, L)) {
        const T *p = (const T *)v->ptr + off[0];
        for (int64_t c = 0; c < C; c++) FN(store)(tile + c * W, FN(load)(p + c * v->sc));
        return;
    }
    if (nr < W) memset(tile, 0, (size_t)(C * W) * sizeof(T));
    switch (v->dtype) {
    case DT_F32: { const float *p = v->ptr; TILE_LOOP(tile[c * W + j] = (T)p[off[j] + o]); break; }
    case DT_F64: { const double *p = v->ptr; TILE_LOOP(tile[c * W + j] = (T)p[off[j] + o]); break; }
    case DT_BF16: { const uint16_t *p = v->ptr; TILE_LOOP(tile[c * W + j] = (T)bf16_to_f32(p[off[j] + o])); break; }
    default: { const _Float16 *p = v->ptr; TILE_LOOP(tile[c * W + j] = (T)p[off[j] + o]); break; }
    }
}

HOT static void FN(store_tile)(const struct view *v, const T *tile, int64_t r0, int64_t nr, int64_t L, int64_t C)
{
    int64_t off[W];
    if (FN(tile_offsets)(off, v, r0, nr, L)) {
        T *p = (T *)v->ptr + off[0];
        for (int64_t c = 0; c < C; c++) FN(store)(p + c * v->sc, FN(col)(tile, c));
        return;
    }
    switch (v->dtype) {
    case DT_F32: { float *p = v->ptr; TILE_LOOP(p[off[j] + o] = (float)tile[c * W + j]); break; }
    case DT_F64: { double *p = v->ptr; TILE_LOOP(p[off[j] + o] = (double)tile[c * W + j]); break; }
    case DT_BF16: { uint16_t *p = v->ptr; TILE_LOOP(p[off[j] + o] = f32_to_bf16((float)tile[c * W + j])); break; }
    default: { _Float16 *p = v->ptr; TILE_LOOP(p[off[j] + o] = (_Float16)tile[c * W + j]); break; }
    }
}

/* Per lane: the max over the C entries (a NaN is not picked, as row_max). */
INLINE VT FN(col_max)(const T *x, int64_t C)
{
    VT m = FN(splat)(-INFINITY);
    for (int64_t c = 0; c < C; c++) m = FN(select)(FN(col)(x, c) > m, FN(col)(x, c), m);
    return m;
}

/* Per lane: sum_c exp(x - m), writing e = exp(x - m) to e. */
/* Pass 2 of a tile: e = exp of the exact x - m (VEXP_DIFF) stored; the lanes' sums in double. */
INLINE FN(acc_t) FN(col_exp_sum)(const T *x, T *e, int64_t C, VT m)
{
    FN(acc_t) s = FN(acc_zero)();
    for (int64_t c = 0; c < C; c++) {
        const VT ev = VEXP_DIFF(FN(col)(x, c), m);
        FN(store)(e + c * W, ev);
        FN(acc_add)(&s, ev);
    }
    return s;
}

/* softmax_row, one row per lane (round_dt as there); y may not be x. */
HOT static void FN(softmax_tile)(const T *x, T *y, int64_t C, int is_log, int round_dt)
{
    const VT m = FN(col_max)(x, C);
    const FN(acc_t) sd = FN(col_exp_sum)(x, y, C, m);
    /* 1 / s in double, rounded once; log of s rounded once (half an ulp of s: 2^-24 absolute in the log) */
    const VT s = FN(narrow)(sd.lo, sd.hi), r = FN(narrow)(1 / sd.lo, 1 / sd.hi);
    VT shift = FN(vlog)(s);
    if (round_dt >= 0)
        for (int j = 0; j < W; j++) shift[j] = FN(round_to)((T)LOG_SCALAR(FN(round_to)(s[j], round_dt)), round_dt);
    for (int64_t c = 0; c < C; c++)
        FN(store)(y + c * W, is_log ? (FN(col)(x, c) - m) - shift : FN(col)(y, c) * r);
}

/* softmax_backward_row, one row per lane. */
HOT static void FN(softmax_backward_tile)(const T *y, const T *g, T *gin, int64_t C, int is_log)
{
    VT d = FN(splat)(0);
    for (int64_t c = 0; c < C; c++) d += is_log ? FN(col)(g, c) : FN(col)(g, c) * FN(col)(y, c);
    for (int64_t c = 0; c < C; c++) {
        const VT vg = FN(col)(g, c), vy = FN(col)(y, c);
        FN(store)(gin + c * W, is_log ? vg - VEXP(vy) * d : vy * (vg - d));
    }
}

/* entropy_logits_row, one row per lane: e receives exp(x - m) (g may be e, or NULL); H of each lane into
 * hv (W entries: vectors are not returned across the target_clones boundary). */
HOT static void FN(entropy_logits_tile)(const T *x, T *e, T *g, int64_t C, T *hv)
{
    FN(acc_t) sez = FN(acc_zero)();
    const VT m = FN(col_max)(x, C), zero = FN(splat)(0);
    const FN(acc_t) sd = FN(col_exp_sum)(x, e, C, m);
    for (int64_t c = 0; c < C; c++) {
        const VT ve = FN(col)(e, c);
        FN(acc_add)(&sez, FN(select)(ve != 0, ve * (FN(col)(x, c) - m), zero));
    }
    const VT mz = FN(acc_div)(sez, sd), s = FN(narrow)(sd.lo, sd.hi);
    if (g)
        for (int64_t c = 0; c < C; c++) {
            const VT ve = FN(col)(e, c);
            FN(store)(g + c * W, FN(select)(ve != 0, ve * (mz - (FN(col)(x, c) - m)), zero) / s);
        }
    /* H = log s - E[z] per lane in double, rounded once: where H is small (a confident row: s ~ 1), a log
     * of s rounded to T would be off by 2^-24 absolute (25 eps of H = 0.0067, measured) */
    for (int j = 0; j < W; j++) hv[j] = (T)(log(FN(acc_lane)(&sd, j)) - FN(acc_lane)(&sez, j) / FN(acc_lane)(&sd, j));
}

/* entropy_probs, one row per lane, H into hv. */
HOT static void FN(entropy_probs_tile)(const T *p, T *g, int64_t C, T *hv)
{
    VT acc = FN(splat)(0);
    for (int64_t c = 0; c < C; c++) {
        const VT vp = FN(col)(p, c), lp = FN(vlog)(vp);
        acc += FN(plogp)(vp, lp);
        if (g) FN(store)(g + c * W, FN(plogp_gin)(vp, lp));
    }
    FN(store)(hv, -acc);
}

/* Tiles [t0, t1) of a call in the column layout: tile t holds rows [t W, t W + W). */
static int FN(tiles_range)(const struct rows_args *a, int64_t t0, int64_t t1)
{
    const int64_t C = a->C, L = a->L;
    T *scratch = malloc(3 * (size_t)(C * W) * sizeof(T));
    if (!scratch) return ERR_NOMEM;
    T *s0 = scratch, *s1 = scratch + C * W, *s2 = scratch + 2 * C * W;
    T *h = (T *)a->per_row;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r0 = t * W, nr = a->rows - r0 < W ? a->rows - r0 : W;
        FN(load_tile)(s0, &a->x, r0, nr, L, C);
        switch (a->op) {
        case OP_SOFTMAX:
        case OP_LOG_SOFTMAX:
            FN(softmax_tile)(s0, s1, C, a->op == OP_LOG_SOFTMAX, FN(round_dt)(a));
            FN(store_tile)(&a->out, s1, r0, nr, L, C);
            break;
        case OP_SOFTMAX_BACKWARD:
        case OP_LOG_SOFTMAX_BACKWARD:
            FN(load_tile)(s1, &a->g, r0, nr, L, C);
            FN(softmax_backward_tile)(s0, s1, s2, C, a->op == OP_LOG_SOFTMAX_BACKWARD);
            FN(store_tile)(&a->out, s2, r0, nr, L, C);
            break;
        case OP_ENTROPY_LOGITS:
        case OP_ENTROPY_PROBS: {
            T *g = a->out.ptr ? s1 : NULL;
            T hv[W];
            if (a->op == OP_ENTROPY_LOGITS) FN(entropy_logits_tile)(s0, s1, g, C, hv);
            else FN(entropy_probs_tile)(s0, g, C, hv);
            for (int64_t j = 0; j < nr; j++) h[r0 + j] = hv[j];
            if (g) FN(store_tile)(&a->out, g, r0, nr, L, C);
            break;
        }
        }
    }
    free(scratch);
    return 0;
}

/* ---- row ranges (one thread's share) -------------------------------------------------------------------- */

/* Rows [r0, r1) of a softmax, log_softmax, their backward or entropy call. */
static int FN(rows_range)(const struct rows_args *a, int64_t r0, int64_t r1)
{
    const int64_t C = a->C, L = a->L;
    /* Three scratch rows of C T each, for the operands that are not contiguous rows of T (bfloat16,
     * float16, strided); pages that no operand needs are never touched. */
    T *scratch = malloc(3 * (size_t)C * sizeof(T));
    if (!scratch) return ERR_NOMEM;
    T *s0 = scratch, *s1 = scratch + C, *s2 = scratch + 2 * C;
    T *h = (T *)a->per_row;
#if W == 8
    if (FN(bf16_rows)(a)) {
        for (int64_t r = r0; r < r1; r++) {
            const void *next = r + 1 < r1 ? (const uint16_t *)a->x.ptr + row_offset(&a->x, r + 1, L) : NULL;
            const T v = FN(bf16_row)(a, r, s0, next, 2 * C);
            if (a->op == OP_ENTROPY_LOGITS || a->op == OP_ENTROPY_PROBS) h[r] = v;
        }
        free(scratch);
        return 0;
    }
#endif
    for (int64_t r = r0; r < r1; r++) {
        const T *x = FN(row_in)(&a->x, r, L, C, s0);
        switch (a->op) {
        case OP_SOFTMAX:
        case OP_LOG_SOFTMAX: {
            T *y = FN(row_out)(&a->out, r, L, s1);
            FN(softmax_row)(x, y, C, a->op == OP_LOG_SOFTMAX, FN(round_dt)(a));
            FN(row_out_done)(&a->out, r, L, C, y);
            break;
        }
        case OP_SOFTMAX_BACKWARD:
        case OP_LOG_SOFTMAX_BACKWARD: { /* x: the saved output */
            const T *g = FN(row_in)(&a->g, r, L, C, s1);
            T *gin = FN(row_out)(&a->out, r, L, s2);
            FN(softmax_backward_row)(x, g, gin, C, a->op == OP_LOG_SOFTMAX_BACKWARD);
            FN(row_out_done)(&a->out, r, L, C, gin);
            break;
        }
        case OP_ENTROPY_LOGITS:
        case OP_ENTROPY_PROBS: {
            T *g = a->out.ptr ? FN(row_out)(&a->out, r, L, s1) : NULL;
            h[r] = a->op == OP_ENTROPY_LOGITS ? FN(entropy_logits_row)(x, g ? g : s2, g, C)
                                              : FN(entropy_probs)(x, g, C, a->x.dtype == DT_BF16);
            if (g) FN(row_out_done)(&a->out, r, L, C, g);
            break;
        }
        }
    }
    free(scratch);
    return 0;
}

/* ---- nll_loss ----------------------------------------------------------------------------------------- */

/* Store v (a T) at element i of a buffer of dtype dt. */
INLINE void FN(store_at)(void *p, int dt, int64_t i, T v)
{
    switch (dt) {
    case DT_F32: ((float *)p)[i] = (float)v; break;
    case DT_F64: ((double *)p)[i] = (double)v; break;
    case DT_BF16: ((uint16_t *)p)[i] = f32_to_bf16((float)v); break;
    default: ((_Float16 *)p)[i] = (_Float16)v; break;
    }
}

INLINE T FN(load_at)(const void *p, int dt, int64_t i)
{
    switch (dt) {
    case DT_F32: return (T)((const float *)p)[i];
    case DT_F64: return (T)((const double *)p)[i];
    case DT_BF16: return (T)bf16_to_f32(((const uint16_t *)p)[i]);
    default: return (T)((const _Float16 *)p)[i];
    }
}

/* Tiles [t0, t1) of an nll_loss call: tile t is sample n = t / tiles_per_sample, positions
 * [l0, l0 + width). Per position: loss = -w_y x[n, y, l] (0 when y == ignore_index), and, when the
 * gradient is wanted, the tile's part of the contiguous (N, C, L) gradient is zero-filled (C segments of
 * width contiguous entries) and -w_y scale written at each target: every gradient entry written once,
 * the targets' entries while the tile is in cache. */
static int FN(nll_range)(const struct nll_args *a, int64_t t0, int64_t t1)
{
    const int64_t C = a->C, L = a->L, per = (L + a->width - 1) / a->width;
    const T *w = (const T *)a->weight, scale = (T)a->scale;
    T *loss = (T *)a->loss;
    char *g = a->g;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t n = t / per, l0 = (t % per) * a->width, l1 = l0 + a->width < L ? l0 + a->width : L;
        if (g && l1 - l0 == L) /* the whole sample: one contiguous block */
            memset(g + n * C * L * a->g_size, 0, (size_t)(C * L * a->g_size));
        else if (g)
            for (int64_t c = 0; c < C; c++)
                memset(g + ((n * C + c) * L + l0) * a->g_size, 0, (size_t)((l1 - l0) * a->g_size));
        for (int64_t l = l0; l < l1; l++) {
            const int64_t r = n * L + l, y = a->target[r];
            if (y == a->ignore_index) { loss[r] = 0; continue; }
            if (y < 0 || y >= C) return ERR_TARGET;
            const T w_y = w ? w[y] : 1;
            loss[r] = -(FN(load_at)(a->x.ptr, a->x.dtype, n * a->x.sn + y * a->x.sc + l * a->x.sl) * w_y);
            if (g) FN(store_at)(g, a->g_dtype, (n * C + y) * L + l, -w_y * scale);
        }
    }
    return 0;
}
