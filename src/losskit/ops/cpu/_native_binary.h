/* Binary-loss kernels of losskit.ops.cpu._native_binary, written once for an accumulation type T.
 *
 * Instantiated by _native_binary.c through _native_instantiate.h (T = float for float32, bfloat16 and
 * float16 storage; T = double for float64). Reference expressions, per element (x input, y target,
 * w weight and p pos_weight, ones when absent; ls(v) = logsigmoid(v) = min(v, 0) - log1p(exp(-|v|));
 * the gradients are torch's backward formulas, as in losskit/functional/_binary.py):
 *   BCE:           loss = w ((y - 1) max(log1p(-x), -100) - y max(log x, -100))
 *                  dx = w (x - y) / max((1 - x) x, EPSILON),  dy = w (log1p(-x) - log x)
 *   BCE logits:    loss = w ((1 - y) x - (1 + (p - 1) y) ls(x))
 *                  dx = w ((p y + 1 - y) s - p y),  dy = w (ls(-x) - p ls(x))   (w (s - y), -w x without p)
 *   soft margin:   loss = -w (y ls(x) + (1 - y) ls(-x)),  dx = w (s - y),  dy = w (ls(-x) - ls(x))
 *   sigmoid focal: q = s (1 - y) + (1 - s) y, a = alpha y + (1 - alpha)(1 - y) (1 if alpha < 0),
 *                  ce = (1 - y) x - ls(x), loss = a ce q^gamma, r = gamma ce / q (gamma where q = 0),
 *                  dx = a q^gamma ((s - y) + r s (1 - s)(1 - 2y)),
 *                  dy = a q^gamma (-x + r ((1 - s) - s)) + (2 alpha - 1) ce q^gamma  (no last term if alpha < 0)
 * with s = sigmoid(x); each gradient is then multiplied by the reduction's factor `scale`.
 *
 * Work unit: a block of BLOCK_BYTES of T (1024 floats, 512 doubles). Operands not stored as T are
 * converted into block buffers, outputs not stored as T formed in one and converted once (except the
 * common bfloat16 call, converted in registers: see "bfloat16 operands in pairs"); the seven
 * buffers (x, y, w, p, loss, two gradients) take 28 KiB of stack per thread and stay in L1/L2. Per
 * element: one exp (of -|x|) and one log1p for the logit losses, one log and one log1p for BCE (the
 * vector functions of _native_common.h and _native_log.h), one division; the focal loss with a
 * non-integer gamma one more log and exp for q^gamma. A bfloat16 x's functions are read from tables over
 * its 65536 bit patterns instead (see "bfloat16 operands in pairs").
 */

#include "_native_rowops.h"

/* lanes [0, n) set */
INLINE VI FN(first_lanes)(int64_t n)
{
    VI lane;
    for (int j = 0; j < W; j++) lane[j] = j;
    return lane < (VI){0} + (int)n; /* n <= W */
}

INLINE VT FN(vmin)(VT a, VT b) { return FN(select)(b < a, b, a); }     /* a where either is NaN */
INLINE VT FN(clamp_min)(VT v, T lo) { return FN(select)(v < lo, FN(splat)(lo), v); } /* NaN stays NaN */

/* log1p(exp(-|x|)) and the sigmoid pair of x, from one exp, one log1p and one division: the float path's,
 * and the entries of the bfloat16 tables (build_tables below). */
struct FN(sig_core) { VT l, s, sn; };

INLINE struct FN(sig_core) FN(sigmoid_core)(VT x)
{
    const VT e = VEXP(FN(vmin)(x, -x)); /* exp(-|x|); a NaN x gives NaN */
    const VT l = VLOG1P(e), r = 1 / (1 + e);
    const VI pos = x >= 0;
    return (struct FN(sig_core)){l, FN(select)(pos, r, e * r), FN(select)(pos, e * r, r)};
}

/* The logsigmoid pair and the sigmoid pair of x: computed, or (idx non-NULL: x's bfloat16 bit patterns)
 * read from the tables, whose entries sigmoid_core computed on the same values. */
struct FN(sig) { VT ls, lsn, s, sn; };

INLINE struct FN(sig) FN(sigmoid_parts)(VT x, const v8u32 *idx)
{
    const VT zero = FN(splat)(0);
    const struct FN(sig_core) c = !idx ? FN(sigmoid_core)(x)
                                       : (struct FN(sig_core)){FN(table_lanes)(bf16_tables[TAB_LOG1P_EXP], *idx),
                                                               FN(table_lanes)(bf16_tables[TAB_SIGMOID], *idx),
                                                               FN(table_lanes)(bf16_tables[TAB_SIGMOID_NEG], *idx)};
    return (struct FN(sig)){FN(vmin)(x, zero) - c.l, FN(vmin)(-x, zero) - c.l, c.s, c.sn};
}

/* One vector of a kind: the loss and, where wanted (want_x, want_y), the unscaled gradients. */
struct FN(res) { VT loss, dx, dy; };

INLINE struct FN(res) FN(bce_v)(const struct binary_args *a, VT x, VT y, VT w, VT p, int want_x, int want_y,
                                   const v8u32 *idx)
{
    (void)a;
    (void)p;
    const VT lx = idx ? FN(table_lanes)(bf16_tables[TAB_LOG], *idx) : VLOG(x);
    const VT l1 = idx ? FN(table_lanes)(bf16_tables[TAB_LOG1P_NEG], *idx) : VLOG1P(-x);
    struct FN(res) r;
    r.loss = w * ((y - 1) * FN(clamp_min)(l1, -100) - y * FN(clamp_min)(lx, -100));
    if (want_x) r.dx = w * ((x - y) / FN(clamp_min)((1 - x) * x, (T)BCE_EPSILON));
    if (want_y) r.dy = w * (l1 - lx);
    return r;
}

INLINE struct FN(res) FN(logits_v)(const struct binary_args *a, VT x, VT y, VT w, VT p, int want_x, int want_y,
                                   const v8u32 *idx)
{
    const struct FN(sig) sg = FN(sigmoid_parts)(x, idx);
    struct FN(res) r;
    if (a->p.ptr) {
        const VT py = p * y;
        r.loss = w * ((1 - y) * x - sg.ls * ((p - 1) * y + 1));
        if (want_x) r.dx = w * ((py + 1 - y) * sg.s - py);
        if (want_y) r.dy = w * (sg.lsn - sg.ls * p);
    } else {
        r.loss = w * ((1 - y) * x - sg.ls);
        if (want_x) r.dx = w * (sg.s - y);
        if (want_y) r.dy = w * -x;
    }
    return r;
}

INLINE struct FN(res) FN(soft_margin_v)(const struct binary_args *a, VT x, VT y, VT w, VT p, int want_x,
                                        int want_y, const v8u32 *idx)
{
    (void)a;
    (void)p;
    const struct FN(sig) sg = FN(sigmoid_parts)(x, idx);
    struct FN(res) r;
    r.loss = w * -(y * sg.ls + (1 - y) * sg.lsn);
    if (want_x) r.dx = w * (sg.s - y);
    if (want_y) r.dy = w * (sg.lsn - sg.ls);
    return r;
}

/* q^gamma: a product for an integer gamma up to 64 (as torch's pow for 2 and 3; q^0 = 1 even for a NaN
 * q, as pow), else exp(gamma log q) for q in [0, 1], where the argument is <= 0; the rare lanes outside
 * [0, 1] (targets outside [0, 1]) go through the C library's pow. */
INLINE VT FN(pow_v)(const struct binary_args *a, VT q)
{
    const T gm = (T)a->gamma;
    if (a->int_gamma >= 0) {
        VT out = FN(splat)(1), base = q;
        for (int64_t k = a->int_gamma; k; k >>= 1) {
            if (k & 1) out *= base;
            base *= base;
        }
        return out;
    }
    VT out = VEXP(gm * VLOG(q));
    const VI odd = (q < 0) | (q > 1);
    for (int j = 0; j < W; j++)
        if (odd[j]) out[j] = (T)POW_SCALAR(q[j], gm);
    return out;
}

INLINE struct FN(res) FN(focal_v)(const struct binary_args *a, VT x, VT y, VT w, VT p, int want_x, int want_y,
                                  const v8u32 *idx)
{
    (void)w;
    (void)p;
    const struct FN(sig) sg = FN(sigmoid_parts)(x, idx);
    const T alpha = (T)a->alpha, gm = (T)a->gamma;
    const VT ny = 1 - y, ce = ny * x - sg.ls, q = sg.s * ny + sg.sn * y, q_g = FN(pow_v)(a, q);
    const VT loss = ce * q_g;
    const VT at = alpha >= 0 ? ny * (1 - alpha) + y * alpha : FN(splat)(1);
    struct FN(res) r;
    r.loss = loss * at;
    if (want_x || want_y) {
        const VT ratio = gm != 0 ? FN(select)(q == 0, FN(splat)(1), ce / q) * gm : FN(splat)(0);
        if (want_y) {
            r.dy = (-x + ratio * (sg.sn - sg.s)) * q_g * at;
            if (alpha >= 0) r.dy += loss * (2 * alpha - 1);
        }
        if (want_x) {
            const VT rs = ratio * sg.s * sg.sn;
            r.dx = (((sg.s - y) + rs) - rs * y * 2) * q_g * at;
        }
    }
    return r;
}

/* Fill dst[0, n) with a periodic operand's elements j0, j0 + 1, ...; returns dst, or a pointer into the
 * operand itself when its elements are already consecutive there. */
static const T *FN(periodic)(T *dst, const struct periodic *q, int64_t j0, int64_t n)
{
    const T *w = (const T *)q->ptr;
    const int64_t idx = q->start + j0;
    int64_t k = (idx / q->div) % q->period, r = idx % q->div;
    if (q->period == 1) {
        for (int64_t j = 0; j < n; j++) dst[j] = w[0];
        return dst;
    }
    if (q->div == 1 && k + n <= q->period) return w + k;
    for (int64_t j = 0; j < n;) {
        const int64_t run = q->div - r < n - j ? q->div - r : n - j; /* elements left with index k */
        if (q->div == 1) {
            const int64_t len = q->period - k < n - j ? q->period - k : n - j;
            memcpy(dst + j, w + k, (size_t)len * sizeof(T));
            j += len;
            k += len;
        } else {
            for (int64_t i = 0; i < run; i++) dst[j + i] = w[k];
            j += run;
            k++;
            r = 0;
        }
        if (k == q->period) k = 0;
    }
    return dst;
}

/* Input of a block: the operand itself when stored as T, else converted into buf. */
INLINE const T *FN(input_block)(T *buf, const struct view *v, int64_t j0, int64_t n)
{
    if (v->dtype == DTYPE_OF_T) return (const T *)v->ptr + j0;
    FN(load_row)(buf, v, j0, 1, n);
    return buf;
}

/* Output of a block: the operand itself when stored as T, else buf (stored by output_done). */
INLINE T *FN(output_block)(T *buf, const struct view *v, int64_t j0)
{
    if (!v->ptr) return NULL;
    return v->dtype == DTYPE_OF_T ? (T *)v->ptr + j0 : buf;
}

INLINE void FN(output_done)(const T *buf, const struct view *v, int64_t j0, int64_t n)
{
    if (v->ptr && v->dtype != DTYPE_OF_T) FN(store_row)(v, j0, 1, n, buf);
}

/* The vector loop of one block for one kind (VEC, inlined): writes loss, gx, gy where non-NULL and
 * returns the block's loss sum; sets *bad when an x or y lies outside [0, 1] (CHECK_UNIT: BCE). Full
 * vectors, then one partial vector whose padded lanes (x 1/2, y 0, w p 1: in every loss's domain) are
 * neither stored nor summed; NAME##_step is inlined into both with m constant in the first. */
/* A block's loss sum: its per-lane sums added in double, in lane order; a lane that met an x or y
 * outside [0, 1] (BCE) sets *bad. */
INLINE double FN(lane_total)(VT sum, VI out_of_range, int *bad)
{
    double total = 0;
    for (int j = 0; j < W; j++) {
        total += sum[j];
        *bad |= out_of_range[j] != 0;
    }
    return total;
}

#define DEFINE_BLOCK_LOOP(NAME, VEC, CHECK_UNIT)                                                          \
    INLINE void FN(NAME##_step)(const struct binary_args *a, int64_t m, const T *x, const T *y, const T *w,\
                                const T *p, T *loss, T *gx, T *gy, VT sc, VT *sum, VI *bad, const int tab)\
    {                                                                                                     \
        const int full = m == W;                                                                          \
        const VT ones = FN(splat)(1);                                                                     \
        const VT vx = full ? FN(load)(x) : FN(load_part)(x, m, (T)0.5);                                   \
        const VT vy = full ? FN(load)(y) : FN(load_part)(y, m, 0);                                        \
        const VT vw = !w ? ones : full ? FN(load)(w) : FN(load_part)(w, m, 1);                            \
        const VT vp = !p ? ones : full ? FN(load)(p) : FN(load_part)(p, m, 1);                            \
        v8u32 bits; /* tab: x holds bfloat16 values, whose bit patterns are the high halves */            \
        memcpy(&bits, &vx, sizeof bits);                                                                  \
        bits >>= 16;                                                                                      \
        const struct FN(res) r = VEC(a, vx, vy, vw, vp, gx != NULL, gy != NULL, tab ? &bits : NULL);      \
        if (CHECK_UNIT) *bad |= (vx < 0) | (vx > 1) | (vy < 0) | (vy > 1);                                \
        if (full) {                                                                                       \
            if (loss) FN(store)(loss, r.loss);                                                            \
            if (gx) FN(store)(gx, r.dx * sc);                                                             \
            if (gy) FN(store)(gy, r.dy * sc);                                                             \
            *sum += r.loss;                                                                               \
        } else {                                                                                          \
            if (loss) FN(store_part)(loss, m, r.loss);                                                    \
            if (gx) FN(store_part)(gx, m, r.dx * sc);                                                     \
            if (gy) FN(store_part)(gy, m, r.dy * sc);                                                     \
            *sum += FN(select)(FN(first_lanes)(m), r.loss, FN(splat)(0));                                 \
        }                                                                                                 \
    }                                                                                                     \
    INLINE double FN(NAME##_loop)(const struct binary_args *a, int64_t n, const T *x, const T *y, const T *w,\
                                  const T *p, T *loss, T *gx, T *gy, int *bad, const int tab)             \
    {                                                                                                     \
        const VT sc = FN(splat)((T)a->scale);                                                             \
        VT sum = FN(splat)(0);                                                                            \
        VI out_of_range = (VI){0};                                                                        \
        int64_t j = 0;                                                                                    \
        for (; j + W <= n; j += W)                                                                        \
            FN(NAME##_step)(a, W, x + j, y + j, w ? w + j : NULL, p ? p + j : NULL, loss ? loss + j : NULL,\
                            gx ? gx + j : NULL, gy ? gy + j : NULL, sc, &sum, &out_of_range, tab);        \
        if (j < n)                                                                                        \
            FN(NAME##_step)(a, n - j, x + j, y + j, w ? w + j : NULL, p ? p + j : NULL,                   \
                            loss ? loss + j : NULL, gx ? gx + j : NULL, gy ? gy + j : NULL, sc, &sum,     \
                            &out_of_range, tab);                                                          \
        return FN(lane_total)(sum, out_of_range, bad);                                                    \
    }                                                                                                     \
    /* x's functions from the bfloat16 tables when x is stored as bfloat16 (T float; the values in x are  \
     * then bfloat16 values, converted exactly), else computed */                                         \
    HOT_AVX512 static double FN(NAME)(const struct binary_args *a, int64_t n, const T *x, const T *y, const T *w,\
                               const T *p, T *loss, T *gx, T *gy, int *bad)                               \
    {                                                                                                     \
        if (sizeof(T) == 4 && a->x.dtype == DT_BF16)                                                      \
            return FN(NAME##_loop)(a, n, x, y, w, p, loss, gx, gy, bad, 1);                               \
        return FN(NAME##_loop)(a, n, x, y, w, p, loss, gx, gy, bad, 0);                                   \
    }

/* ---- bfloat16 operands in pairs (T = float) -----------------------------------------------------------
 * Contiguous bfloat16 input and target with no weight or pos_weight, bfloat16 outputs: 16 elements are 8
 * 32-bit words, whose `word << 16` and `word & 0xffff0000` are the even and the odd elements as floats
 * (bf16_pairs of _native_rowops.h): no conversion pass over a block buffer, no shuffle. Each loss runs on
 * the even and on the odd vector, and each output word is put back together as even | odd << 16 after
 * rounding to nearest even (bf16_round8_words), so outputs are in element order and every element is the
 * float path's value rounded once, bit for bit. The kernels are bound by vector arithmetic: a first pass
 * over a block leaves out the NaN lanes' fix-up of the rounding (a compare, an or and a blend a vector)
 * and adds v * 0 of every stored vector into `chk` instead (one fused multiply-add; NaN where a value was
 * NaN or infinite); a block whose chk is NaN is done again with the fix-up (its inputs are not outputs:
 * see pairs_apply). The common call (the input's gradient alone) has its own loop with no test of the
 * absent outputs inside (those tests cost 3-6% in cache). A block's last n % 16 elements go through the
 * float block loop above (converted in a 16-element buffer). Kernel in cache (64K elements), 1 thread,
 * the input's gradient alone, loaded machine: bfloat16 took 1.09-1.14x the float32 time per element
 * through conversion passes, 0.98-1.09x so (BCE 0.98-1.00, focal 1.03, logits 1.06, soft margin 1.09).
 *
 * Tables: a bfloat16 x has 65536 bit patterns, so the pair loops read x's functions from tables indexed
 * by them (the low and the high half of each word) instead of computing them, and so does the block loop
 * when x is stored as bfloat16 (with a weight, say: the converted values' high halves): log1p(exp(-|x|)),
 * sigmoid(x) and sigmoid(-x) for the logit losses (logsigmoid(+-x) = min(+-x, 0) - the first, as the
 * float path forms it), log x and log1p(-x) for BCE. build_tables fills each entry with the float path's
 * own vector code on that value, in the same clone of the kernels (HOT_AVX512), so every output stays the float
 * path's value rounded once, bit for bit (tested over every bit pattern). What is left per element is
 * loads, a few multiply-adds, the rounding and BCE's one division. 256 KiB a table, float, built on the
 * first call that reads them (pthread_once; about 0.2 ms): 768 KiB for the logit losses, 512 KiB for
 * BCE; a kernel touches only the entries of the values it meets (randn logits: a few thousand). */

/* A vector rounded to nearest even into the low half of each word; with no_nan the NaN lanes' fix-up
 * is left out and v * 0 is added into chk instead. */
INLINE v8u32 FN(round_words)(VT v, const int no_nan, VT *chk)
{
    if (no_nan) *chk = v * 0 + *chk;
    return bf16_round8_words((v8f)v, no_nan);
}

INLINE void FN(store_pairs)(uint16_t *dst, VT even, VT odd, const int no_nan, VT *chk)
{
    const v8u32 words = FN(round_words)(even, no_nan, chk) | (FN(round_words)(odd, no_nan, chk) << 16);
    memcpy(dst, &words, sizeof words);
}

#define DEFINE_PAIR_LOOP(NAME, VEC, CHECK_UNIT)                                                          \
    INLINE void FN(NAME##_pair_step)(const struct binary_args *a, const uint16_t *x, const uint16_t *y,    \
                                     uint16_t *loss, uint16_t *gx, uint16_t *gy, VT sc, VT *sum, VI *bad, \
                                     const int no_nan, VT *chk)                                           \
    {                                                                                                     \
        const VT ones = FN(splat)(1);                                                                     \
        VT xe, xo, ye, yo;                                                                                \
        v8u32 words;                                                                                      \
        memcpy(&words, x, sizeof words);                                                                  \
        const v8u32 ie = words & 0xffffu, io = words >> 16; /* the bit patterns of xe and xo */           \
        FN(bf16_pairs)(x, 0, &xe, &xo);                                                                   \
        FN(bf16_pairs)(y, 0, &ye, &yo);                                                                   \
        const struct FN(res) r0 = VEC(a, xe, ye, ones, ones, gx != NULL, gy != NULL, &ie),                \
                             r1 = VEC(a, xo, yo, ones, ones, gx != NULL, gy != NULL, &io);                \
        if (CHECK_UNIT)                                                                                   \
            *bad |= (xe < 0) | (xe > 1) | (ye < 0) | (ye > 1) | (xo < 0) | (xo > 1) | (yo < 0) | (yo > 1); \
        if (loss) FN(store_pairs)(loss, r0.loss, r1.loss, no_nan, chk);                                   \
        if (gx) FN(store_pairs)(gx, r0.dx * sc, r1.dx * sc, no_nan, chk);                                 \
        if (gy) FN(store_pairs)(gy, r0.dy * sc, r1.dy * sc, no_nan, chk);                                 \
        *sum += r0.loss + r1.loss;                                                                        \
    }                                                                                                     \
    /* The block's 16-element groups: returns their loss sum (per lane, lanes added in double). */        \
    INLINE double FN(NAME##_pair_groups)(const struct binary_args *a, int64_t n, const uint16_t *x,        \
                                         const uint16_t *y, uint16_t *loss, uint16_t *gx, uint16_t *gy,   \
                                         int *bad, const int no_nan, VT *chk)                             \
    {                                                                                                     \
        const VT sc = FN(splat)((T)a->scale);                                                             \
        VT sum = FN(splat)(0);                                                                            \
        VI out_of_range = (VI){0};                                                                        \
        for (int64_t j = 0; j + 16 <= n; j += 16)                                                         \
            FN(NAME##_pair_step)(a, x + j, y + j, loss ? loss + j : NULL, gx ? gx + j : NULL,             \
                                 gy ? gy + j : NULL, sc, &sum, &out_of_range, no_nan, chk);               \
        return FN(lane_total)(sum, out_of_range, bad);                                                    \
    }                                                                                                     \
    /* A block of n elements; the tail of a block, and of a row, through pair_tail (defined below, before \
     * the macro's uses). */                                                                              \
    HOT_AVX512 static double FN(NAME##_pairs)(const struct binary_args *a, int64_t n, const uint16_t *x,          \
                                       const uint16_t *y, uint16_t *loss, uint16_t *gx, uint16_t *gy,     \
                                       int *bad)                                                          \
    {                                                                                                     \
        VT chk = FN(splat)(0);                                                                            \
        double total = !loss && !gy && gx /* the common call: the input's gradient alone, its own loop */ \
                           ? FN(NAME##_pair_groups)(a, n, x, y, NULL, gx, NULL, bad, 1, &chk)             \
                           : FN(NAME##_pair_groups)(a, n, x, y, loss, gx, gy, bad, 1, &chk);              \
        if (FN(hsum)(chk) != FN(hsum)(chk)) /* a NaN or infinite value: round again, NaN kept NaN */       \
            total = FN(NAME##_pair_groups)(a, n, x, y, loss, gx, gy, bad, 0, &chk);                       \
        const int64_t j = n & ~(int64_t)15;                                                               \
        if (j < n) total += FN(pair_tail)(FN(NAME), a, n - j, x + j, y + j, loss ? loss + j : NULL,        \
                                          gx ? gx + j : NULL, gy ? gy + j : NULL, bad);                   \
        return total;                                                                                     \
    }

typedef double (*FN(block_fn))(const struct binary_args *, int64_t, const T *, const T *, const T *, const T *,
                               T *, T *, T *, int *);

/* The last m < 16 elements of a bfloat16 block through the float block loop `block`. */
static double FN(pair_tail)(FN(block_fn) block, const struct binary_args *a, int64_t m, const uint16_t *x,
                            const uint16_t *y, uint16_t *loss, uint16_t *gx, uint16_t *gy, int *bad)
{
    T xf[16], yf[16], lf[16], gxf[16], gyf[16];
    for (int64_t j = 0; j < m; j++) {
        xf[j] = (T)bf16_to_f32(x[j]);
        yf[j] = (T)bf16_to_f32(y[j]);
    }
    const double total = block(a, m, xf, yf, NULL, NULL, loss ? lf : NULL, gx ? gxf : NULL, gy ? gyf : NULL, bad);
    for (int64_t j = 0; j < m; j++) {
        if (loss) loss[j] = f32_to_bf16((float)lf[j]);
        if (gx) gx[j] = f32_to_bf16((float)gxf[j]);
        if (gy) gy[j] = f32_to_bf16((float)gyf[j]);
    }
    return total;
}

#define DEFINE_LOOPS(NAME, VEC, CHECK_UNIT)                                                              \
    DEFINE_BLOCK_LOOP(NAME, VEC, CHECK_UNIT)                                                              \
    DEFINE_PAIR_LOOP(NAME, VEC, CHECK_UNIT)
DEFINE_LOOPS(bce_block, FN(bce_v), 1)
DEFINE_LOOPS(logits_block, FN(logits_v), 0)
DEFINE_LOOPS(soft_margin_block, FN(soft_margin_v), 0)
DEFINE_LOOPS(focal_block, FN(focal_v), 0)

/* The entries of the bfloat16 tables (bce: TAB_LOG and TAB_LOG1P_NEG, else the three sigmoid tables): the
 * float path's functions of x on every bit pattern, by the same clone of the kernels (HOT_AVX512) as the pair
 * loops that read them, so a table read gives the bits the float path computes. T is float. */
HOT_AVX512 static void FN(build_tables)(int bce)
{
    for (int64_t i = 0; i < 65536; i += W) {
        VT x;
        for (int j = 0; j < W; j++) x[j] = (T)bf16_to_f32((uint16_t)(i + j));
        const struct FN(sig_core) c = bce ? (struct FN(sig_core)){VLOG(x), VLOG1P(-x), x} : FN(sigmoid_core)(x);
        float *const dst[3] = {bf16_tables[bce ? TAB_LOG : TAB_LOG1P_EXP] + i,
                               bf16_tables[bce ? TAB_LOG1P_NEG : TAB_SIGMOID] + i,
                               bce ? NULL : bf16_tables[TAB_SIGMOID_NEG] + i};
        for (int j = 0; j < W; j++) {
            dst[0][j] = (float)c.l[j];
            dst[1][j] = (float)c.s[j];
            if (dst[2]) dst[2][j] = (float)c.sn[j];
        }
    }
}

/* The pair path takes the call: T is float, input and target bfloat16, no weight or pos_weight, and each
 * per-element output (row sums, in the accumulation type, are not) bfloat16 or absent and not overlapping
 * an input. */
INLINE int FN(pairs_apply)(const struct binary_args *a)
{
    const struct view *outs[3] = {&a->gx, &a->gy, a->row_len == 0 ? &a->out : &a->gx};
    const uintptr_t bytes = (uintptr_t)a->n * 2, x = (uintptr_t)a->x.ptr, y = (uintptr_t)a->y.ptr;
    if (sizeof(T) != 4 || a->x.dtype != DT_BF16 || a->y.dtype != DT_BF16 || a->w.ptr || a->p.ptr) return 0;
    for (int k = 0; k < 3; k++) {
        const uintptr_t o = (uintptr_t)outs[k]->ptr; /* bfloat16 and apart from the inputs (a block may be redone) */
        if (o && (outs[k]->dtype != DT_BF16 || (o < x + bytes && x < o + bytes) || (o < y + bytes && y < o + bytes)))
            return 0;
    }
    return 1;
}

/* Items [i0, i1) of one call: each item (a block of BLOCK elements, or a row when a->row_len > 0) is
 * done block by block; its loss sum goes to a->sums[i] (or, for rows, to the row's entry of out). */
HOT static int FN(binary_range)(const struct binary_args *a, int64_t i0, int64_t i1)
{
    enum { BLOCK = BLOCK_BYTES / sizeof(T) };
    T xb[BLOCK], yb[BLOCK], wb[BLOCK], pb[BLOCK], lb[BLOCK], gxb[BLOCK], gyb[BLOCK];
    const int64_t item = a->row_len > 0 ? a->row_len : BLOCK;
    const int pairs = FN(pairs_apply)(a);
    double (*pair_block)(const struct binary_args *, int64_t, const uint16_t *, const uint16_t *, uint16_t *,
                         uint16_t *, uint16_t *, int *) =
        a->kind == KIND_BCE ? FN(bce_block_pairs) : a->kind == KIND_LOGITS ? FN(logits_block_pairs)
        : a->kind == KIND_SOFT_MARGIN ? FN(soft_margin_block_pairs) : FN(focal_block_pairs);
    int bad = 0;
    for (int64_t i = i0; i < i1; i++) {
        const int64_t e1 = (i + 1) * item < a->n ? (i + 1) * item : a->n;
        double total = 0;
        for (int64_t j0 = i * item; j0 < e1; j0 += BLOCK) {
            const int64_t n = e1 - j0 < BLOCK ? e1 - j0 : BLOCK;
            if (pairs) {
                uint16_t *loss = a->row_len == 0 && a->out.ptr ? (uint16_t *)a->out.ptr + j0 : NULL;
                uint16_t *gx = a->gx.ptr ? (uint16_t *)a->gx.ptr + j0 : NULL;
                uint16_t *gy = a->gy.ptr ? (uint16_t *)a->gy.ptr + j0 : NULL;
                total += pair_block(a, n, (const uint16_t *)a->x.ptr + j0, (const uint16_t *)a->y.ptr + j0, loss, gx,
                                    gy, &bad);
                continue;
            }
            const T *x = FN(input_block)(xb, &a->x, j0, n), *y = FN(input_block)(yb, &a->y, j0, n);
            const T *w = a->w.ptr ? FN(periodic)(wb, &a->w, j0, n) : NULL;
            const T *p = a->p.ptr ? FN(periodic)(pb, &a->p, j0, n) : NULL;
            /* per-element losses (only when out takes them) go straight to out when it holds T, else to lb */
            T *loss = a->row_len == 0 ? FN(output_block)(lb, &a->out, j0) : NULL;
            T *gx = FN(output_block)(gxb, &a->gx, j0), *gy = FN(output_block)(gyb, &a->gy, j0);
            double (*block)(const struct binary_args *, int64_t, const T *, const T *, const T *, const T *, T *,
                            T *, T *, int *) =
                a->kind == KIND_BCE ? FN(bce_block) : a->kind == KIND_LOGITS ? FN(logits_block)
                : a->kind == KIND_SOFT_MARGIN ? FN(soft_margin_block) : FN(focal_block);
            total += block(a, n, x, y, w, p, loss, gx, gy, &bad);
            if (a->row_len == 0) FN(output_done)(lb, &a->out, j0, n);
            FN(output_done)(gxb, &a->gx, j0, n);
            FN(output_done)(gyb, &a->gy, j0, n);
        }
        if (a->row_len > 0) ((T *)a->out.ptr)[i] = (T)total;
        else if (a->sums) a->sums[i] = total;
    }
    return bad ? ERR_DOMAIN : 0;
}
