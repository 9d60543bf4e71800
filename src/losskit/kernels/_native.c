/* losskit.kernels._native: compiled CPU row kernels (softmax cross-entropy family).
 *
 * Plain C11 with GCC/Clang vector extensions and POSIX threads; no Python or torch object crosses the
 * boundary but integers (data pointers, dtype codes, strides in elements) and floats. The Python side
 * (losskit/kernels/native.py) validates every operand first: shapes, strides and dtypes come from live
 * torch tensors, and targets are checked to lie in [0, C) or equal ignore_index. The kernel checks the
 * targets again before it indexes with them, so an out-of-range class is an error, never a stray access.
 *
 * The vector exp, the storage dtypes and the thread runner are in _native_common.h.
 */

#include "_native_common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

struct xent_args {
    struct view x, t, g, tg;  /* logits; probability target (ptr NULL: index target); gradients (NULL: none) */
    const int64_t *target;    /* (rows,) class indices for index targets */
    void *loss;               /* (rows,) per-row loss in the accumulation type */
    const void *weight;       /* (C,) class weights in the accumulation type, or NULL */
    int64_t rows, L, C, ignore_index;
    double label_smoothing, gamma, scale, weight_sum;
};


/* ---- the row kernels, once per accumulation type ---------------------------------------------------- */

#define TEMPLATE "_native_rows.h"
#include "_native_instantiate.h"

/* ---- threads ---------------------------------------------------------------------------------------- */

static int xent_range(void *ctx, int64_t r0, int64_t r1)
{
    const struct xent_args *a = ctx;
    return a->x.dtype == DT_F64 ? xent_range_f64(a, r0, r1) : xent_range_f32(a, r0, r1);
}

/* ---- Python bindings ---------------------------------------------------------------------------------- */

static const char xent_doc[] =
    "xent(x, t, g, tg, target_ptr, loss_ptr, weight_ptr, rows, L, C, ignore_index, label_smoothing, gamma,\n"
    "     scale, weight_sum, nthreads)\n\n"
    "Softmax cross-entropy of each row; see losskit/kernels/native.py, which validates the operands.\n"
    "x, t, g, tg: (data_ptr, dtype_code, stride_n, stride_l, stride_c); ptr 0 for an absent operand.";

static PyObject *py_xent(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *vx, *vt, *vg, *vtg;
    unsigned long long target, loss, weight;
    long long rows, L, C, ignore_index;
    double ls, gamma, scale, wsum;
    int nthreads;
    if (!PyArg_ParseTuple(args, "O!O!O!O!KKKLLLLddddi", &PyTuple_Type, &vx, &PyTuple_Type, &vt, &PyTuple_Type,
                          &vg, &PyTuple_Type, &vtg, &target, &loss, &weight, &rows, &L, &C, &ignore_index, &ls,
                          &gamma, &scale, &wsum, &nthreads))
        return NULL;
    struct xent_args a = {0};
    if (!parse_view(vx, &a.x) || !parse_view(vt, &a.t) || !parse_view(vg, &a.g) || !parse_view(vtg, &a.tg))
        return NULL;
    if (rows < 0 || L < 1 || C < 1 || !a.x.ptr || !loss || (!a.t.ptr && !target)) {
        PyErr_SetString(PyExc_ValueError, "losskit._native.xent: invalid sizes or missing operand");
        return NULL;
    }
    a.target = (const int64_t *)(uintptr_t)target;
    a.loss = (void *)(uintptr_t)loss;
    a.weight = (const void *)(uintptr_t)weight;
    a.rows = rows;
    a.L = L;
    a.C = C;
    a.ignore_index = ignore_index;
    a.label_smoothing = ls;
    a.gamma = gamma;
    a.scale = scale;
    a.weight_sum = wsum;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = parallel_for(xent_range, &a, rows, nthreads);
    Py_END_ALLOW_THREADS
    if (err == ERR_NOMEM) return PyErr_NoMemory();
    if (err == ERR_TARGET) {
        PyErr_Format(PyExc_ValueError, "target contains a class index outside [0, %lld) (ignore_index=%lld)", C,
                     ignore_index);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_exp(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long ptr;
    long long n;
    int dbl;
    if (!PyArg_ParseTuple(args, "KLp", &ptr, &n, &dbl)) return NULL;
    if (dbl) exp_array_f64((double *)(uintptr_t)ptr, n);
    else exp_array_f32((float *)(uintptr_t)ptr, n);
    Py_RETURN_NONE;
}

static PyObject *py_advise_huge_pages(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long ptr, nbytes;
    if (!PyArg_ParseTuple(args, "KK", &ptr, &nbytes)) return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    /* only the 2 MiB-aligned interior [lo, hi) of the buffer: no neighbouring allocation is affected */
    const uintptr_t huge = (uintptr_t)2 << 20, lo = ((uintptr_t)ptr + huge - 1) & ~(huge - 1),
                    hi = ((uintptr_t)ptr + (uintptr_t)nbytes) & ~(huge - 1);
    if (hi > lo) (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE); /* advice: a refusal changes nothing */
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"xent", py_xent, METH_VARARGS, xent_doc},
    {"advise_huge_pages", py_advise_huge_pages, METH_VARARGS,
     "advise_huge_pages(data_ptr, nbytes): madvise(MADV_HUGEPAGE) on the buffer's 2 MiB-aligned interior."},
    {"exp", py_exp, METH_VARARGS, "exp(data_ptr, n, double): the kernels' vector exp, in place (tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_native", .m_doc = "losskit's compiled CPU row kernels.", .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
