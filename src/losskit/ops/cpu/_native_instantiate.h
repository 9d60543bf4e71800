/* Instantiates a row template once per accumulation type: float (float32, bfloat16 and float16
 * inputs) and double (float64 inputs). Use:  #define TEMPLATE "_native_rows.h"  then include this file.
 * The template sees T, VT, VI, W, VEXP, VEXP_DIFF, VEXP_BF16, EXP_SCALAR, LOG_SCALAR, EXPM1_SCALAR, POW_SCALAR, DTYPE_OF_T, FN.
 */
#define T float
#define VT v8f
#define VI v8i
#define W 8
#define VEXP exp_v8f
#define VEXP_DIFF exp_v8f_diff
#define VEXP_BF16 exp_v8f_bf16
#define EXP_SCALAR expf
#define LOG_SCALAR logf
#define EXPM1_SCALAR expm1f
#define POW_SCALAR powf
#define DTYPE_OF_T DT_F32
#define FN(name) name##_f32
#include TEMPLATE
#undef T
#undef VT
#undef VI
#undef W
#undef VEXP
#undef VEXP_DIFF
#undef VEXP_BF16
#undef EXP_SCALAR
#undef LOG_SCALAR
#undef EXPM1_SCALAR
#undef POW_SCALAR
#undef DTYPE_OF_T
#undef FN

#define T double
#define VT v4d
#define VI v4l
#define W 4
#define VEXP exp_v4d
#define VEXP_DIFF exp_v4d_diff
#define VEXP_BF16 exp_v4d /* bfloat16 rows are float rows: unused */
#define EXP_SCALAR exp
#define LOG_SCALAR log
#define EXPM1_SCALAR expm1
#define POW_SCALAR pow
#define DTYPE_OF_T DT_F64
#define FN(name) name##_f64
#include TEMPLATE
#undef T
#undef VT
#undef VI
#undef W
#undef VEXP
#undef VEXP_DIFF
#undef VEXP_BF16
#undef EXP_SCALAR
#undef LOG_SCALAR
#undef EXPM1_SCALAR
#undef POW_SCALAR
#undef DTYPE_OF_T
#undef FN
#undef TEMPLATE
