/* Pointwise losses of losskit.ops.cpu._native_pointwise, written once for an accumulation type T.
 *
 * Instantiated by _native_pointwise.c through _native_instantiate.h: T = float (float32, bfloat16 and
 * float16 storage), T = double (float64). Reference expressions, per element (s: the gradient scale,
 * the reduction's factor; w = 1 when absent):
 *   MSE       l = w (x - y)^2                  gx = s (2 (x - y) w),      gy = -gx
 *   KL_PROB   l = xlogy(y, y) - y x            gx = s (-y),               gy = s (log y + 1 - x), NaN at y == 0, inf
 *   KL_LOG    l = exp(y) (y - x)               gx = s (-exp(y)),          gy = s (l + exp(y))
 * Elements are taken in blocks of BLOCK; each block's loss sum is formed in per-lane T accumulators and
 * stored in the double array a->sums (summed in block order by the caller: the total does not depend on
 * the thread count). Each element of each operand is read once and each output written once.
 *
 * Storage: when every operand present has one dtype whose accumulation type is T ("uniform", the
 * common case), the vectors are loaded and stored in that dtype, bfloat16/float16 converted in
 * registers (float16 one lane at a time with F16C: GCC 12 does not convert _Float16 vectors whole; an
 * integer bit-manipulation version of the 8-lane conversion measured slower). bfloat16 goes 16 elements
 * at a time as (even, odd) vectors of FN(bf16_pairs), written back by FN(store_pairs), and kl_div's log y
 * and exp y of a bfloat16 target come from tables over its bit patterns holding the float path's values
 * (build_tables), so bfloat16 results are the float path's rounded once, bit for bit. Otherwise
 * (an integer target, mixed floating dtypes, a NaN scale) a block of each operand is converted into T
 * scratch arrays on the stack (BLOCK * sizeof(T) each, in L1), computed there and converted out.
 */

#include "_native_rowops.h" /* load, store, splat, select */

/* ---- storage -------------------------------------------------------------------------------------- */

/* The W lanes at element i of p, stored as dt; dt is a constant in every inlined copy. */
INLINE VT FN(vload)(const void *p, int dt, int64_t i)
{
#if W == 8
    if (dt == DT_BF16) return bf16_widen8((const uint16_t *)p + i);
    if (dt == DT_F16) return __builtin_convertvector(*(const v8h_u *)((const _Float16 *)p + i), VT);
#endif
    (void)dt;
    return FN(load)((const T *)p + i);
}

INLINE void FN(vstore)(void *p, int dt, int64_t i, VT v)
{
#if W == 8
    if (dt == DT_BF16) { /* round to nearest even, NaN kept quiet (_native_common.h) */
        const v8u16 h = bf16_round8(v);
        memcpy((uint16_t *)p + i, &h, sizeof h);
        return;
    }
    if (dt == DT_F16) {
        *(v8h_u *)((_Float16 *)p + i) = __builtin_convertvector(v, v8h);
        return;
    }
#endif
    (void)dt;
    FN(store)((T *)p + i, v);
}

/* m elements of an operand of any dtype from element i0, as T (the tails, and the mixed-dtype path):
 * one switch per call, a loop the compiler vectorises per dtype. */
#define PW_GET(CTYPE, CONV)                                                                             \
    {                                                                                                   \
        const CTYPE *s = (const CTYPE *)p + i0;                                                         \
        for (int64_t k = 0; k < m; k++) dst[k] = (T)CONV(s[k]);                                         \
        break;                                                                                          \
    }
INLINE void FN(get)(T *dst, const void *p, int dt, int64_t i0, int64_t m)
{
    switch (dt) {
    case DT_F32: PW_GET(float, )
    case DT_F64: PW_GET(double, )
    case DT_BF16: PW_GET(uint16_t, bf16_to_f32)
    case DT_F16: PW_GET(_Float16, )
    case DT_I64: PW_GET(int64_t, )
    case DT_I32: PW_GET(int32_t, )
    case DT_I16: PW_GET(int16_t, )
    case DT_I8: PW_GET(int8_t, )
    default: PW_GET(uint8_t, )
    }
}
#undef PW_GET

/* m elements into a floating output of dtype dt from element i0 (outputs are floating: checked by the
 * binding). */
#define PW_PUT(CTYPE, CONV)                                                                             \
    {                                                                                                   \
        CTYPE *d = (CTYPE *)p + i0;                                                                     \
        for (int64_t k = 0; k < m; k++) d[k] = CONV(src[k]);                                            \
        break;                                                                                          \
    }
INLINE void FN(put)(void *p, int dt, int64_t i0, const T *src, int64_t m)
{
    switch (dt) {
    case DT_F32: PW_PUT(float, (float))
    case DT_F64: PW_PUT(double, (double))
    case DT_BF16: PW_PUT(uint16_t, f32_to_bf16)
    default: PW_PUT(_Float16, (_Float16))
    }
}
#undef PW_PUT

/* ---- the per-element maths ------------------------------------------------------------------------- */

INLINE int FN(any)(VI m)
{
    int r = 0;
    for (int j = 0; j < W; j++) r |= m[j] != 0;
    return r;
}

/* exp for any argument: the vector exp holds for v <= 0 (log-probabilities); lanes above 0 (rare for a
 * log target) take the C library's, which overflows to inf as torch's does. */
INLINE VT FN(exp_any)(VT v)
{
    VT e = VEXP(v);
    const VI big = v > 0;
    if (FN(any)(big))
        for (int j = 0; j < W; j++)
            if (big[j]) e[j] = EXP_SCALAR(v[j]);
    return e;
}

/* f(y) for the kl_div target y stored as dt (a constant in every inlined copy): computed (f), or for a
 * bfloat16 y read from the table of its bit patterns (the high halves of y's floats), whose entries
 * build_tables computed with f on the same values, so the bits are the float path's. */
#if W == 8
#define PW_OF_TARGET(dt, y, TABLE, f) ((dt) == DT_BF16 ? FN(table_lanes)(bf16_tables[TABLE], (v8u32)(y) >> 16) : f(y))
#else
#define PW_OF_TARGET(dt, y, TABLE, f) f(y)
#endif

/* Every entry of the bfloat16 tables: log y and exp y, as kl_div's float path computes them. T is float. */
HOT static void FN(build_tables)(void)
{
    for (int64_t i = 0; i < 65536; i += W) {
        VT y;
        for (int j = 0; j < W; j++) y[j] = (T)bf16_to_f32((uint16_t)(i + j));
        const VT lg = VLOG(y), e = FN(exp_any)(y);
        for (int j = 0; j < W; j++) {
            bf16_tables[TAB_LOG][i + j] = (float)lg[j];
            bf16_tables[TAB_EXP][i + j] = (float)e[j];
        }
    }
}

/* The loss l and the gradients gx, gy of one vector, operands stored as dt; kind and dt are constants in
 * every inlined copy. */
INLINE void FN(op)(const int kind, const int dt, VT x, VT y, VT w, VT s, VT *l, VT *gx, VT *gy)
{
    if (kind == K_MSE) {
        const VT d = x - y, g = (d + d) * w * s;
        *l = d * d * w;
        *gx = g;
        *gy = -g;
    } else if (kind == K_KL_PROB) {
        const VT zero = FN(splat)(0), lg = PW_OF_TARGET(dt, y, TAB_LOG, VLOG);
        const VI absent = y == zero;
        /* xlogy(y, y): 0 at y == 0; NaN for a NaN or negative y, as torch */
        *l = FN(select)(absent, zero, y * lg) - y * x;
        *gx = -y * s;
        /* torch's autograd: xlogy's t / t term is NaN at y == 0 and y == inf */
        *gy = FN(select)(absent | (y == INFINITY), FN(splat)(NAN), lg + 1 - x) * s;
    } else {
        const VT e = PW_OF_TARGET(dt, y, TAB_EXP, FN(exp_any)), l_ = e * (y - x);
        *l = l_;
        *gx = -e * s;
        *gy = (l_ + e) * s;
    }
}
#undef PW_OF_TARGET

/* 16 results (the even elements' vector, the odd ones') written as bfloat16 from element i, rounded to
 * nearest even: 8 words lo | (hi << 16), the pair order of FN(bf16_pairs) undone with no shuffle.
 * Without the NaN fix-up: every NaN here has its low 16 bits 0, and rounding adds at most 0x8000 to
 * them, so it keeps the NaN's high half, a NaN. (The operands are bfloat16 and the scale not NaN, checked
 * by the binding; a NaN is an operand's, propagated with its payload, or an invalid operation's default
 * NaN, or the constant NAN, all with low bits 0; the exp and log of _native_common.h / _native_log.h
 * pass a NaN argument through, and their bit manipulation makes none of a number.) */
INLINE void FN(store_pairs)(void *p, int64_t i, VT even, VT odd)
{
    const v8u32 words = bf16_round8_words((v8f)even, 1) | (bf16_round8_words((v8f)odd, 1) << 16);
    memcpy((uint16_t *)p + i, &words, sizeof words);
}

/* Elements [i0, i0 + m) of operands stored as dt (m <= BLOCK): writes the outputs present and returns
 * the block's loss sum. */
INLINE T FN(block)(const int kind, const int dt, const void *x, const void *y, const void *w, void *l, void *gx,
                   void *gy, T scale, int64_t i0, int64_t m)
{
    const VT s = FN(splat)(scale), one = FN(splat)(1);
    VT acc = FN(splat)(0), vl, vgx, vgy;
    int64_t j = 0;
#if W == 8
    if (dt == DT_BF16) {
        /* 16 elements at a time as (even, odd) float vectors read from 8 words each (FN(bf16_pairs)),
         * written back through FN(store_pairs); the rest (m % 16) by the loops below */
        VT acc_odd = acc, ex, ox, ey, oy, ew = one, ow = one, ol, ogx, ogy;
        for (; j + 2 * W <= m; j += 2 * W) {
            const int64_t i = i0 + j;
            FN(bf16_pairs)((const uint16_t *)x, i, &ex, &ox);
            FN(bf16_pairs)((const uint16_t *)y, i, &ey, &oy);
            if (w) FN(bf16_pairs)((const uint16_t *)w, i, &ew, &ow);
            FN(op)(kind, dt, ex, ey, ew, s, &vl, &vgx, &vgy);
            FN(op)(kind, dt, ox, oy, ow, s, &ol, &ogx, &ogy);
            acc += vl;
            acc_odd += ol;
            if (l) FN(store_pairs)(l, i, vl, ol);
            if (gx) FN(store_pairs)(gx, i, vgx, ogx);
            if (gy) FN(store_pairs)(gy, i, vgy, ogy);
        }
        acc += acc_odd;
    }
#endif
    for (; j + W <= m; j += W) {
        const int64_t i = i0 + j;
        FN(op)(kind, dt, FN(vload)(x, dt, i), FN(vload)(y, dt, i), w ? FN(vload)(w, dt, i) : one, s, &vl, &vgx, &vgy);
        acc += vl;
        if (l) FN(vstore)(l, dt, i, vl);
        if (gx) FN(vstore)(gx, dt, i, vgx);
        if (gy) FN(vstore)(gy, dt, i, vgy);
    }
    if (j < m) {
        /* the last r = m - j < W elements: padded lanes read 0 (weight 1) and are neither summed nor stored */
        const int64_t r = m - j, i = i0 + j;
        T bx[W] = {0}, by[W] = {0}, bw[W], bl[W], bgx[W], bgy[W];
        VI lane;
        for (int k = 0; k < W; k++) {
            bw[k] = 1;
            lane[k] = -(k < r);
        }
        FN(get)(bx, x, dt, i, r);
        FN(get)(by, y, dt, i, r);
        if (w) FN(get)(bw, w, dt, i, r);
        FN(op)(kind, dt, FN(load)(bx), FN(load)(by), FN(load)(bw), s, &vl, &vgx, &vgy);
        acc += FN(select)(lane, vl, FN(splat)(0));
        FN(store)(bl, vl);
        FN(store)(bgx, vgx);
        FN(store)(bgy, vgy);
        if (l) FN(put)(l, dt, i, bl, r);
        if (gx) FN(put)(gx, dt, i, bgx, r);
        if (gy) FN(put)(gy, dt, i, bgy, r);
    }
    T sum = 0;
    for (int k = 0; k < W; k++) sum += acc[k];
    return sum;
}

/* A block of every operand converted into T scratch, computed there, its outputs converted out. */
INLINE T FN(block_mixed)(const int kind, const struct pw_args *a, int64_t i0, int64_t m)
{
    T xs[BLOCK], ys[BLOCK], ws[BLOCK], ls[BLOCK], gxs[BLOCK], gys[BLOCK];
    FN(get)(xs, a->x.ptr, a->x.dtype, i0, m);
    FN(get)(ys, a->y.ptr, a->y.dtype, i0, m);
    if (a->w.ptr) FN(get)(ws, a->w.ptr, a->w.dtype, i0, m);
    const T sum = FN(block)(kind, DTYPE_OF_T, xs, ys, a->w.ptr ? ws : NULL, a->l.ptr ? ls : NULL,
                            a->gx.ptr ? gxs : NULL, a->gy.ptr ? gys : NULL, (T)a->scale, 0, m);
    if (a->l.ptr) FN(put)(a->l.ptr, a->l.dtype, i0, ls, m);
    if (a->gx.ptr) FN(put)(a->gx.ptr, a->gx.dtype, i0, gxs, m);
    if (a->gy.ptr) FN(put)(a->gy.ptr, a->gy.dtype, i0, gys, m);
    return sum;
}

/* One kind over blocks [b0, b1): the uniform path for each storage dtype of T, else the mixed one. */
INLINE void FN(kind_blocks)(const int kind, const struct pw_args *a, int64_t b0, int64_t b1)
{
    const T scale = (T)a->scale;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t i0 = b * BLOCK, m = a->n - i0 < BLOCK ? a->n - i0 : BLOCK;
        T sum;
#define PW_UNIFORM(DT) FN(block)(kind, DT, a->x.ptr, a->y.ptr, a->w.ptr, a->l.ptr, a->gx.ptr, a->gy.ptr, scale, i0, m)
        if (a->uniform == DTYPE_OF_T) sum = PW_UNIFORM(DTYPE_OF_T);
#if W == 8
        else if (a->uniform == DT_BF16) sum = PW_UNIFORM(DT_BF16);
        else if (a->uniform == DT_F16) sum = PW_UNIFORM(DT_F16);
#endif
        else sum = FN(block_mixed)(kind, a, i0, m);
#undef PW_UNIFORM
        a->sums[b] = (double)sum;
    }
}

HOT static int FN(pointwise_blocks)(const struct pw_args *a, int64_t b0, int64_t b1)
{
    switch (a->kind) {
    case K_MSE: FN(kind_blocks)(K_MSE, a, b0, b1); break;
    case K_KL_PROB: FN(kind_blocks)(K_KL_PROB, a, b0, b1); break;
    default: FN(kind_blocks)(K_KL_LOG, a, b0, b1); break;
    }
    return 0;
}

/* ---- a gradient times grad_output ------------------------------------------------------------------
 * g (A, C, B) contiguous, s (A, B) contiguous, both stored as dt: g[a, c, b] *= s[a, b], each product
 * formed in T from the two stored values and rounded once to dt, as torch's mul_ does (for bfloat16 and
 * float16 it multiplies in float). B == 1: runs along c of one s (a scalar); else runs along b with s
 * alongside. Items are SCALE_CHUNK elements of the flat index: the split does not change any result. */
INLINE void FN(scale_run)(void *g, const int dt, int64_t i, int64_t m, const void *s, int64_t si, const int scalar)
{
    T one[1];
    FN(get)(one, s, dt, si, 1);
    const VT vs = FN(splat)(one[0]);
    int64_t j = 0;
    for (; j + W <= m; j += W)
        FN(vstore)(g, dt, i + j, FN(vload)(g, dt, i + j) * (scalar ? vs : FN(vload)(s, dt, si + j)));
    if (j < m) {
        T bg[W], bs[W];
        FN(get)(bg, g, dt, i + j, m - j);
        if (!scalar) FN(get)(bs, s, dt, si + j, m - j);
        for (int64_t k = 0; k < m - j; k++) bg[k] *= scalar ? one[0] : bs[k];
        FN(put)(g, dt, i + j, bg, m - j);
    }
}

INLINE void FN(scale_chunk)(const struct scale_args *a, const int dt, int64_t i0, int64_t i1)
{
    const int64_t cb = a->C * a->B;
    for (int64_t i = i0; i < i1;) {
        const int64_t row = i / cb, r = i % cb, left = i1 - i;
        int64_t m;
        if (a->B == 1) {
            m = a->C - r < left ? a->C - r : left;
            FN(scale_run)(a->g, dt, i, m, a->s, row, 1);
        } else {
            const int64_t b = r % a->B;
            m = a->B - b < left ? a->B - b : left;
            FN(scale_run)(a->g, dt, i, m, a->s, row * a->B + b, 0);
        }
        i += m;
    }
}

HOT static int FN(scale_range)(const struct scale_args *a, int64_t k0, int64_t k1)
{
    const int64_t i0 = k0 * SCALE_CHUNK, i1 = k1 * SCALE_CHUNK < a->n ? k1 * SCALE_CHUNK : a->n;
    if (a->dt == DTYPE_OF_T) FN(scale_chunk)(a, DTYPE_OF_T, i0, i1);
#if W == 8
    else if (a->dt == DT_BF16) FN(scale_chunk)(a, DT_BF16, i0, i1);
    else if (a->dt == DT_F16) FN(scale_chunk)(a, DT_F16, i0, i1);
#endif
    return 0;
}
