/* losskit.kernels._native_binary: compiled CPU kernels of the binary (sigmoid / probability) losses.
 *
 * Plain C11 with GCC/Clang vector extensions and POSIX threads, as _native.c; the vector exp, dtypes and
 * thread runner come from _native_common.h, the vector log and log1p from _native_log.h. The Python side
 * (losskit/kernels/native_binary.py) validates every operand before it hands over a pointer.
 */

#include "_native_common.h"
#include "_native_log.h"

/* log or log1p of a contiguous array, in place (the kernels' vector functions, exposed for the tests). */
#define DEFINE_LOG_ARRAY(T, VT, W, SUF)                                                                  \
    HOT static void log_array_##SUF(T *p, int64_t n, int plus1)                                         \
    {                                                                                                   \
        for (int64_t i = 0; i < n; i += W) {                                                            \
            const int64_t m = n - i < W ? n - i : W;                                                    \
            VT v = {0};                                                                                 \
            memcpy(&v, p + i, (size_t)m * sizeof(T));                                                   \
            v = plus1 ? VLOG1P(v) : VLOG(v);                                                            \
            memcpy(p + i, &v, (size_t)m * sizeof(T));                                                   \
        }                                                                                               \
    }
DEFINE_LOG_ARRAY(float, v8f, 8, f32)
DEFINE_LOG_ARRAY(double, v4d, 4, f64)

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
    {"log", py_log, METH_VARARGS,
     "log(data_ptr, n, double, plus1): the kernels' vector log (log1p if plus1), in place (tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_native_binary", .m_doc = "losskit's compiled CPU binary-loss kernels.",
    .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native_binary(void) { return PyModule_Create(&module); }
