/* losskit.ops.cpu._native: compiled CPU row kernels (softmax cross-entropy family).
 *
 * Plain C11 with GCC/Clang vector extensions and POSIX threads; no Python or torch object crosses the
 * boundary but integers (data pointers, dtype codes, strides in elements) and floats. The Python side
 * (losskit/ops/cpu/native.py) validates every operand first: shapes, strides and dtypes come from live
 * torch tensors, and targets are checked to lie in [0, C) or equal ignore_index. The kernel checks the
 * targets again before it indexes with them, so an out-of-range class is an error, never a stray access.
 *
 * The vector exp, the storage dtypes and the thread runner are in _native_common.h.
 */

#include "_native_common.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

struct xent_args {
    struct view x, t, g, tg;  /* logits; probability target (ptr NULL: index target); gradients (NULL: none) */
    const int64_t *target;    /* (rows,) class indices for index targets */
    void *loss;               /* (rows,) per-row loss in the accumulation type */
    const void *weight;       /* (C,) class weights in the accumulation type, or NULL */
    int64_t rows, L, C, ignore_index;
    double label_smoothing, gamma, scale, weight_sum;
};

/* A contiguous bfloat16 row (class stride 1): the row kernels read and write it in pairs. */
INLINE int is_bf16_row(const struct view *v) { return v->dtype == DT_BF16 && v->sc == 1; }

/* The cases of the probability-target passes (_native_rows.h): bfloat16 pairs, class weights (float
 * rows), label smoothing. */
enum { PROB_PAIRS = 1, PROB_WEIGHTS = 2, PROB_SMOOTH = 4 };


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
    "Softmax cross-entropy of each row; see losskit/ops/cpu/native.py, which validates the operands.\n"
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
    int dbl, bf16_grade;
    if (!PyArg_ParseTuple(args, "KLpp", &ptr, &n, &dbl, &bf16_grade)) return NULL;
    if (dbl) exp_array_f64((double *)(uintptr_t)ptr, n, 0);
    else exp_array_f32((float *)(uintptr_t)ptr, n, bf16_grade);
    Py_RETURN_NONE;
}

/* ---- output buffers ------------------------------------------------------------------------------------ */

/* A Block owns one anonymous mapping that a kernel's output lives in (torch.frombuffer(block) holds the
 * Block until the last tensor on it is freed). The mapping is 2 MiB-aligned and advised as transparent
 * huge pages: a fresh 512 MiB gradient costs 256 page faults instead of 131072. When the Block is
 * freed, its mapping is kept if the cache is on and has room (KEEP mappings), else unmapped; the next
 * Block of the same mapped length takes it back already faulted in, so a training loop's outputs of
 * each step reuse the previous step's memory instead of having fresh pages zeroed. A Block of another
 * length first unmaps the kept ones. Every call runs with the GIL held. */
#if defined(__linux__) && defined(MAP_ANONYMOUS) && defined(MADV_HUGEPAGE)
#define HAVE_BLOCKS 1
enum { HUGE = 2 << 20 };

typedef struct Block {
    PyObject_HEAD
    void *ptr;
    size_t size, mapped; /* bytes asked for; bytes mapped (size rounded up to 2 MiB) */
    struct Block *prev, *next; /* the live Blocks, so that block_at finds a tensor's Block by its address */
} Block;
static Block *live = NULL;

/* Two: the outputs one loss call has alive at once (a gradient and a target gradient, softmax's output
 * and then its gradient). */
enum { KEEP = 2 };
static struct {
    void *ptr;
    size_t mapped;
} kept[KEEP];
static int cache_enabled = 1;

static void release_kept(void)
{
    for (int i = 0; i < KEEP; i++) {
        if (kept[i].ptr) munmap(kept[i].ptr, kept[i].mapped);
        kept[i].ptr = NULL;
        kept[i].mapped = 0;
    }
}

/* A 2 MiB-aligned mapping of `mapped` bytes: map 2 MiB more, then unmap the slack on either side. */
static void *map_aligned(size_t mapped)
{
    char *raw = mmap(NULL, mapped + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    char *start = (char *)(((uintptr_t)raw + HUGE - 1) & ~(uintptr_t)(HUGE - 1));
    if (start > raw) munmap(raw, (size_t)(start - raw));
    if (raw + mapped + HUGE > start + mapped) munmap(start + mapped, (size_t)(raw + mapped + HUGE - (start + mapped)));
    (void)madvise(start, mapped, MADV_HUGEPAGE); /* advice: where THP is off nothing changes */
    return start;
}

static void block_dealloc(Block *self)
{
    if (self->prev) self->prev->next = self->next;
    else if (live == self) live = self->next;
    if (self->next) self->next->prev = self->prev;
    if (self->ptr) {
        int i = 0;
        while (i < KEEP && kept[i].ptr) i++;
        if (cache_enabled && i < KEEP) {
            kept[i].ptr = self->ptr;
            kept[i].mapped = self->mapped;
        } else {
            munmap(self->ptr, self->mapped);
        }
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int block_getbuffer(Block *self, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)self, self->ptr, (Py_ssize_t)self->size, 0, flags);
}

static PyBufferProcs block_as_buffer = {.bf_getbuffer = (getbufferproc)block_getbuffer};

/* Block.release(offset): the whole pages from byte `offset` to the end of the mapping go back to the OS
 * (MADV_DONTNEED). The mapping stays: a tensor that still spans them reads zeros, never faults, and the
 * next write faults fresh zeroed pages in. */
static PyObject *block_release(Block *self, PyObject *args)
{
    unsigned long long offset;
    if (!PyArg_ParseTuple(args, "K", &offset)) return NULL;
    if (offset > self->size) {
        PyErr_Format(PyExc_ValueError, "Block.release: offset %llu is past the buffer's %zu bytes", offset,
                     self->size);
        return NULL;
    }
    const long page_size = sysconf(_SC_PAGESIZE);
    const size_t page = page_size > 0 ? (size_t)page_size : 4096;
    const size_t from = ((size_t)offset + page - 1) / page * page;
    if (from < self->mapped && madvise((char *)self->ptr + from, self->mapped - from, MADV_DONTNEED) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef block_methods[] = {
    {"release", (PyCFunction)block_release, METH_VARARGS,
     "release(offset): give the pages past byte offset back to the OS; they read as zeros (see _native.c)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BlockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "losskit.ops.cpu._native.Block",
    .tp_basicsize = sizeof(Block),
    .tp_dealloc = (destructor)block_dealloc,
    .tp_as_buffer = &block_as_buffer,
    .tp_methods = block_methods,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A kernel output's memory: a writable buffer of the asked size (see _native.c).",
};

static PyObject *py_block(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long size;
    if (!PyArg_ParseTuple(args, "K", &size)) return NULL;
    if (size == 0 || size > ((unsigned long long)1 << 48)) {
        PyErr_Format(PyExc_ValueError, "losskit._native.block: size must be in [1, 2^48] bytes, got %llu", size);
        return NULL;
    }
    const size_t mapped = ((size_t)size + HUGE - 1) & ~(size_t)(HUGE - 1);
    void *ptr = NULL;
    for (int i = 0; i < KEEP && !ptr; i++) {
        if (kept[i].ptr && kept[i].mapped == mapped) {
            ptr = kept[i].ptr;
            kept[i].ptr = NULL;
            kept[i].mapped = 0;
        }
    }
    if (!ptr) {
        release_kept(); /* mappings of another size: give them back before taking more */
        if (!(ptr = map_aligned(mapped))) return PyErr_NoMemory();
    }
    Block *b = PyObject_New(Block, &BlockType);
    if (!b) {
        munmap(ptr, mapped);
        return NULL;
    }
    b->ptr = ptr;
    b->size = (size_t)size;
    b->mapped = mapped;
    b->prev = NULL;
    b->next = live;
    if (live) live->prev = b;
    live = b;
    return (PyObject *)b;
}

/* block_at(address, nbytes): the live Block whose buffer is exactly [address, address + nbytes), or None. */
static PyObject *py_block_at(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long address, size;
    if (!PyArg_ParseTuple(args, "KK", &address, &size)) return NULL;
    for (Block *b = live; b; b = b->next) {
        if ((uintptr_t)b->ptr == (uintptr_t)address && b->size == (size_t)size) {
            Py_INCREF(b);
            return (PyObject *)b;
        }
    }
    Py_RETURN_NONE;
}

static PyObject *py_set_block_cache(PyObject *self, PyObject *args)
{
    (void)self;
    int enabled;
    if (!PyArg_ParseTuple(args, "p", &enabled)) return NULL;
    cache_enabled = enabled;
    release_kept();
    Py_RETURN_NONE;
}
#endif

static PyMethodDef methods[] = {
    {"xent", py_xent, METH_VARARGS, xent_doc},
    SET_OPENMP_METHOD,
#ifdef HAVE_BLOCKS
    {"block", py_block, METH_VARARGS, "block(nbytes): a Block of nbytes for a kernel's output (see _native.c)."},
    {"block_at", py_block_at, METH_VARARGS,
     "block_at(address, nbytes): the live Block whose buffer is exactly those bytes, or None."},
    {"set_block_cache", py_set_block_cache, METH_VARARGS,
     "set_block_cache(enabled): turn the cache of freed Blocks' mappings on or off; empties it either way."},
#endif
    {"exp", py_exp, METH_VARARGS,
     "exp(data_ptr, n, double, bf16_grade): the kernels' vector exp, in place (tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_native", .m_doc = "losskit's compiled CPU row kernels.", .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
#ifdef HAVE_BLOCKS
    if (PyType_Ready(&BlockType) < 0) return NULL;
#endif
    return PyModule_Create(&module);
}
