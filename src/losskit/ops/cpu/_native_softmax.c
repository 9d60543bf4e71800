/* losskit.ops.cpu._native_softmax: compiled CPU row kernels of softmax, log_softmax (forward and
 * backward), entropy (of logits or probabilities, with its gradient) and nll_loss.
 *
 * Same contract as _native.c: plain C11 with vector extensions and POSIX threads; only integers (data
 * pointers, dtype codes, strides in elements) and floats cross the boundary. The Python side
 * (losskit/ops/cpu/native_softmax.py) validates every operand first: shapes, strides and dtypes come
 * from live torch tensors, outputs are contiguous, and nll_loss targets are checked to lie in [0, C) or
 * equal ignore_index; the kernel checks each target again before it indexes with it, so an
 * out-of-range class is an error, never a stray access.
 *
 * The row passes are in _native_softmax_rows.h (instantiated for float and double); the vector exp,
 * storage dtypes, strided row loaders and the thread runner in _native_common.h.
 */

#include "_native_common.h"
#include "_native_log.h"

#include <float.h>

enum { OP_SOFTMAX, OP_LOG_SOFTMAX, OP_SOFTMAX_BACKWARD, OP_LOG_SOFTMAX_BACKWARD, OP_ENTROPY_LOGITS, OP_ENTROPY_PROBS };

/* One row-wise call over (N, C, L) operands, rows = N * L of C entries. */
struct rows_args {
    struct view x;   /* input (backward: the saved output y) */
    struct view g;   /* backward: grad_output */
    struct view out; /* output, the input gradient, or the entropy gradient (ptr NULL: none) */
    void *per_row;   /* entropy: (rows,) entropies in the accumulation type */
    int64_t rows, L, C;
    int op, dbl;     /* dbl: accumulate in double (float64 operands), else float */
    int columns;     /* rows run W at a time in column tiles (see _native_softmax_rows.h) */
};

/* Column tiles for C <= COLUMN_MAX_C (three C x 8 float tiles in 384 KiB of L2) when L > 1, and for
 * rows shorter than COLUMN_BELOW_C when L = 1. Softmax forward, one thread, loaded machine: C = 2 and
 * 1M rows 92 ms row by row (~90 ns of fixed cost per row), 8.5 ms in tiles, torch 82-116 ms; from C = 16
 * to 32 on the row path is as fast or faster; (4, 1000, 1024) along dim 1: 101 ms row by row
 * (strided gathers), 8-10 ms in tiles, torch 13-30 ms. */
enum { COLUMN_MAX_C = 4096, COLUMN_BELOW_C = 16 };

/* One nll_loss call: (N, C, L) log-probabilities x, (N * L,) targets. */
struct nll_args {
    struct view x;
    const int64_t *target;
    void *loss;          /* (N * L,) per-position loss in the accumulation type */
    const void *weight;  /* (C,) class weights in the accumulation type, or NULL */
    char *g;             /* contiguous (N, C, L) gradient of dtype g_dtype, or NULL */
    int g_dtype, dbl;
    int64_t g_size, N, L, C, width, ignore_index;
    double scale;
};

/* The bfloat16 tables (see build_bf16_tables in _native_softmax_rows.h): a function of a bfloat16 value
 * on each of its 65536 bit patterns, built on the first call that reads them. For log_softmax (forward
 * and backward): exp(y) as float (256 KiB) and as double (512 KiB); of a probability p, p log p (as
 * double: 512 KiB) and the entropy gradient -(log p + 1) rounded to bfloat16 (128 KiB). A kernel touches
 * only the entries of the values it meets (a few thousand for randn logits or softmax outputs). */
static float bf16_exp_table[65536];
static double bf16_exp_double_table[65536], bf16_plogp_table[65536];
static uint16_t bf16_entropy_grad_table[65536];

/* exp_array, shared by _native_rowops.h for _native.c's accuracy tests, is not used here. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#define TEMPLATE "_native_softmax_rows.h"
#include "_native_instantiate.h"
#pragma GCC diagnostic pop

/* ---- threads ---------------------------------------------------------------------------------------- */

static int rows_range(void *ctx, int64_t r0, int64_t r1)
{
    const struct rows_args *a = ctx;
    if (a->columns) return a->dbl ? tiles_range_f64(a, r0, r1) : tiles_range_f32(a, r0, r1);
    return a->dbl ? rows_range_f64(a, r0, r1) : rows_range_f32(a, r0, r1);
}

/* The tables of the pair path, built once (pthread_once: a call from another thread waits for them). */
static pthread_once_t exp_table_once = PTHREAD_ONCE_INIT, entropy_tables_once = PTHREAD_ONCE_INIT;
static void build_exp_table(void) { build_bf16_tables_f32(0); }
static void build_entropy_tables(void) { build_bf16_tables_f32(1); }

static int nll_range(void *ctx, int64_t t0, int64_t t1)
{
    const struct nll_args *a = ctx;
    return a->dbl ? nll_range_f64(a, t0, t1) : nll_range_f32(a, t0, t1);
}

/* ---- Python bindings ---------------------------------------------------------------------------------- */

static int check_sizes(long long rows, long long L, long long C, const char *name)
{
    if (rows < 0 || L < 1 || C < 1) {
        PyErr_Format(PyExc_ValueError, "losskit._native_softmax.%s: invalid sizes rows=%lld L=%lld C=%lld", name,
                     rows, L, C);
        return 0;
    }
    return 1;
}

static int run(range_fn fn, void *ctx, int64_t items, int nthreads, long long C, long long ignore_index)
{
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = parallel_for(fn, ctx, items, nthreads);
    Py_END_ALLOW_THREADS
    if (err == ERR_NOMEM) PyErr_NoMemory();
    else if (err == ERR_TARGET)
        PyErr_Format(PyExc_ValueError, "target contains a class index outside [0, %lld) (ignore_index=%lld)", C,
                     ignore_index);
    return err == 0;
}

static const char rows_doc[] =
    "rows(op, x, g, out, per_row_ptr, rows, L, C, dbl, nthreads)\n\n"
    "op 0 softmax, 1 log_softmax (x -> out), 2/3 their backward (saved output x, grad_output g -> out),\n"
    "4/5 entropy of logits/probabilities (x -> per-row entropy, gradient out or absent). Views are\n"
    "(data_ptr, dtype_code, stride_n, stride_l, stride_c), ptr 0 when absent; see native_softmax.py.";

static PyObject *py_rows(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *vx, *vg, *vout;
    unsigned long long per_row;
    long long rows, L, C;
    int op, dbl, nthreads;
    if (!PyArg_ParseTuple(args, "iO!O!O!KLLLpi", &op, &PyTuple_Type, &vx, &PyTuple_Type, &vg, &PyTuple_Type, &vout,
                          &per_row, &rows, &L, &C, &dbl, &nthreads))
        return NULL;
    struct rows_args a = {0};
    if (!parse_view(vx, &a.x) || !parse_view(vg, &a.g) || !parse_view(vout, &a.out)) return NULL;
    if (!check_sizes(rows, L, C, "rows")) return NULL;
    const int backward = op == OP_SOFTMAX_BACKWARD || op == OP_LOG_SOFTMAX_BACKWARD;
    const int entropy = op == OP_ENTROPY_LOGITS || op == OP_ENTROPY_PROBS;
    if (op < OP_SOFTMAX || op > OP_ENTROPY_PROBS || !a.x.ptr || (backward && !a.g.ptr) || (!entropy && !a.out.ptr) ||
        (entropy && !per_row)) {
        PyErr_Format(PyExc_ValueError, "losskit._native_softmax.rows: invalid op %d or missing operand", op);
        return NULL;
    }
    a.per_row = (void *)(uintptr_t)per_row;
    a.rows = rows;
    a.L = L;
    a.C = C;
    a.op = op;
    a.dbl = dbl;
    a.columns = (L > 1 && C <= COLUMN_MAX_C) || C < COLUMN_BELOW_C;
    if (!dbl && !a.columns && bf16_rows_f32(&a)) {
        if (op == OP_LOG_SOFTMAX || op == OP_LOG_SOFTMAX_BACKWARD) pthread_once(&exp_table_once, build_exp_table);
        if (op == OP_ENTROPY_PROBS) pthread_once(&entropy_tables_once, build_entropy_tables);
    }
    const int64_t w = dbl ? 4 : 8; /* rows per tile: W of the accumulation type */
    if (!run(rows_range, &a, a.columns ? (rows + w - 1) / w : rows, nthreads, C, 0)) return NULL;
    Py_RETURN_NONE;
}

static const char nll_doc[] =
    "nll(x, target_ptr, loss_ptr, weight_ptr, g_ptr, g_dtype, N, L, C, width, ignore_index, scale, dbl, nthreads)\n\n"
    "nll_loss per position and its gradient (contiguous (N, C, L), g_ptr 0: none), in tiles of width\n"
    "positions; see native_softmax.py, which validates the operands.";

static PyObject *py_nll(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *vx;
    unsigned long long target, loss, weight, g;
    long long N, L, C, width, ignore_index;
    int g_dtype, dbl, nthreads;
    double scale;
    if (!PyArg_ParseTuple(args, "O!KKKKiLLLLLdpi", &PyTuple_Type, &vx, &target, &loss, &weight, &g, &g_dtype, &N, &L,
                          &C, &width, &ignore_index, &scale, &dbl, &nthreads))
        return NULL;
    struct nll_args a = {0};
    if (!parse_view(vx, &a.x)) return NULL;
    static const int64_t sizes[] = {4, 8, 2, 2};
    if (!check_sizes(N, L, C, "nll")) return NULL;
    if (!a.x.ptr || !target || !loss || width < 1 || g_dtype < DT_F32 || g_dtype > DT_F16) {
        PyErr_SetString(PyExc_ValueError, "losskit._native_softmax.nll: missing operand or invalid width/dtype");
        return NULL;
    }
    a.target = (const int64_t *)(uintptr_t)target;
    a.loss = (void *)(uintptr_t)loss;
    a.weight = (const void *)(uintptr_t)weight;
    a.g = (char *)(uintptr_t)g;
    a.g_dtype = g_dtype;
    a.g_size = sizes[g_dtype];
    a.dbl = dbl;
    a.N = N;
    a.L = L;
    a.C = C;
    a.width = width;
    a.ignore_index = ignore_index;
    a.scale = scale;
    if (!run(nll_range, &a, N * ((L + width - 1) / width), nthreads, C, ignore_index)) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rows", py_rows, METH_VARARGS, rows_doc},
    SET_OPENMP_METHOD,
    {"nll", py_nll, METH_VARARGS, nll_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_native_softmax",
    .m_doc = "losskit's compiled CPU row kernels: softmax, log_softmax, entropy, nll_loss.", .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native_softmax(void)
{
    init_bf16_log_table();
    return PyModule_Create(&module);
}
