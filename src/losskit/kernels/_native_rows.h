/* Row kernels of losskit.kernels._native, written once for an accumulation type.
 *
 * Included twice by _native.c: with T = float (float32, bfloat16 and float16 inputs) and T = double
 * (float64 inputs). The including file defines
 *   T      the accumulation type,           VT  a vector of W values of T (32 bytes),
 *   W      lanes per vector,                VI  the integer vector of the same size,
 *   VEXP   the vector exp of VT (x <= 0),   FN(name) the name suffixed with the type.
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
 * read of the row and one write of its gradient; one exp per element (the vector exp of _native.c).
 * The per-row scalars use the C library: log of the sum, and expm1 and pow for the focal factor.
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

/* Pass 1: the row max (a NaN is not picked: it reaches the loss through the sum of exp). */
HOT static T FN(row_max)(const T *x, int64_t C)
{
    VT vm = FN(splat)(-INFINITY);
    int64_t c = 0;
    for (; c + W <= C; c += W) {
        VT v = FN(load)(x + c);
        vm = FN(select)(v > vm, v, vm);
    }
    if (c < C) {
        VT v = FN(load_part)(x + c, C - c, -INFINITY);
        vm = FN(select)(v > vm, v, vm);
    }
    T m = vm[0];
    for (int j = 1; j < W; j++) m = vm[j] > m ? vm[j] : m;
    return m;
}

/* Pass 2: returns sum_c exp(x[c] - m); writes e[c] = exp(x[c] - m) if e is given (e may be x); adds
 * sum_c w[c] (x[c] - m) to *wx if wx is given (w = 1 when absent; label smoothing's loss term). */
HOT static T FN(exp_sum)(const T *x, int64_t C, T m, T *e, const T *w, T *wx)
{
    VT vs = FN(splat)(0), vwx = FN(splat)(0);
    T ones[W];
    for (int j = 0; j < W; j++) ones[j] = 1;
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        /* padded lanes: x = -inf (exp 0) and w = 0; none is stored */
        const VT v = n == W ? FN(load)(x + c) : FN(load_part)(x + c, n, -INFINITY);
        const VT ev = VEXP(v - m);
        vs += ev;
        if (e) {
            if (n == W) FN(store)(e + c, ev);
            else FN(store_part)(e + c, n, ev);
        }
        if (wx) {
            const T *pw = w ? w + c : ones;
            const VT vw = n == W ? FN(load)(pw) : FN(load_part)(pw, n, 0);
            /* select: a padded lane's 0 * -inf would be NaN */
            vwx += FN(select)(vw != 0, vw * (v - m), FN(splat)(0));
        }
    }
    T s = 0, sw = 0;
    for (int j = 0; j < W; j++) { s += vs[j]; sw += vwx[j]; }
    if (wx) *wx += sw;
    return s;
}

/* Pass 3, on the row in cache: g[c] = a g[c] - b w[c] (w = 1 when absent). */
HOT static void FN(affine)(T *g, int64_t C, T a, T b, const T *w)
{
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        const VT v = n == W ? FN(load)(g + c) : FN(load_part)(g + c, n, 0);
        const VT vw = w ? (n == W ? FN(load)(w + c) : FN(load_part)(w + c, n, 0)) : FN(splat)(1);
        const VT out = FN(splat)(a) * v - FN(splat)(b) * vw;
        if (n == W) FN(store)(g + c, out);
        else FN(store_part)(g + c, n, out);
    }
}

/* Probability targets: returns sum_c w[c] t'[c] over the row, t' = keep t + add (smoothed). */
HOT static T FN(weighted_target_sum)(const T *t, int64_t C, const T *w, T keep, T add)
{
    T s = 0;
    for (int64_t c = 0; c < C; c++) s += (w ? w[c] : 1) * (keep * t[c] + add);
    return s;
}

/* Probability targets, after pass 2 left e = exp(x - m) in g: returns the loss
 * sum_c w t' (-logp) and writes g = a e - S w t' and tg = S keep w (-logp), -logp = log s - (x - m);
 * tg may be t. */
HOT static T FN(grad_prob)(const T *x, const T *t, T *g, T *tg, int64_t C, const T *w, T m, T log_s, T keep,
                           T add, T a, T S)
{
    T loss = 0;
    for (int64_t c = 0; c < C; c++) {
        const T wc = w ? w[c] : 1, wt = wc * (keep * t[c] + add), nlogp = log_s - (x[c] - m);
        loss += wt * nlogp;
        if (tg) tg[c] = S * keep * wc * nlogp;
        if (g) g[c] = a * g[c] - S * wt;
    }
    return loss;
}

/* One row. x (and t) are contiguous rows in T; g (and tg) contiguous outputs or NULL; g is never x,
 * tg may be t. Returns the loss. Passes: max; e = exp(x - max) and its sum s (e kept in g); then
 * g = (alpha scale / s) e - ..., on the row while it is in cache. One exp per element. */
static T FN(xent_row)(const struct xent_args *a, const T *x, int64_t y, const T *t, T *g, T *tg)
{
    const int64_t C = a->C;
    const T *w = (const T *)a->weight;
    const T ls = (T)a->label_smoothing, scale = (T)a->scale;
    const int smooth = ls != 0 && !t;
    const T m = FN(row_max)(x, C);
    const T x_y = t || y == a->ignore_index ? 0 : x[y];
    T wx = 0;
    const T s = FN(exp_sum)(x, C, m, g, w, smooth ? &wx : NULL);
    const T log_s = (T)LOG_SCALAR(s);

    if (t) {
        const T keep = 1 - ls, add = ls / (T)C;
        const T wt_sum = FN(weighted_target_sum)(t, C, w, keep, add);
        return FN(grad_prob)(x, t, g, tg, C, w, m, log_s, keep, add, scale * wt_sum / s, scale);
    }
    if (y == a->ignore_index) {
        /* loss 0; gradient 0 * softmax, so NaN where the row has a NaN (torch's log_softmax backward) */
        if (g) FN(affine)(g, C, 0 / s, 0, NULL);
        return 0;
    }
    /* (x_y - m) - log s, not x_y - lse: lse = m + log s would round log s to the ulp of m */
    const T w_y = w ? w[y] : 1, logp_y = (x_y - m) - log_s;
    T loss, alpha, beta;
    if (a->gamma != 0) {
        /* d/dx_c of -q^g log p_y, q = 1 - p_y, is b (p_c - [c == y]) with
         * b = q^g - g p_y q^(g-1) log p_y; q^(g-1) log p_y = q^g (log p_y / q), whose limit at q = 0 is -q^g. */
        const T gm = (T)a->gamma, q = -(T)EXPM1_SCALAR(logp_y), q_g = (T)POW_SCALAR(q, gm);
        const T ratio = q > 0 ? logp_y / q : -1;
        loss = -w_y * q_g * logp_y;
        beta = w_y * q_g * (1 - gm * (T)EXP_SCALAR(logp_y) * ratio);
        alpha = beta;
    } else {
        loss = -(1 - ls) * w_y * logp_y;
        beta = (1 - ls) * w_y;
        alpha = beta + ls * (T)a->weight_sum / (T)C;
    }
    if (smooth) loss += ls / (T)C * ((T)a->weight_sum * log_s - wx);
    if (g) {
        FN(affine)(g, C, scale * alpha / s, scale * ls / (T)C, w);
        g[y] -= scale * beta;
    }
    return loss;
}

/* Rows [r0, r1) of one call: load (or point at) each row, run it, store the outputs. */
static int FN(xent_range)(const struct xent_args *a, int64_t r0, int64_t r1)
{
    const int64_t C = a->C;
    const int prob = a->t.ptr != NULL;
    const int x_direct = a->x.dtype == DTYPE_OF_T && a->x.sc == 1;
    const int g_direct = a->g.dtype == DTYPE_OF_T && a->g.sc == 1;
    const int t_direct = a->t.dtype == DTYPE_OF_T && a->t.sc == 1;
    const int tg_direct = a->tg.dtype == DTYPE_OF_T && a->tg.sc == 1;
    /* Scratch rows (C * sizeof(T) each, in cache beside the row): x and t converted to T where they
     * are not contiguous rows of T, and the gradients formed there before they are stored. */
    T *xs = NULL, *gs = NULL, *ts = NULL;
    int err = 0;
    if ((!x_direct && !(xs = malloc((size_t)C * sizeof(T)))) ||
        (a->g.ptr && !g_direct && !(gs = malloc((size_t)C * sizeof(T)))) ||
        (prob && (!t_direct || (a->tg.ptr && !tg_direct)) && !(ts = malloc((size_t)C * sizeof(T)))))
        err = ERR_NOMEM;
    T *loss = (T *)a->loss;
    for (int64_t r = r0; r < r1 && !err; r++) {
        const int64_t y = prob ? 0 : a->target[r];
        if (!prob && y != a->ignore_index && (y < 0 || y >= C)) { err = ERR_TARGET; break; }
        const T *x = xs;
        if (x_direct) x = (const T *)a->x.ptr + row_offset(&a->x, r, a->L);
        else FN(load_row)(xs, &a->x, r, a->L, C);
        T *g = NULL;
        if (a->g.ptr) g = g_direct ? (T *)a->g.ptr + row_offset(&a->g, r, a->L) : gs;
        const T *t = NULL;
        T *tg = NULL;
        if (prob) {
            /* tg is formed in place of t (each t[c] is read before tg[c] is written) */
            if (t_direct) t = (const T *)a->t.ptr + row_offset(&a->t, r, a->L);
            if (!t_direct || (a->tg.ptr && !tg_direct)) {
                if (t_direct) memcpy(ts, t, (size_t)C * sizeof(T));
                else FN(load_row)(ts, &a->t, r, a->L, C);
                t = ts;
            }
            if (a->tg.ptr) tg = tg_direct ? (T *)a->tg.ptr + row_offset(&a->tg, r, a->L) : ts;
        }
        loss[r] = FN(xent_row)(a, x, y, t, g, tg);
        if (g && !g_direct) FN(store_row)(&a->g, r, a->L, C, g);
        if (tg && !tg_direct) FN(store_row)(&a->tg, r, a->L, C, tg);
    }
    free(xs);
    free(gs);
    free(ts);
    return err;
}

/* exp of a contiguous array, in place: the kernels' vector exp, exposed for the accuracy tests. */
HOT static void FN(exp_array)(T *p, int64_t n)
{
    for (int64_t i = 0; i < n; i += W) {
        int64_t m = n - i < W ? n - i : W;
        FN(store_part)(p + i, m, VEXP(FN(load_part)(p + i, m, 0)));
    }
}
