/* Row kernels of losskit.kernels._native_softmax, written once for an accumulation type T.
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
 */

#include "_native_rowops.h"

/* A vector of lanes [0, n) of p (n <= W), the rest fill; and its store. */
INLINE VT FN(get)(const T *p, int64_t n, T fill) { return n == W ? FN(load)(p) : FN(load_part)(p, n, fill); }
INLINE void FN(put)(T *p, int64_t n, VT v)
{
    if (n == W) FN(store)(p, v);
    else FN(store_part)(p, n, v);
}

/* Row sums (dot, sum_ez, entropy_probs) accumulate in double lanes: float32 sums over C = 3e5 terms in
 * 8 float lanes lost 2e-5 relative (measured), torch's cascade sum 1e-6; double lanes stay at the
 * float result's rounding. The conversion is two instructions per vector, in passes bound by memory. */
#if W == 8
typedef struct { v4d lo, hi; } FN(acc_t);
INLINE FN(acc_t) FN(acc_zero)(void) { return (FN(acc_t)){{0}, {0}}; }
INLINE void FN(acc_add)(FN(acc_t) *a, VT v)
{
    a->lo += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), v4d);
    a->hi += __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), v4d);
}
INLINE T FN(acc_total)(FN(acc_t) a)
{
    const v4d s = a.lo + a.hi;
    return (T)((s[0] + s[1]) + (s[2] + s[3]));
}
#else
typedef VT FN(acc_t);
INLINE FN(acc_t) FN(acc_zero)(void) { return FN(splat)(0); }
INLINE void FN(acc_add)(FN(acc_t) *a, VT v) { *a += v; }
INLINE T FN(acc_total)(FN(acc_t) a) { return FN(hsum)(a); }
#endif

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

/* ---- passes -------------------------------------------------------------------------------------------- */

/* y = (x - a) - b */
HOT static void FN(shift)(const T *x, T *y, int64_t C, T a, T b)
{
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        FN(put)(y + c, n, (FN(get)(x + c, n, 0) - a) - b);
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
        FN(put)(gin + c, n, FN(get)(y + c, n, 0) * (FN(get)(g + c, n, 0) - d));
    }
}

/* log_softmax backward: gin = g - exp(y) sg, sg = sum(g); y <= 0 (log-probabilities); gin may be g. */
HOT static void FN(log_softmax_grad)(const T *y, const T *g, T *gin, int64_t C, T sg)
{
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        FN(put)(gin + c, n, FN(get)(g + c, n, 0) - VEXP(FN(get)(y + c, n, -INFINITY)) * sg);
    }
}

/* sum_c e[c] (x[c] - m) over the entries with e[c] != 0 (a -inf logit has e = 0 and contributes 0,
 * not 0 * -inf); a NaN e propagates. */
HOT static T FN(sum_ez)(const T *x, const T *e, int64_t C, T m)
{
    FN(acc_t) acc = FN(acc_zero)();
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        const VT ve = FN(get)(e + c, n, 0);
        FN(acc_add)(&acc, FN(select)(ve != 0, ve * (FN(get)(x + c, n, 0) - m), FN(splat)(0)));
    }
    return FN(acc_total)(acc);
}

/* entropy gradient from e = exp(x - m) (g may be e): g = e (mz - (x - m)) / s, where e = 0 0 / s (NaN in a
 * row whose s is NaN, as the torch path). */
HOT static void FN(entropy_grad)(const T *x, const T *e, T *g, int64_t C, T m, T mz, T s)
{
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        const VT ve = FN(get)(e + c, n, 0);
        FN(put)(g + c, n, FN(select)(ve != 0, ve * (mz - (FN(get)(x + c, n, 0) - m)), FN(splat)(0)) / s);
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

/* Entropy of probabilities: returns -sum_c xlogy(p, p); writes g = -(log p + 1), 0 where p = 0, if g. */
HOT static T FN(entropy_probs)(const T *p, T *g, int64_t C)
{
    FN(acc_t) acc = FN(acc_zero)();
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        const VT vp = FN(get)(p + c, n, 0), lp = FN(vlog)(vp);
        const VI nz = vp != 0;
        FN(acc_add)(&acc, FN(select)(nz, vp * lp, FN(splat)(0)));
        if (g) FN(put)(g + c, n, FN(select)(nz, -(lp + 1), FN(splat)(0)));
    }
    return -FN(acc_total)(acc);
}

/* ---- one row of each operation ------------------------------------------------------------------------- */

/* v rounded to the storage dtype dt (DT_BF16 or DT_F16; any other code: v). */
INLINE T FN(round_to)(T v, int dt)
{
    if (dt == DT_BF16) return (T)bf16_to_f32(f32_to_bf16((float)v));
    if (dt == DT_F16) return (T)(_Float16)v;
    return v;
}

/* Forward: y = softmax(x) or log_softmax(x); y is not x. round_dt: log_softmax rounds the sum and its
 * log to this storage dtype (bfloat16/float16 rows along the innermost dim: what ATen's last-dim kernel
 * does, so that the output is torch's to the bit), else -1. */
static void FN(softmax_row)(const T *x, T *y, int64_t C, int is_log, int round_dt)
{
    const T m = FN(row_max)(x, C);
    if (is_log) {
        const T s = FN(exp_sum)(x, C, m, NULL, NULL, NULL);
        FN(shift)(x, y, C, m, FN(round_to)((T)LOG_SCALAR(FN(round_to)(s, round_dt)), round_dt));
    } else {
        const T s = FN(exp_sum)(x, C, m, y, NULL, NULL);
        FN(affine)(y, C, 1 / s, 0, NULL);
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
    const T s = FN(exp_sum)(x, C, m, e, NULL, NULL);
    const T mz = FN(sum_ez)(x, e, C, m) / s; /* sum_c p_c z_c <= 0 */
    if (g) FN(entropy_grad)(x, e, g, C, m, mz, s);
    return (T)LOG_SCALAR(s) - mz;
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
    for (int64_t r = r0; r < r1; r++) {
        const T *x = FN(row_in)(&a->x, r, L, C, s0);
        switch (a->op) {
        case OP_SOFTMAX:
        case OP_LOG_SOFTMAX: {
            T *y = FN(row_out)(&a->out, r, L, s1);
            FN(softmax_row)(x, y, C, a->op == OP_LOG_SOFTMAX,
                            (a->out.dtype == DT_BF16 || a->out.dtype == DT_F16) && L == 1 ? a->out.dtype : -1);
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
                                              : FN(entropy_probs)(x, g, C);
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
