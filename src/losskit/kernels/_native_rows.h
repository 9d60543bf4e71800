/* Row kernels of losskit.kernels._native, written once for an accumulation type.
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

/* One row. x (and t) are contiguous rows in T, or x is NULL and xb the row in bfloat16 (T = float, index
 * targets, no class weights: the pair-order passes of _native_rowops.h); g (and tg) contiguous outputs
 * or NULL, g is never x, tg may be t; with xb, g is scratch in pair order and the gradient goes to the
 * bfloat16 row gb; next is the next row to prefetch, or NULL. Returns the loss. Passes: max;
 * e = exp(x - max) and its sum s (e kept in g); then g = (alpha scale / s) e - ..., on the row while it
 * is in cache. One exp per element. */
static T FN(xent_row)(const struct xent_args *a, const T *x, const uint16_t *xb, int64_t y, const T *t, T *g,
                      uint16_t *gb, T *tg, const void *next)
{
    const int64_t C = a->C;
    const T *w = (const T *)a->weight;
    const T ls = (T)a->label_smoothing, scale = (T)a->scale;
    const int smooth = ls != 0 && !t;
    const T m = xb ? FN(row_max_bf16)(xb, C) : FN(row_max)(x, C);
    const T x_y = t || y == a->ignore_index ? 0 : xb ? (T)bf16_to_f32(xb[y]) : x[y];
    const int64_t next_bytes = next ? C * dtype_size(a->x.dtype) : 0;
    T wx = 0;
    /* the exp of bfloat16 grade without smoothing only: with it, gradients p_c - ls/C can cancel */
    const T s = xb ? FN(exp_sum_bf16)(xb, C, m, g, smooth ? &wx : NULL, next, next_bytes, !smooth)
                   : FN(exp_sum_next)(x, C, m, g, w, smooth ? &wx : NULL, next, next_bytes);
    const T log_s = (T)LOG_SCALAR(s);

    if (t) {
        const T keep = 1 - ls, add = ls / (T)C;
        const T wt_sum = FN(weighted_target_sum)(t, C, w, keep, add);
        return FN(grad_prob)(x, t, g, tg, C, w, m, log_s, keep, add, scale * wt_sum / s, scale);
    }
    if (y == a->ignore_index) {
        /* loss 0; gradient 0 * softmax, so NaN where the row has a NaN (torch's log_softmax backward) */
        if (gb) FN(affine_bf16)(gb, g, C, 0 / s, 0, 0);
        else if (g) FN(affine)(g, C, 0 / s, 0, NULL);
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
    if (gb) {
        /* element y as pass 3 computes it in a row (one expression for every element), then its term */
        T g_y = g[FN(pair_index)(y, C)];
        FN(affine)(&g_y, 1, scale * alpha / s, scale * ls / (T)C, NULL);
        g_y -= scale * beta;
        /* s is NaN when some e is (a NaN logit, or a row of -inf); else every e is in [0, 1] and the
         * coefficients are finite: no gradient is NaN */
        FN(affine_bf16)(gb, g, C, scale * alpha / s, scale * ls / (T)C, s == s && alpha == alpha);
        gb[y] = f32_to_bf16((float)g_y);
    } else if (g) {
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
    /* Contiguous bfloat16 rows with index targets and no class weights are read, and their gradients
     * written, in bfloat16 by the pair-order passes (no float copy of the row made or stored back). */
    const int pairs = DTYPE_OF_T == DT_F32 && !prob && !a->weight && a->x.dtype == DT_BF16 && a->x.sc == 1 &&
                      (!a->g.ptr || (a->g.dtype == DT_BF16 && a->g.sc == 1));
    const int t_direct = a->t.dtype == DTYPE_OF_T && a->t.sc == 1;
    const int tg_direct = a->tg.dtype == DTYPE_OF_T && a->tg.sc == 1;
    /* Scratch rows (C * sizeof(T) each, in cache beside the row): x and t converted to T where they
     * are not contiguous rows of T, and the gradients formed there before they are stored. */
    T *xs = NULL, *gs = NULL, *ts = NULL;
    int err = 0;
    if ((!x_direct && !pairs && !(xs = malloc((size_t)C * sizeof(T)))) ||
        (a->g.ptr && !g_direct && !(gs = malloc((size_t)C * sizeof(T)))) ||
        (prob && (!t_direct || (a->tg.ptr && !tg_direct)) && !(ts = malloc((size_t)C * sizeof(T)))))
        err = ERR_NOMEM;
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
        /* the next row, where its elements are contiguous, is prefetched during this row's exp pass */
        const void *next = a->x.sc == 1 && r + 1 < r1
                               ? (const char *)a->x.ptr + row_offset(&a->x, r + 1, a->L) * dtype_size(a->x.dtype)
                               : NULL;
        loss[r] = FN(xent_row)(a, x, xb, y, t, g, gb, tg, next);
        if (g && !g_direct && !gb) FN(store_row)(&a->g, r, a->L, C, g);
        if (tg && !tg_direct) FN(store_row)(&a->tg, r, a->L, C, tg);
    }
    free(xs);
    free(gs);
    free(ts);
    return err;
}
