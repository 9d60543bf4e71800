/* The vector log and log1p of losskit's C kernels: log_v8f / log1p_v8f (8 floats), log_v4d / log1p_v4d
 * (4 doubles), in GCC vector extensions beside exp_v8f / exp_v4d of _native_common.h (include that first).
 * VLOG(v) and VLOG1P(v) pick the function from the vector's type, for templates instantiated per type.
 *
 * log: x = 2^e m with the mantissa m in [sqrt(1/2), sqrt(2)) taken from the exponent and fraction bits
 * (subnormal x scaled by 2^23 / 2^54 first), f = m - 1, then
 *   float:  Cephes' logf, log(1 + f) = f - f^2/2 + f^3 P(f) with a degree-8 minimax P, no division;
 *   double: fdlibm's log, s = f / (2 + f), log(1 + f) = f - (f^2/2 - s (f^2/2 + R(s^2))) with a degree-7
 *           minimax R in s^2 (one division per vector);
 * plus e ln2 in a high part exact in e * hi and a low part. Special values as C's log: 0 -> -inf,
 * negative -> NaN, +inf -> +inf, NaN -> NaN; subnormals are exact inputs (not flushed).
 *
 * log1p(u) = log(w) + (u - (w - 1)) / w with w = 1 + u rounded: the second term is the rounding error
 * of w, first order in it. -1 -> -inf, below -1 -> NaN, +inf -> +inf, NaN -> NaN.
 *
 * Error, measured over dense sweeps of every binade against long-double log/log1p (subnormals included,
 * log1p over (-1, 1e6)): log at most 0.82 ulp (float32) and 0.74 ulp (float64); log1p at most 1.44 ulp
 * (float32 and float64), its worst case at tiny negative u where w = 1 + u rounds. glibc's logf/log are
 * within about 0.5 ulp. tests/ops/cpu/test_native_log.py asserts < 1 ulp (log) and < 2 ulp (log1p).
 */
#ifndef LOSSKIT_NATIVE_LOG_H
#define LOSSKIT_NATIVE_LOG_H

#include "_native_common.h"

INLINE v8f log_special_v8f(v8f x, v8f r) /* r where 0 < x < inf, else log's special value */
{
    const v8i ok = (x > 0) & (x < INFINITY), zero = x == 0, neg = x < 0;
    const v8f special = (v8f)((zero & (v8i)((v8f){0} - INFINITY)) | (neg & (v8i)((v8f){0} + NAN)) |
                              (~zero & ~neg & (v8i)x)); /* +inf and NaN are their own log */
    return (v8f)((ok & (v8i)r) | (~ok & (v8i)special));
}

INLINE v8f log_v8f(v8f x)
{
    const v8i sub = x < 1.17549435e-38f; /* subnormal (and 0 or negative, fixed at the end): scale by 2^23 */
    const v8i bits = (v8i)((sub & (v8i)(x * 8388608.0f)) | (~sub & (v8i)x));
    v8i e = ((bits >> 23) & 0xff) - 127 - (sub & 23);
    v8f m = (v8f)((bits & 0x007fffff) | 0x3f800000); /* [1, 2) */
    const v8i big = m > 1.41421356f;
    m = (v8f)((v8i)m - (big & 0x00800000)); /* m / 2 where m > sqrt(2): [sqrt(1/2), sqrt(2)) */
    e -= big;                                /* big lanes are -1: e + 1 */
    const v8f ef = __builtin_convertvector(e, v8f), f = m - 1.0f, z = f * f;
    v8f p = 7.0376836292e-2f * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    v8f y = p * f * z + ef * -2.12194440e-4f - 0.5f * z; /* ln2 = 0.693359375 - 2.12194440e-4 */
    const v8f r = (f + y) + ef * 0.693359375f;
    return log_special_v8f(x, r);
}

INLINE v4d log_special_v4d(v4d x, v4d r)
{
    const v4l ok = (x > 0) & (x < INFINITY), zero = x == 0, neg = x < 0;
    const v4d special = (v4d)((zero & (v4l)((v4d){0} - INFINITY)) | (neg & (v4l)((v4d){0} + NAN)) |
                              (~zero & ~neg & (v4l)x));
    return (v4d)((ok & (v4l)r) | (~ok & (v4l)special));
}

INLINE v4d log_v4d(v4d x)
{
    const v4l sub = x < 2.2250738585072014e-308; /* subnormal: scale by 2^54 */
    const v4l bits = (v4l)((sub & (v4l)(x * 18014398509481984.0)) | (~sub & (v4l)x));
    v4l e = ((bits >> 52) & 0x7ff) - 1023 - (sub & 54);
    v4d m = (v4d)((bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL);
    const v4l big = m > 1.4142135623730951;
    m = (v4d)((v4l)m - (big & 0x0010000000000000LL));
    e -= big;
    /* e to double without AVX-512: 1.5 * 2^52 + e has e in its low mantissa bits (|e| < 2^51) */
    const v4d ef = (v4d)(e + 0x4338000000000000LL) - 6755399441055744.0;
    const v4d f = m - 1.0, hfsq = 0.5 * f * f, s = f / (2.0 + f), z = s * s, w = z * z;
    const v4d t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
    const v4d t2 = z * (6.666666666666735130e-01 +
                        w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
    const v4d R = t1 + t2; /* ln2 = 6.93147180369123816490e-01 + 1.90821492927058770002e-10 (fdlibm) */
    const v4d r = ef * 6.93147180369123816490e-01 - ((hfsq - (s * (hfsq + R) + ef * 1.90821492927058770002e-10)) - f);
    return log_special_v4d(x, r);
}

INLINE v8f log1p_v8f(v8f u)
{
    const v8f w = 1.0f + u, c = u - (w - 1.0f);
    const v8i finite = (w > 0) & (w < INFINITY); /* elsewhere log(w) is the answer (and c / w undefined) */
    return log_v8f(w) + (v8f)(finite & (v8i)(c / w));
}

INLINE v4d log1p_v4d(v4d u)
{
    const v4d w = 1.0 + u, c = u - (w - 1.0);
    const v4l finite = (w > 0) & (w < INFINITY);
    return log_v4d(w) + (v4d)(finite & (v4l)(c / w));
}

/* log of floats that hold bfloat16 values: y = 2^e (1 + k/128), so log y = e ln2 + log(1 + k/128), the
 * second term from bf16_log_table (k > 53: e + 1 and half the mantissa, as log_v8f reduces), subnormal y
 * scaled by 2^23 first and the special values (0, negative, inf, NaN) those of C's log, as log_v8f. Error
 * at most 0.69 ulp over every positive bfloat16 (log_v8f's: 0.82); 8 table reads instead of a degree-8
 * polynomial. Only for bfloat16 values: a float's mantissa bits past the 7th are ignored. A module that
 * uses it calls init_bf16_log_table() when it loads. */
__attribute__((unused)) static float bf16_log_table[128]; /* 512 bytes, in L1 while a kernel runs */

__attribute__((unused)) static void init_bf16_log_table(void)
{
    for (int k = 0; k < 128; k++) bf16_log_table[k] = (float)log((1 + k / 128.0) / (k > 53 ? 2 : 1));
}

INLINE v8f log_bf16_v8f(v8f y)
{
    const v8i sub = y < 1.17549435e-38f; /* subnormal (0 and negative: fixed by log_special_v8f) */
    const v8i bits = (v8i)((sub & (v8i)(y * 8388608.0f)) | (~sub & (v8i)y)), k = (bits >> 16) & 0x7f;
    const v8i e = ((bits >> 23) & 0xff) - 127 - (sub & 23) - (k > 53);
    v8f t;
    for (int j = 0; j < 8; j++) t[j] = bf16_log_table[k[j]];
    const v8f ef = __builtin_convertvector(e, v8f);
    /* ln2 = 0.693359375 - 2.12194440e-4, the high part exact in ef * 0.693359375 */
    return log_special_v8f(y, (t + ef * -2.12194440e-4f) + ef * 0.693359375f);
}

#define VLOG(v) _Generic((v), v8f: log_v8f, v4d: log_v4d)(v)
#define VLOG1P(v) _Generic((v), v8f: log1p_v8f, v4d: log1p_v4d)(v)

#endif
