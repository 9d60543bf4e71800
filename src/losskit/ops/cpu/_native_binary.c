/* losskit.ops.cpu._native_binary: compiled CPU kernels of the binary (sigmoid / probability) losses:
 * binary_cross_entropy, binary_cross_entropy_with_logits, multilabel_soft_margin_loss, sigmoid_focal_loss.
 *
 * Plain C11 with GCC/Clang vector extensions and POSIX threads, as _native.c; the vector exp, dtypes and
 * thread runner come from _native_common.h, the vector log and log1p from _native_log.h, the formulas
 * from _native_binary.h. One call does n contiguous elements: it reads each input once and writes each
 * gradient (and the unreduced loss, if asked) once, split over threads by blocks. The Python side
 * (losskit/ops/cpu/native_binary.py) validates every operand before it hands over a pointer.
 */

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function" /* shared helpers this module does not use */
#include "_native_common.h"
#include "_native_log.h"
#pragma GCC diagnostic pop

enum { KIND_BCE = 0, KIND_LOGITS = 1, KIND_SOFT_MARGIN = 2, KIND_FOCAL = 3, N_KINDS = 4 };
enum { ERR_DOMAIN = 3 };  /* BCE: an input or target outside [0, 1] */
enum { BLOCK_BYTES = 4096 };
#define BCE_EPSILON 1e-12f /* ATen's EPSILON of the BCE backward: a float constant for every dtype */

/* A broadcast constant (weight, pos_weight), contiguous in the accumulation type: element j of the call
 * is ptr[((start + j) / div) % period] (a (C,) weight: div 1, period C; a per-row (N, 1) one: div C). */
struct periodic {
    const void *ptr;
    int64_t start, div, period;
};

struct binary_args {
    int kind, dbl;                 /* dbl: accumulate in double (float64 operands), else float */
    struct view x, y, gx, gy, out; /* contiguous n elements (out: n, or one per row); ptr NULL: absent */
    struct periodic w, p;
    int64_t n, row_len;            /* row_len > 0: out[r] = sum of row r's losses (accumulation type) */
    int64_t int_gamma;             /* gamma when it is a small integer, else -1 */
    double alpha, gamma, scale;
    double *sums;                  /* per-block loss sums, or NULL */
};

/* The bfloat16 tables (see "bfloat16 operands in pairs" in _native_binary.h): a function of x on each of
 * the 65536 bfloat16 bit patterns, as float, 256 KiB each; built on the first call with a bfloat16 input. */
enum { TAB_LOG1P_EXP, TAB_SIGMOID, TAB_SIGMOID_NEG, TAB_LOG, TAB_LOG1P_NEG, N_TABLES };
static float bf16_tables[N_TABLES][65536];

/* ---- the kernels, once per accumulation type ---------------------------------------------------------- */

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function" /* the row passes of _native_rowops.h */
#define TEMPLATE "_native_binary.h"
#include "_native_instantiate.h"
#pragma GCC diagnostic pop

static int binary_range(void *ctx, int64_t i0, int64_t i1)
{
    const struct binary_args *a = ctx;
    return a->dbl ? binary_range_f64(a, i0, i1) : binary_range_f32(a, i0, i1);
}

/* The tables of the pair path, built once (pthread_once: a call from another thread waits for them). */
static pthread_once_t bce_tables_once = PTHREAD_ONCE_INIT, sigmoid_tables_once = PTHREAD_ONCE_INIT;
static void build_bce_tables(void) { build_tables_f32(1); }
static void build_sigmoid_tables(void) { build_tables_f32(0); }

/* log or log1p of a contiguous array, in place (the kernels' vector functions, exposed for the tests). */
#define DEFINE_LOG_ARRAY(T, VT, W, SUF)                                                                  \
    HOT static void log_array_##SUF(T *p, int64_t n, int plus1)                                         \
    {                                                                                                   \
        for (int64_t i = 0; i < n; i += W) {                                                            \
            const size_t bytes = (size_t)(n - i < W ? n - i : W) * sizeof(T);                           \
            VT v = {0};                                                                                 \
            if (bytes == sizeof v) memcpy(&v, p + i, sizeof v); /* a vector load */                     \
            else memcpy(&v, p + i, bytes);                                                              \
            v = plus1 ? VLOG1P(v) : VLOG(v);                                                            \
            if (bytes == sizeof v) memcpy(p + i, &v, sizeof v);                                         \
            else memcpy(p + i, &v, bytes);                                                              \
        }                                                                                               \
    }
DEFINE_LOG_ARRAY(float, v8f, 8, f32)
DEFINE_LOG_ARRAY(double, v4d, 4, f64)

/* ---- Python bindings ---------------------------------------------------------------------------------- */

/* (data_ptr, dtype_code) of a contiguous operand; ptr 0 for an absent one. */
static int parse_operand(PyObject *tuple, struct view *v)
{
    unsigned long long ptr;
    if (!PyArg_ParseTuple(tuple, "Ki", &ptr, &v->dtype)) return 0;
    if (v->dtype < DT_F32 || v->dtype > DT_F16) {
        PyErr_Format(PyExc_ValueError, "losskit._native_binary: unknown dtype code %d", v->dtype);
        return 0;
    }
    *v = (struct view){(void *)(uintptr_t)ptr, v->dtype, 1, 0, 1};
    return 1;
}

static int parse_periodic(PyObject *tuple, struct periodic *q)
{
    unsigned long long ptr;
    long long start, div, period;
    if (!PyArg_ParseTuple(tuple, "KLLL", &ptr, &start, &div, &period)) return 0;
    if (ptr && (start < 0 || div < 1 || period < 1)) {
        PyErr_SetString(PyExc_ValueError, "losskit._native_binary: invalid broadcast operand");
        return 0;
    }
    *q = (struct periodic){(const void *)(uintptr_t)ptr, start, div, period};
    return 1;
}

static const char binary_doc[] =
    "binary(kind, double, x, y, gx, gy, out, w, p, n, row_len, alpha, gamma, scale, nthreads) -> float\n\n"
    "Loss and gradients of n contiguous elements; see losskit/ops/cpu/native_binary.py, which validates the\n"
    "operands. kind: 0 BCE, 1 BCE with logits, 2 soft margin, 3 sigmoid focal. double: accumulate in\n"
    "double (out is then float64). x, y, gx, gy, out: (data_ptr, dtype_code), ptr 0 when absent; w, p:\n"
    "(data_ptr, start, div, period) in the accumulation type. Returns the sum of the losses.";

static PyObject *py_binary(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *ox, *oy, *ogx, *ogy, *oout, *ow, *op;
    long long n, row_len;
    int nthreads;
    struct binary_args a = {0};
    if (!PyArg_ParseTuple(args, "ipO!O!O!O!O!O!O!LLdddi", &a.kind, &a.dbl, &PyTuple_Type, &ox, &PyTuple_Type, &oy,
                          &PyTuple_Type, &ogx, &PyTuple_Type, &ogy, &PyTuple_Type, &oout, &PyTuple_Type, &ow,
                          &PyTuple_Type, &op, &n, &row_len, &a.alpha, &a.gamma, &a.scale, &nthreads))
        return NULL;
    if (!parse_operand(ox, &a.x) || !parse_operand(oy, &a.y) || !parse_operand(ogx, &a.gx) ||
        !parse_operand(ogy, &a.gy) || !parse_operand(oout, &a.out) || !parse_periodic(ow, &a.w) ||
        !parse_periodic(op, &a.p))
        return NULL;
    /* out: row sums in the accumulation type, or per-element losses stored as float64 exactly when
     * accumulating in double (losskit's accumulation dtype of the output dtype) */
    const int dbl = a.dbl, acc = dbl ? DT_F64 : DT_F32;
    if (a.kind < 0 || a.kind >= N_KINDS || n < 0 || row_len < 0 || (n > 0 && (!a.x.ptr || !a.y.ptr)) ||
        (row_len > 0 && (!a.out.ptr || a.out.dtype != acc || n % row_len)) ||
        (row_len == 0 && a.out.ptr && (a.out.dtype == DT_F64) != dbl) || !(a.gamma >= 0)) {
        PyErr_SetString(PyExc_ValueError, "losskit._native_binary.binary: invalid sizes, kind or operands");
        return NULL;
    }
    a.n = n;
    a.row_len = row_len;
    a.int_gamma = a.gamma == floor(a.gamma) && a.gamma <= 64 ? (int64_t)a.gamma : -1;
    const int64_t block = BLOCK_BYTES / (dbl ? sizeof(double) : sizeof(float));
    const int64_t items = row_len > 0 ? n / row_len : (n + block - 1) / block;
    if (row_len == 0 && !a.out.ptr && items > 0 && !(a.sums = malloc((size_t)items * sizeof(double))))
        return PyErr_NoMemory();
    int err;
    Py_BEGIN_ALLOW_THREADS
    if (!dbl && a.x.dtype == DT_BF16) pthread_once(a.kind == KIND_BCE ? &bce_tables_once : &sigmoid_tables_once,
                                                  a.kind == KIND_BCE ? build_bce_tables : build_sigmoid_tables);
    err = parallel_for(binary_range, &a, items, nthreads);
    Py_END_ALLOW_THREADS
    double total = 0;
    for (int64_t i = 0; a.sums && i < items; i++) total += a.sums[i]; /* in block order: any thread count */
    free(a.sums);
    if (err == ERR_DOMAIN) {
        PyErr_SetString(PyExc_ValueError, "binary_cross_entropy: input or target outside [0, 1]");
        return NULL;
    }
    if (err == ERR_NOMEM) return PyErr_NoMemory();
    return PyFloat_FromDouble(total);
}

static PyObject *py_log(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long ptr;
    long long n;
    int dbl, plus1;
    if (!PyArg_ParseTuple(args, "KLpp", &ptr, &n, &dbl, &plus1)) return NULL;
    if (n < 0 || (n > 0 && !ptr)) {
        PyErr_SetString(PyExc_ValueError, "losskit._native_binary.log: invalid size or pointer");
        return NULL;
    }
    if (dbl) log_array_f64((double *)(uintptr_t)ptr, n, plus1);
    else log_array_f32((float *)(uintptr_t)ptr, n, plus1);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"binary", py_binary, METH_VARARGS, binary_doc},
    SET_OPENMP_METHOD,
    {"log", py_log, METH_VARARGS,
     "log(data_ptr, n, double, plus1): the kernels' vector log (log1p if plus1), in place (tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_native_binary", .m_doc = "losskit's compiled CPU binary-loss kernels.",
    .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native_binary(void) { return PyModule_Create(&module); }
