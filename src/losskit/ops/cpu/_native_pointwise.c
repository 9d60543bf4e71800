/* losskit.ops.cpu._native_pointwise: compiled CPU kernels of the pointwise losses (mse_loss and
 * rmse_loss, kl_div with probability or log-probability targets).
 *
 * One call computes, over n contiguous elements, the loss (written per element for reduction="none",
 * and summed), the input gradient and the target gradient, scaled by the reduction's factor: each
 * element of each operand read once, each output written once, blocks of elements shared out over
 * threads by parallel_for. The maths and the storage handling are in _native_pointwise.h; the vector
 * exp, dtypes and the thread runner in _native_common.h, the vector log in _native_log.h. No Python or
 * torch object crosses the boundary but integers (data pointers, dtype codes, sizes) and floats; the
 * Python side (losskit/ops/cpu/native_pointwise.py) validates every operand, and this binding checks
 * the sizes, kinds and dtype codes again.
 */

/* The shared headers define row helpers (views, row loaders, row passes) this module does not use. */
#pragma GCC diagnostic ignored "-Wunused-function"
#include "_native_common.h"
#include "_native_log.h"

/* Integer dtypes, read by the mixed-dtype path (mse_loss takes an integer target). */
enum { DT_I64 = 4, DT_I32 = 5, DT_I16 = 6, DT_I8 = 7, DT_U8 = 8, DT_COUNT = 9 };
enum { K_MSE = 0, K_KL_PROB = 1, K_KL_LOG = 2 };

/* Elements per block: one loss partial sum each (8 float lanes of 128 terms before the double sum),
 * and the mixed path's six scratch arrays, 6 x 1024 x 8 bytes = 48 KiB of stack in double. */
enum { BLOCK = 1024 };

/* 8 float16 at any 2-byte-aligned address (v8h of _native_common.h is 16-byte aligned) */
typedef _Float16 v8h_u __attribute__((vector_size(16), aligned(2), may_alias));

struct operand {
    void *ptr; /* NULL: absent */
    int dtype;
};

struct pw_args {
    int kind;
    struct operand x, y, w, l, gx, gy; /* inputs x, y (target), w (weight); outputs l (loss), gradients */
    int64_t n;
    double scale;
    int uniform; /* the dtype of every operand present, or -1 when they differ */
    double *sums; /* (ceil(n / BLOCK),) loss sum of each block: the total is independent of the split */
};

/* A gradient times grad_output (scale_range in _native_pointwise.h): g (A, C, B) *= s (A, B), both
 * contiguous and stored as dt; items of SCALE_CHUNK elements (64 KiB of float) shared over threads. */
struct scale_args {
    void *g;
    const void *s;
    int dt;
    int64_t A, C, B, n;
};
enum { SCALE_CHUNK = 16384 };

/* kl_div's functions of a bfloat16 target y, on each of its 65536 bit patterns, as the float path computes
 * them (build_tables in _native_pointwise.h): log y and exp y, 256 KiB each, built on the first kl_div
 * call with a bfloat16 target. */
enum { TAB_LOG, TAB_EXP, N_TABLES };
static float bf16_tables[N_TABLES][65536];

#define TEMPLATE "_native_pointwise.h"
#include "_native_instantiate.h"

static pthread_once_t tables_once = PTHREAD_ONCE_INIT;
static void build_tables(void) { build_tables_f32(); }

static int f32_range(void *ctx, int64_t b0, int64_t b1) { return pointwise_blocks_f32(ctx, b0, b1); }
static int scale_f32_range(void *ctx, int64_t k0, int64_t k1) { return scale_range_f32(ctx, k0, k1); }
static int scale_f64_range(void *ctx, int64_t k0, int64_t k1) { return scale_range_f64(ctx, k0, k1); }
static int f64_range(void *ctx, int64_t b0, int64_t b1) { return pointwise_blocks_f64(ctx, b0, b1); }

/* ---- Python binding --------------------------------------------------------------------------------- */

static int parse_operand(PyObject *tuple, struct operand *o, int floating)
{
    unsigned long long ptr;
    if (!PyArg_ParseTuple(tuple, "Ki", &ptr, &o->dtype)) return 0;
    o->ptr = (void *)(uintptr_t)ptr;
    if (o->ptr && (o->dtype < 0 || o->dtype >= (floating ? DT_I64 : DT_COUNT))) {
        PyErr_Format(PyExc_ValueError, "losskit._native_pointwise: invalid dtype code %d", o->dtype);
        return 0;
    }
    return 1;
}

static const char pointwise_doc[] =
    "pointwise(kind, double, n, x, y, w, loss, gx, gy, scale, nthreads) -> float\n\n"
    "The loss sum over n contiguous elements of kind 0 (mse), 1 (kl_div) or 2 (kl_div, log target), in\n"
    "double accumulation if double, else float; writes the outputs given. x, y, w, loss, gx, gy:\n"
    "(data_ptr, dtype_code), data_ptr 0 for an absent one. See losskit/ops/cpu/native_pointwise.py.";

static PyObject *py_pointwise(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *ops[6];
    long long n;
    int dbl, nthreads;
    struct pw_args a = {0};
    if (!PyArg_ParseTuple(args, "ipLO!O!O!O!O!O!di", &a.kind, &dbl, &n, &PyTuple_Type, &ops[0], &PyTuple_Type,
                          &ops[1], &PyTuple_Type, &ops[2], &PyTuple_Type, &ops[3], &PyTuple_Type, &ops[4],
                          &PyTuple_Type, &ops[5], &a.scale, &nthreads))
        return NULL;
    struct operand *all[6] = {&a.x, &a.y, &a.w, &a.l, &a.gx, &a.gy};
    for (int k = 0; k < 6; k++)
        if (!parse_operand(ops[k], all[k], k != 1 || a.kind != K_MSE)) return NULL;
    if (a.kind < K_MSE || a.kind > K_KL_LOG || n < 0 || !a.x.ptr || !a.y.ptr || (a.w.ptr && a.kind != K_MSE)) {
        PyErr_SetString(PyExc_ValueError, "losskit._native_pointwise: invalid kind, size or operands");
        return NULL;
    }
    a.n = n;
    a.uniform = a.x.dtype;
    for (int k = 1; k < 6; k++)
        if (all[k]->ptr && all[k]->dtype != a.x.dtype) a.uniform = -1;
    /* the uniform path needs operands stored in the accumulation type's family; its bfloat16 stores round
     * without a NaN fix-up, which needs a scale that is not NaN (see store_pairs in _native_pointwise.h) */
    if ((a.uniform == DT_F64) != (dbl != 0) || (a.uniform == DT_BF16 && a.scale != a.scale)) a.uniform = -1;
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    if (!blocks) return PyFloat_FromDouble(0.0);
    if (!(a.sums = malloc((size_t)blocks * sizeof(double)))) return PyErr_NoMemory();
    double total = 0;
    Py_BEGIN_ALLOW_THREADS
    if (a.kind != K_MSE && a.y.dtype == DT_BF16 && a.uniform == DT_BF16) pthread_once(&tables_once, build_tables);
    parallel_for(dbl ? f64_range : f32_range, &a, blocks, nthreads);
    for (int64_t b = 0; b < blocks; b++) total += a.sums[b];
    Py_END_ALLOW_THREADS
    free(a.sums);
    return PyFloat_FromDouble(total);
}

static const char scale_doc[] =
    "scale(g_ptr, s_ptr, dtype_code, A, C, B, nthreads)\n\n"
    "g[a, c, b] *= s[a, b] in place: g (A, C, B) and s (A, B) contiguous, both of the floating dtype code.\n"
    "See losskit/ops/cpu/native_pointwise.py (scale_), which validates the operands.";

static PyObject *py_scale(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long g, s;
    long long A, C, B;
    int nthreads;
    struct scale_args a = {0};
    if (!PyArg_ParseTuple(args, "KKiLLLi", &g, &s, &a.dt, &A, &C, &B, &nthreads)) return NULL;
    if (a.dt < DT_F32 || a.dt > DT_F16 || A < 0 || C < 0 || B < 0 || (A && C && B && (!g || !s)) ||
        (C && B && A > INT64_MAX / C / B)) {
        PyErr_SetString(PyExc_ValueError, "losskit._native_pointwise.scale: invalid dtype, sizes or pointers");
        return NULL;
    }
    a.g = (void *)(uintptr_t)g;
    a.s = (const void *)(uintptr_t)s;
    a.A = A;
    a.C = C;
    a.B = B;
    a.n = A * C * B;
    const int64_t items = (a.n + SCALE_CHUNK - 1) / SCALE_CHUNK;
    Py_BEGIN_ALLOW_THREADS
    parallel_for(a.dt == DT_F64 ? scale_f64_range : scale_f32_range, &a, items, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pointwise", py_pointwise, METH_VARARGS, pointwise_doc},
    SET_OPENMP_METHOD,
    {"scale", py_scale, METH_VARARGS, scale_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_native_pointwise",
    .m_doc = "losskit's compiled CPU kernels of the pointwise losses (mse, kl_div).", .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native_pointwise(void) { return PyModule_Create(&module); }
