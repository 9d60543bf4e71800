/* Shared by losskit's C extensions (_native.c and the other _native_*.c files): the vector exp, the
 * storage dtypes, and the thread runner. Everything is static: each extension module includes its copy.
 *
 * exp: Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, then a polynomial for e^r (degree 6 fitted for
 * minimax relative error for float, the degree-13 Taylor series for double), scaled by 2^k by adding k
 * to the exponent field. Domain x <= 0 (every argument here is a logit minus the row max or the
 * log-sum-exp); results below 1.5x the smallest normal number are flushed to 0. Error, measured over
 * dense sweeps of the domain against extended-precision exp: at most 1.013 ulp (float32) and 0.99 ulp
 * (float64); torch's own exp is within 0.57 / 0.52 ulp. tests/ops/cpu/test_native.py::
 * test_exp_accuracy_in_ulp asserts < 1.5 ulp. exp_v8f_bf16, for results rounded to bfloat16, is shorter.
 *
 * Function multiversioning: on x86-64 the hot functions are compiled twice, for x86-64-v3 (AVX2, FMA,
 * F16C) and for the baseline (HOT), some three times with x86-64-v4 (HOT_AVX512), and the loader picks
 * one at start-up, so one binary runs on any x86-64.
 */
#ifndef LOSSKIT_NATIVE_COMMON_H
#define LOSSKIT_NATIVE_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* LOSSKIT_BASELINE_ONLY: build the baseline code alone (no x86-64-v3 or -v4 clone), to test on an AVX2
 * machine what a machine without AVX2 runs: CFLAGS=-DLOSSKIT_BASELINE_ONLY pip install --no-build-isolation .
 * HOT_AVX512: a third clone for x86-64-v4 (AVX-512F/BW/DQ/VL), only where it measured faster: the binary
 * losses, bound by their log, log1p and division (AMD Zen 4, 1024x8192 float32 from memory on 2 threads:
 * BCE 7%, BCE with logits 6%, sigmoid focal 4-6% faster; the row kernels, bound by memory, are not).
 * LOSSKIT_NO_AVX512 leaves it out, so that an AVX-512 machine can test the x86-64-v3 clone that AVX2
 * machines run (.ci/sanitize builds so). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(LOSSKIT_BASELINE_ONLY)
#define HOT __attribute__((target_clones("arch=x86-64-v3", "default"), unused))
#ifndef LOSSKIT_NO_AVX512
#define HOT_AVX512 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), unused))
#else
#define HOT_AVX512 HOT
#endif
#else
#define HOT __attribute__((unused))
#define HOT_AVX512 HOT
#endif
#define INLINE static inline __attribute__((always_inline))

enum { DT_F32 = 0, DT_F64 = 1, DT_BF16 = 2, DT_F16 = 3 };
enum { ERR_NOMEM = 1, ERR_TARGET = 2 };

INLINE int64_t dtype_size(int dtype) { return dtype == DT_F64 ? 8 : dtype == DT_F32 ? 4 : 2; }

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));
typedef uint64_t v4u64 __attribute__((vector_size(32)));

/* ---- exp ---------------------------------------------------------------------------------------- */

/* exp of 8 floats, times 2^-K (K an integer folded into the rounding constant, magic = 1.5 2^23 - K; lo:
 * -86.98 + K ln2), with corr added to the reduced argument when diff is set (see exp_v8f_diff). Results
 * below 2^-K e^-86.98 are flushed to 0: e^-86.98 = 1.7e-38, within 1.5x of the smallest normal number, and
 * it keeps k - K >= -125 so that adding k - K to p's exponent field below stays normal. Lanes below lo
 * (-inf included) are masked to 0 at the end, whatever the steps between make of them; NaN compares false
 * and passes through as NaN. */
INLINE v8f exp_v8f_impl(v8f x, float magic, float lo, v8f corr, const int diff)
{
    const v8i under = x < lo;
    /* adding magic rounds x log2 e to an integer k and leaves k - K + 2^22 in t's low bits */
    const v8f t = x * 1.44269504088896341f + magic;
    const v8f k = t - magic;
    v8f r = x - k * 0.693359375f; /* ln2 split in a high part exact in k * hi, and a low part */
    r = r - k * -2.12194440e-4f;
    if (diff) r += corr; /* |corr| <= half an ulp of |x| <= 2^-18 here: r stays within the fit's range */
    /* e^r = 1 + r + r^2 q(r), q of degree 4 fitted for minimax relative error on |r| <= ln2/2 (3.1e-9,
     * a twentieth of float's epsilon) */
    const v8f r2 = r * r; /* Estrin's scheme: a shorter dependency chain than Horner's */
    const v8f q = (4.9999994040e-1f + 1.6666521132e-1f * r) +
                  r2 * ((4.1668388993e-2f + 8.3687100559e-3f * r) + 1.3814612757e-3f * r2);
    const v8f p = q * r2 + r + 1.0f;
    /* 2^(k - K) p: (k - K + 2^22) << 23 == (k - K) << 23 (mod 2^32), in unsigned arithmetic (wrapping by
     * definition, as a signed shift and add are not) */
    return (v8f)(~under & (v8i)((v8u32)p + ((v8u32)t << 23)));
}

#define EXP_MAGIC 12582912.0f /* 1.5 * 2^23 */
#define EXP_LO -86.98f

INLINE v8f exp_v8f(v8f x) { return exp_v8f_impl(x, EXP_MAGIC, EXP_LO, x, 0); }

/* 2^-K e^x of 8 floats, x < (K + 1) ln2, for an integer K with |K| < 2^11: exact scaling, the cost of
 * exp_v8f. Cody-Waite stays exact for |x| < 2^11 ln2 (k hi exact, x - k hi exact), and the low part's
 * error k 2^-37 stays below 0.1 eps: the row exps of _native_rowops.h (exp_step) for rows whose max has
 * |m| < 1024. */
INLINE v8f exp_v8f_scaled(v8f x, int K)
{
    return exp_v8f_impl(x, EXP_MAGIC - (float)K, EXP_LO + (float)K * 0.69314718056f, x, 0);
}

/* exp(x - m) of 8 floats, m >= x the row's max (or +-inf, NaN: then as exp_v8f(x - m)). Rounding d = x - m
 * to float loses up to half an ulp of |d|, which the exp turns into a relative error of up to |d| 2^-24:
 * 8 eps at d = -16, where a row of 32768 logits randn * 2 has its smallest entries. TwoSum (Knuth: six
 * additions, exact for any two floats without overflow) recovers that rounding error, and it goes into
 * the reduced argument, so the result is the exp of the exact difference (error ~1 ulp at any |d|). Five
 * operations a vector more than exp_v8f: rows whose max is huge or not finite, and the entropy, whose
 * terms e (x - m) need the exact difference anyway. Infinite or NaN lanes: the error is NaN, and the
 * lane's result is that of exp_v8f(d) (0 below lo, NaN for NaN). */
INLINE v8f exp_v8f_diff(v8f x, v8f m)
{
    const v8f d = x - m, mb = d - x, xb = d - mb;
    const v8f err = (x - xb) - (m + mb); /* (x - xb) + (-m - mb), exactly (x - m) - d */
    return exp_v8f_impl(d, EXP_MAGIC, EXP_LO, err, 1);
}

/* exp of 8 floats whose results are rounded to bfloat16 (a step of 2^-8) before anyone sees them: e^x =
 * 2^k 2^f with k = round(x log2 e) and f = x log2 e - k (one FMA: log2 e's float rounding puts up to
 * 1.7e-6 into f at k = -125), 2^f by a degree-4 polynomial fitted for minimax relative error on
 * |f| <= 1/2 (2.9e-6); total relative error 4.0e-6 = 2^-18 (6.6e-6 in the baseline clone, which has no
 * FMA; tested < 2^-17). Eleven vector operations against exp_v8f's thirteen: the exp pass of a bfloat16
 * row, 1 thread in L2, 0.35 -> 0.30 ns an element (an ad-hoc microbenchmark). Flushing, -inf and NaN as
 * exp_v8f. */
INLINE v8f exp_v8f_bf16(v8f x)
{
    const v8f lo = (v8f){0} + EXP_LO;
    const v8i under = x < lo;
    const float magic = 12582912.0f;
    const v8f t = x * 1.44269504088896341f + magic;
    const v8f k = t - magic;
    const v8f f = x * 1.44269504088896341f - k;
    v8f p = 9.5852771774e-3f * f + 5.5906694382e-2f; /* Horner: each step one FMA */
    p = p * f + 2.4024040997e-1f;
    p = p * f + 6.9312417507e-1f;
    p = p * f + 1.0f;
    return (v8f)(~under & (v8i)((v8u32)p + ((v8u32)t << 23)));
}

INLINE v4d exp_v4d(v4d x)
{
    /* flushed to 0 below e^-708 = 3.3e-308 (1.5x the smallest normal number): k >= -1021 */
    const v4d lo = (v4d){0} - 708.0;
    const v4l under = x < lo;
    const double magic = 6755399441055744.0; /* 1.5 * 2^52 */
    const v4d t = x * 1.4426950408889634074 + magic;
    const v4d k = t - magic;
    v4d r = x - k * 6.93147180369123816490e-01; /* fdlibm's ln2 hi/lo split */
    r = r - k * 1.90821492927058770002e-10;
    /* e^r = sum_{i<=13} r^i / i!; the first omitted term is below 2^-60 for |r| <= ln2/2. */
    v4d p = (v4d){0} + 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * (r * r) + r + 1.0;
    /* 2^k p: t's low bits hold k + 2^51, and (k + 2^51) << 52 == k << 52 (mod 2^64), unsigned */
    return (v4d)(~under & (v4l)((v4u64)p + ((v4u64)t << 52)));
}

/* exp(x - m) in double: x - m rounds to 2^-53 relative, which the float64 results' tolerance absorbs. */
INLINE v4d exp_v4d_diff(v4d x, v4d m) { return exp_v4d(x - m); }

/* ---- storage dtypes -------------------------------------------------------------------------------- */

INLINE float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE uint16_t f32_to_bf16(float f) /* round to nearest even, NaN stays NaN (as torch); branch-free */
{
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t rounded = (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16), quiet = (uint16_t)((u >> 16) | 0x40);
    return f != f ? quiet : rounded;
}

/* One strided (N, C, L) operand: element (n, c, l) is at ptr + n*sn + c*sc + l*sl (in elements). */
struct view {
    void *ptr;
    int dtype;
    int64_t sn, sl, sc;
};

INLINE int64_t row_offset(const struct view *v, int64_t r, int64_t L) { return (r / L) * v->sn + (r % L) * v->sl; }

/* Contiguous conversions from and to float, eight lanes at a time (the row loaders below use them for
 * contiguous rows): bf16 -> float is a shift; float -> bf16 rounds to nearest even and keeps NaN a
 * (quiet) NaN, as f32_to_bf16; float -> float16 uses F16C where the clone has it (float16 -> float is
 * left to the compiler's loop, which measured faster than the vector conversion: 0.31 vs 0.51 ns). */
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef _Float16 v8h __attribute__((vector_size(16)));

/* 8 bfloat16 -> float (a shift), and float -> bfloat16 rounded to nearest even, NaN kept a quiet NaN. */
INLINE v8f bf16_widen8(const uint16_t *src)
{
    v8u16 h;
    memcpy(&h, src, sizeof h);
    return (v8f)(__builtin_convertvector(h, v8u32) << 16);
}

/* float -> bfloat16 in the low half of each 32-bit word (the high half 0); with no_nan the caller knows
 * f holds no NaN, and the NaN lanes' fix-up is left out. */
INLINE v8u32 bf16_round8_words(v8f f, const int no_nan)
{
    const v8u32 u = (v8u32)f, rounded = (u + 0x7fff + ((u >> 16) & 1)) >> 16;
    if (no_nan) return rounded;
    const v8i nan = f != f;
    return (v8u32)((nan & (v8i)((u >> 16) | 0x40)) | (~nan & (v8i)rounded));
}

INLINE v8u16 bf16_round8(v8f f) { return __builtin_convertvector(bf16_round8_words(f, 0), v8u16); }

HOT static void bf16_to_f32_n(float *dst, const uint16_t *src, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const v8f f = bf16_widen8(src + i);
        memcpy(dst + i, &f, sizeof f);
    }
    for (; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

/* float -> a 16-bit storage dtype: DT_BF16 rounded to nearest even (NaN kept a quiet NaN), DT_F16 with
 * F16C where the clone has it. */
HOT static void f32_to_16bit_n(void *dst, int dtype, const float *src, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f f;
        memcpy(&f, src + i, sizeof f);
        if (dtype == DT_BF16) {
            const v8u16 h = bf16_round8(f);
            memcpy((uint16_t *)dst + i, &h, sizeof h);
        } else {
            const v8h h = __builtin_convertvector(f, v8h);
            memcpy((_Float16 *)dst + i, &h, sizeof h);
        }
    }
    for (; i < n; i++) {
        if (dtype == DT_BF16) ((uint16_t *)dst)[i] = f32_to_bf16(src[i]);
        else ((_Float16 *)dst)[i] = (_Float16)src[i];
    }
}

/* Element c of a row at offset o with class stride s; the s == 1 copy of each loop is the one that
 * vectorises (contiguous rows), the other serves strided rows. */
#define ROW_LOOP(C, s, BODY)                                                                            \
    do {                                                                                                \
        if ((s) == 1) { for (int64_t c = 0, i = o; c < (C); c++, i++) BODY; }                           \
        else { for (int64_t c = 0, i = o; c < (C); c++, i += (s)) BODY; }                               \
    } while (0)

#define DEFINE_ROW_IO(T, SUF)                                                                           \
    HOT static void load_row_##SUF(T *dst, const struct view *v, int64_t r, int64_t L, int64_t C)       \
    {                                                                                                   \
        const int64_t o = row_offset(v, r, L), s = v->sc;                                               \
        switch (v->dtype) {                                                                             \
        case DT_F32: { const float *p = v->ptr; ROW_LOOP(C, s, dst[c] = (T)p[i]); break; }              \
        case DT_F64: { const double *p = v->ptr; ROW_LOOP(C, s, dst[c] = (T)p[i]); break; }             \
        case DT_BF16: {                                                                                 \
            const uint16_t *p = v->ptr;                                                                 \
            if (sizeof(T) == 4 && s == 1) bf16_to_f32_n((float *)dst, p + o, C);                        \
            else ROW_LOOP(C, s, dst[c] = (T)bf16_to_f32(p[i]));                                         \
            break;                                                                                      \
        }                                                                                               \
        default: { const _Float16 *p = v->ptr; ROW_LOOP(C, s, dst[c] = (T)p[i]); break; }               \
        }                                                                                               \
    }                                                                                                   \
    HOT static void store_row_##SUF(const struct view *v, int64_t r, int64_t L, int64_t C, const T *src) \
    {                                                                                                   \
        const int64_t o = row_offset(v, r, L), s = v->sc;                                               \
        switch (v->dtype) {                                                                             \
        case DT_F32: { float *p = v->ptr; ROW_LOOP(C, s, p[i] = (float)src[c]); break; }                \
        case DT_F64: { double *p = v->ptr; ROW_LOOP(C, s, p[i] = (double)src[c]); break; }              \
        case DT_BF16: {                                                                                 \
            uint16_t *p = v->ptr;                                                                       \
            if (sizeof(T) == 4 && s == 1) f32_to_16bit_n(p + o, DT_BF16, (const float *)src, C);        \
            else ROW_LOOP(C, s, p[i] = f32_to_bf16((float)src[c]));                                     \
            break;                                                                                      \
        }                                                                                               \
        default: {                                                                                      \
            _Float16 *p = v->ptr;                                                                       \
            if (sizeof(T) == 4 && s == 1) f32_to_16bit_n(p + o, DT_F16, (const float *)src, C);         \
            else ROW_LOOP(C, s, p[i] = (_Float16)src[c]);                                               \
            break;                                                                                      \
        }                                                                                               \
        }                                                                                               \
    }

DEFINE_ROW_IO(float, f32)
DEFINE_ROW_IO(double, f64)

/* A view from Python: the tuple (data_ptr, dtype_code, stride_n, stride_l, stride_c). */
static int parse_view(PyObject *tuple, struct view *v)
{
    unsigned long long ptr;
    long long sn, sl, sc;
    if (!PyArg_ParseTuple(tuple, "KiLLL", &ptr, &v->dtype, &sn, &sl, &sc)) return 0;
    v->ptr = (void *)(uintptr_t)ptr;
    v->sn = sn;
    v->sl = sl;
    v->sc = sc;
    return 1;
}

/* ---- threads ---------------------------------------------------------------------------------------- */

/* fn(ctx, i0, i1) does items [i0, i1) and returns 0 or an ERR_ code. It may be called several times
 * per thread, on any ranges: its results must depend on the items only, never on the split. */
typedef int (*range_fn)(void *ctx, int64_t i0, int64_t i1);

/* Shared by the threads of one parallel_for: items are taken in chunks from the counter `next`. */
struct work {
    range_fn fn;
    void *ctx;
    int64_t n, chunk;
    _Atomic int64_t next;
    _Atomic int err;
};

static void *run_work(void *p)
{
    struct work *w = p;
    for (;;) {
        const int64_t i0 = atomic_fetch_add(&w->next, w->chunk);
        if (i0 >= w->n || atomic_load(&w->err)) break;
        const int err = w->fn(w->ctx, i0, i0 + w->chunk < w->n ? i0 + w->chunk : w->n);
        if (err) {
            int none = 0;
            atomic_compare_exchange_strong(&w->err, &none, err);
            break;
        }
    }
    return NULL;
}

/* The OpenMP runtime torch's ops run on, when Python found it loaded (set_openmp, losskit/ops/cpu/
 * native.py): GOMP_parallel(fn, data, n, 0) runs fn(data) on a team of n threads, the caller one of them
 * (the entry point GCC emits for `#pragma omp parallel`; LLVM's and Intel's runtimes export it too).
 * parallel_for then runs on torch's own worker threads instead of starting threads of its own. After a
 * parallel torch op those workers spin for a while waiting for more work (libgomp's default), and
 * threads of our own then share cores with them: focal_loss 1024x8192 bfloat16 took 5-6 ms in the bench
 * (after torch ops) against 3.9-4.0 ms with OMP_WAIT_POLICY=PASSIVE, before this. */
typedef void (*gomp_parallel_fn)(void (*fn)(void *), void *data, unsigned nthreads, unsigned flags);
static gomp_parallel_fn gomp_parallel;

static void run_work_team(void *p) { (void)run_work(p); }

static PyObject *py_set_openmp(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long address;
    if (!PyArg_ParseTuple(args, "K", &address)) return NULL;
    gomp_parallel = (gomp_parallel_fn)(uintptr_t)address;
    Py_RETURN_NONE;
}

#define SET_OPENMP_METHOD                                                                               \
    {"set_openmp", py_set_openmp, METH_VARARGS,                                                         \
     "set_openmp(address): run threads as a team of the OpenMP runtime whose GOMP_parallel is at "       \
     "address (0: threads of our own)."}

/* Items [0, n) over up to 64 threads, the calling thread one of them, in about CHUNKS_PER_THREAD
 * chunks per thread taken in turn from a shared counter: when another process holds a core, the
 * threads that run take over the chunks of the one that waits, instead of all waiting for its fixed
 * share. A thread that cannot be started leaves its chunks to the others. Returns the first error
 * (no chunk starts after it). */
static int parallel_for(range_fn fn, void *ctx, int64_t n, int nthreads)
{
    enum { MAX_THREADS = 64, CHUNKS_PER_THREAD = 16 };
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > n) nthreads = n > 0 ? (int)n : 1;
    const int64_t chunks = nthreads == 1 ? 1 : (int64_t)nthreads * CHUNKS_PER_THREAD;
    struct work w = {fn, ctx, n, (n + chunks - 1) / chunks, 0, 0};
    if (nthreads > 1 && gomp_parallel) {
        gomp_parallel(run_work_team, &w, (unsigned)nthreads, 0);
        return atomic_load(&w.err);
    }
    for (int i = 1; i < nthreads; i++) started[i] = pthread_create(&tids[i], NULL, run_work, &w) == 0;
    run_work(&w);
    for (int i = 1; i < nthreads; i++)
        if (started[i]) pthread_join(tids[i], NULL);
    return atomic_load(&w.err);
}

#endif
