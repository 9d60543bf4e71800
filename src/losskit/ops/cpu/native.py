"""Compiled CPU kernels (``impl="compiled"``): C extensions built with the package, and what they share.

This module loads the extensions (``losskit.ops.cpu._native*``, one per ``_native*.c``; each optional),
allocates kernel outputs (:func:`empty`) and drives the softmax cross-entropy kernel of ``_native.c``
(:func:`xent_rows`, for ``cross_entropy`` and ``focal_loss``); ``native_softmax``, ``native_binary`` and
``native_pointwise`` drive the others. Which backend runs is :mod:`losskit.ops._dispatch`'s decision.

Reference expression of :func:`xent_rows`: the same per-row loss and gradient as
:func:`losskit.ops.reference.rows.xent_rows_`, i.e. ``F.cross_entropy(x, y, weight, ignore_index=...,
label_smoothing=...)`` and the focal loss, per row, with ``grad = scale * dloss/dx``. Each row is read
from memory once and its gradient written once: pass 1 finds the max, pass 2 (on the row now in L1/L2,
the next row being prefetched meanwhile) writes ``e = exp(x - max)`` into the gradient row and sums it,
pass 3 turns ``e`` into the gradient in place; one exp per element (at most 1.013 ulp float32, 0.99 ulp
float64, measured; see ``_native_common.h`` and the tests). Rows are handed to
``torch.get_num_threads()`` threads in chunks from a shared counter: the workers of the OpenMP runtime
torch runs on, where it is found loaded (:func:`openmp_runtime`), else threads of the extension's own.
Contiguous bfloat16 rows (index
targets without class weights, or contiguous bfloat16 probability targets) are read and written in pairs
of elements per 32-bit word (``_native_rowops.h``, ``_native_rows.h``), probability targets' results bit
for bit the float32 path's rounded once; other bfloat16 and float16 rows are converted in cache.

Why a C extension: see the README's "Kernels" section and ``benchmarks/engine_costs.py``, which
measures it against torch.compile and numba (speed, first call with a cold and a warm cache, import,
install weight).

Safety: this module checks every operand it hands to the kernel (device, dtype, shape, that strides
come from a tensor of the stated shape, target count and dtype); class indices are validated by the
loss before the call and again by the kernel before any indexing. Errors come back as exceptions.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import re
import sys
from types import ModuleType

import torch
from torch import Tensor


_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
#: Below this many elements one thread does the work: starting a thread costs tens of microseconds.
_MIN_ELEMENTS_PER_THREAD = 1 << 16

#: name -> the loaded extension module, or the ImportError it raised (each is imported once, when first
#: used: the extensions are small and load in well under a millisecond).
_loaded: dict[str, ModuleType | ImportError] = {}
#: The C extensions built by setup.py: the softmax cross-entropy rows, and the families added beside it.
XENT = "_native"


def load(name: str = XENT) -> ModuleType | ImportError:
    """``losskit.ops.cpu.<name>``, or the ImportError that importing it raised."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"losskit.ops.cpu.{name}")
        except ImportError as err:
            _loaded[name] = err
        else:
            if name == XENT and hasattr(_loaded[name], "set_block_cache"):
                _loaded[name].set_block_cache(_buffer_cache)
            if hasattr(_loaded[name], "set_openmp"):
                _loaded[name].set_openmp(openmp_runtime()[1])
    return _loaded[name]


_openmp: list[tuple[str, int]] = []


def openmp_runtime() -> tuple[str, int]:
    """``(path, address of GOMP_parallel)`` of the OpenMP runtime torch's ops run on, or ``("", 0)``.

    The kernels' threads are then that runtime's team (``_native_common.h``, ``parallel_for``): the
    workers torch's own parallel ops use, which spin for a while after each of them waiting for more
    work, so that threads of the extension's own would share cores with them. Found on Linux, when
    torch's parallel backend is OpenMP, as the ``libgomp``/``libiomp5``/``libomp`` mapped into the process
    from torch's own directory (or the only one mapped), opened with ``RTLD_NOLOAD`` (the loaded copy,
    never a second one). ``LOSSKIT_OPENMP=0`` keeps threads of the extension's own."""
    if not _openmp:
        _openmp.append(_find_openmp())
    return _openmp[0]


def _find_openmp() -> tuple[str, int]:
    if os.environ.get("LOSSKIT_OPENMP", "1") == "0" or not sys.platform.startswith("linux"):
        return "", 0
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return "", 0
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "", 0
    found = sorted({line.split()[-1] for line in maps.splitlines()
                    if re.search(r"/lib(gomp|iomp5|omp)\b[^/]*\.so[^/]*$", line)})
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    candidates = [path for path in found if path.startswith(torch_dir)] or (found if len(found) == 1 else [])
    if not candidates:
        return "", 0
    try:
        library = ctypes.CDLL(candidates[0], mode=os.RTLD_NOLOAD | os.RTLD_NOW)
        address = ctypes.cast(library.GOMP_parallel, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return "", 0
    return (candidates[0], address) if address else ("", 0)


def module(name: str = XENT) -> ModuleType:
    """``losskit.ops.cpu.<name>``; ImportError saying how to build it when it did not load."""
    loaded = load(name)
    if isinstance(loaded, ImportError):
        raise ImportError(
            f"impl='compiled' needs losskit's C extension (losskit.ops.cpu.{name}), which did not load "
            f"({loaded}); reinstall losskit from source with a C compiler present (`pip install "
            "--force-reinstall --no-binary losskit losskit`, or `pip install -e .` in a checkout), or use "
            "impl='torch'"
        )
    return loaded


def available(name: str = XENT) -> bool:
    """Whether the compiled kernels of extension ``name`` were built and load."""
    return not isinstance(load(name), ImportError)


#: Outputs of at least this many bytes live in the extension's own 2 MiB-aligned, huge-page mappings.
BLOCK_MIN_BYTES = 4 << 20


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor for a kernel to write once (a gradient, an output).

    A fresh buffer costs a page fault per 4 KiB page at its first write, and the OS zeroes every page:
    for a 512 MiB gradient, 131072 faults, measured at 0.18 s (``torch.empty(...).fill_(0)``) against
    about 0.05 s for the cross-entropy kernel that fills it. On Linux CPU, buffers of at least
    ``BLOCK_MIN_BYTES`` therefore come from the extension (``_native.c``, ``block``): a 2 MiB-aligned
    mapping advised as transparent huge pages (512x fewer faults; torch gives the same advice with
    ``THP_MEM_ALLOC_ENABLE=1``), and when the tensor is freed its mapping is kept for the next buffer
    of the same size (two mappings at most, the outputs one call has alive at once; a buffer of
    another size unmaps them): a training loop's gradients then reuse the previous step's memory
    instead of having fresh pages faulted and zeroed. Peak memory is unchanged (the kept mappings are
    what the next step allocates anyway); between calls they stay mapped until
    :func:`release_buffer_cache` unmaps them (:func:`set_buffer_cache` turns the reuse off). Elsewhere,
    ``torch.empty``.
    """
    if torch.compiler.is_compiling():  # traced: the compiler plans the buffer (and cannot trace an import)
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    ext = load()
    if (torch.device(device).type == "cpu" and nbytes >= BLOCK_MIN_BYTES and not isinstance(ext, ImportError)
            and hasattr(ext, "block")):
        return torch.frombuffer(ext.block(nbytes), dtype=dtype).view(shape)
    return torch.empty(shape, dtype=dtype, device=device)


#: Elements of the first step of :func:`round_in_place`, rounded through a temporary (128 KiB of
#: bfloat16); every later step doubles the rounded prefix.
_FIRST_ROUNDED = 1 << 16


def round_in_place(t: Tensor, dtype: torch.dtype) -> Tensor | None:
    """``t.to(dtype)``, written over the first half of ``t``'s own memory, whose second half's pages then
    go back to the OS; None (nothing done) unless ``t`` is a whole buffer of :func:`empty` (a Block)
    holding a 4-byte float type and ``dtype`` is a 2-byte one. ``t`` is consumed: its values are gone.

    For a float32 sum rounded to a bfloat16 result, this takes the result's bytes off the peak (the
    N=2048, D=1024, C=32768 weight gradient: a 128 MiB sum and its 64 MiB rounding were alive at once).
    The result is a tensor on the Block's first half (its storage is exactly that), so the Block, with
    its mapping, lives as long as the result; freed, its mapping is kept for reuse like any other (see
    :func:`empty`), the released half faulting back in when next written.

    In place, element ``i`` moves from byte ``4i`` to byte ``2i``: rounding ``[a, b)`` writes bytes
    ``[2a, 2b)``, which hold only elements below ``b / 2``. So after a first prefix (through a small
    temporary), each step rounds ``[a, 2a)``, whose destination lies in elements already read, in one
    parallel copy whose operands do not overlap.
    """
    if (torch.compiler.is_compiling() or t.device.type != "cpu" or not t.is_contiguous()
            or not (t.is_floating_point() and dtype.is_floating_point)
            or t.dtype.itemsize != 4 or dtype.itemsize != 2):
        return None
    ext = load()
    n = t.numel()
    block = None if isinstance(ext, ImportError) or not hasattr(ext, "block_at") or n == 0 else (
        ext.block_at(t.data_ptr(), n * 4))
    if block is None:
        return None
    src = t.view(-1)  # (n,) 4-byte
    dst = src.view(dtype)[:n]  # (n,) 2-byte, the same bytes' first half
    first = min(n, _FIRST_ROUNDED)
    dst[:first].copy_(src[:first].to(dtype))
    a = first
    while a < n:
        b = min(n, 2 * a)
        dst[a:b].copy_(src[a:b])  # bytes [2a, 2b) from bytes [4a, 4b): disjoint
        a = b
    block.release(2 * n)
    return torch.frombuffer(memoryview(block)[:2 * n], dtype=dtype).view(t.shape)


#: Whether freed output buffers are kept for reuse (see :func:`empty`); ``LOSSKIT_BUFFER_CACHE=0`` turns
#: it off for the process.
_buffer_cache = os.environ.get("LOSSKIT_BUFFER_CACHE", "1") != "0"


def set_buffer_cache(enabled: bool) -> None:
    """Keep (True, the default) or stop keeping the mappings of freed output buffers for reuse (see
    :func:`empty`); the mappings kept now are released either way."""
    global _buffer_cache
    _buffer_cache = bool(enabled)
    release_buffer_cache()


def release_buffer_cache() -> None:
    """Unmap the output buffers kept for reuse, if any (the cache stays on or off as it was)."""
    ext = load()
    if not isinstance(ext, ImportError) and hasattr(ext, "set_block_cache"):
        ext.set_block_cache(_buffer_cache)


def _view(t: Tensor | None, shape: tuple[int, int, int] | None = None) -> tuple[int, int, int, int, int]:
    """``(data_ptr, dtype code, stride_n, stride_l, stride_c)`` of an ``(N, C, L)`` tensor; zeros if absent."""
    if t is None:
        return (0, 0, 0, 0, 0)
    if t.dim() != 3 or (shape is not None and tuple(t.shape) != shape) or t.dtype not in _DTYPE_CODES:
        raise ValueError(f"native kernel operand: expected {shape} of a floating dtype, got "
                         f"{tuple(t.shape)} {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"native kernel operand must be on the CPU, got {t.device}")
    return (t.data_ptr(), _DTYPE_CODES[t.dtype], t.stride(0), t.stride(2), t.stride(1))


def threads_for(elements: int) -> int:
    """Threads for a kernel call over ``elements`` elements: torch's intra-op count, one per 64K elements."""
    return max(1, min(torch.get_num_threads(), elements // _MIN_ELEMENTS_PER_THREAD))


def xent_rows(x3: Tensor, target: Tensor, grad3: Tensor | None, target_grad3: Tensor | None,
              weight: Tensor | None, loss: Tensor, *, ignore_index: int, label_smoothing: float, gamma: float,
              scale: float, threads: int | None = None) -> None:
    """Softmax cross-entropy of every position of an ``(N, C, L)`` input, in one call.

    ``x3``: (N, C, L) logits, any strides, float32/float64/bfloat16/float16. ``target``: (N*L,) class
    indices (int64, in [0, C) or ``ignore_index``) or (N, C, L) probabilities. ``grad3`` and
    ``target_grad3``: (N, C, L) outputs that receive ``scale * dloss/dx`` and ``scale * dloss/dt``, or
    None. ``weight``: (C,) in the accumulation dtype (float64 for float64 input, else float32) or None.
    ``loss``: (N, L) contiguous, accumulation dtype, receives the unreduced weighted loss.
    """
    ext = module()
    n, c, length = x3.shape
    if n * length == 0:
        return
    shape = (n, c, length)
    acc = torch.float64 if x3.dtype == torch.float64 else torch.float32
    probabilities = target.is_floating_point()
    if probabilities:
        t_view, t_ptr = _view(target, shape), 0
    else:
        if target.dtype != torch.int64 or not target.is_contiguous() or target.numel() != n * length:
            raise ValueError(f"native kernel target: expected ({n * length},) contiguous int64, got "
                             f"{tuple(target.shape)} {target.dtype}")
        t_view, t_ptr = _view(None), target.data_ptr()
    if loss.dtype != acc or not loss.is_contiguous() or loss.numel() != n * length:
        raise ValueError(f"native kernel loss: expected ({n}, {length}) contiguous {acc}, got "
                         f"{tuple(loss.shape)} {loss.dtype}")
    if weight is not None and (weight.dtype != acc or not weight.is_contiguous() or weight.numel() != c):
        raise ValueError(f"native kernel weight: expected ({c},) contiguous {acc}, got {tuple(weight.shape)} "
                         f"{weight.dtype}")
    weight_sum = float(weight.sum()) if weight is not None else float(c)
    ext.xent(_view(x3, shape), t_view, _view(grad3, shape), _view(target_grad3, shape), t_ptr,
                loss.data_ptr(), 0 if weight is None else weight.data_ptr(), n * length, length, c,
                int(ignore_index), float(label_smoothing), float(gamma), float(scale), weight_sum,
                threads if threads is not None else threads_for(x3.numel()))


def exp_(x: Tensor, *, bf16_grade: bool = False) -> Tensor:
    """The kernels' vector exp applied in place to a contiguous float32/float64 CPU tensor (for tests);
    ``bf16_grade``: the float32 exp of the bfloat16 rows (used where results are rounded to bfloat16)."""
    ext = module()
    if x.device.type != "cpu" or not x.is_contiguous() or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be a contiguous float32/float64 CPU tensor, got {x.dtype} on {x.device}")
    ext.exp(x.data_ptr(), x.numel(), x.dtype == torch.float64, bf16_grade)
    return x
