/* Row operations shared by the row kernels (_native_rows.h and the other families' row headers),
 * written once for an accumulation type T: instantiated by _native_instantiate.h through each
 * family's template, which includes this file first. Macros (from _native_instantiate.h):
 *   T      the accumulation type,           VT  a vector of W values of T (32 bytes),
 *   W      lanes per vector,                VI  the integer vector of the same size,
 *   VEXP   the vector exp of VT (x <= 0),   FN(name) the name suffixed with the type.
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

/* exp of a contiguous array, in place: the kernels' vector exp, exposed for the accuracy tests. */
HOT static void FN(exp_array)(T *p, int64_t n)
{
    for (int64_t i = 0; i < n; i += W) {
        int64_t m = n - i < W ? n - i : W;
        FN(store_part)(p + i, m, VEXP(FN(load_part)(p + i, m, 0)));
    }
}
