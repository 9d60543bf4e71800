"""Compiled CPU kernels of the pointwise losses (``impl="compiled"``): the C extension ``_native_pointwise``.

Reference expressions: the torch kernels these replace, :func:`losskit.functional._regression._mse_kernel`
(``w (x - y)**2``, gradients ``2 w (x - y)`` and its negation) and ``_kl_prob_target`` /
``_kl_log_target`` of :mod:`losskit.functional._divergence` (``xlogy(t, t) - t x``; ``exp(tau) (tau -
x)``), with the same NaN and infinity behaviour, each gradient times the reduction's factor, as
:func:`losskit.ops.reference.elementwise.run` computes them. :func:`runner` returns a function with ``run``'s
signature that computes them in C instead.

One call reads each element of each operand once and writes each output (gradients, and the unreduced
loss for ``reduction="none"``) once, over ``torch.get_num_threads()`` threads; bfloat16/float16
operands are converted in registers and computed in float32, float64 in float64. The loss sum is
formed in float lanes over blocks of 1024 elements, the blocks summed in double in a fixed order (the
same total for any thread count). Contiguous operands of the output's shape go to C in one call;
strided or broadcast ones in contiguous pieces (:mod:`losskit.ops.cpu.native_elementwise`).

Safety: :func:`pointwise` checks every operand it hands to C (CPU, contiguous, element count, dtype);
the C binding checks the kind, sizes and dtype codes again and only indexes ``[0, n)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import native, native_elementwise
from ..reference.elementwise import KL_LOG, KL_PROB, MSE, Kernel, Runner

#: The extension module's name under ``losskit.ops.cpu``.
EXTENSION = "_native_pointwise"

#: Kernel kinds of the C extension (:mod:`losskit.ops.reference.elementwise`'s).
_KINDS = (MSE, KL_PROB, KL_LOG)

_FLOATING = native._DTYPE_CODES  # the storage dtypes of _native_common.h
#: Integer targets (mse_loss) are converted to the accumulation type as they are read.
_INTEGER = {torch.int64: 4, torch.int32: 5, torch.int16: 6, torch.int8: 7, torch.uint8: 8}


def _codes(kind: int, name: str) -> dict[torch.dtype, int]:
    return {**_FLOATING, **_INTEGER} if kind == MSE and name == "target" else _FLOATING


def pointwise(kind: int, x: Tensor, y: Tensor, w: Tensor | None = None, loss: Tensor | None = None,
              gx: Tensor | None = None, gy: Tensor | None = None, *, scale: float = 1.0,
              acc: torch.dtype = torch.float32, threads: int | None = None) -> float:
    """One C call over ``n = x.numel()`` elements of contiguous CPU tensors; returns the loss sum (double).

    ``x`` (input), ``y`` (target; integer allowed for ``MSE``), ``w`` (weight, ``MSE`` only): read.
    ``loss`` (the unreduced loss), ``gx``, ``gy`` (``scale`` times the gradients): written where given.
    Every tensor has ``n`` elements; floating dtypes float32/float64/bfloat16/float16, computed in ``acc``
    (float32 or float64).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if acc not in (torch.float32, torch.float64):
        raise ValueError(f"acc must be torch.float32 or torch.float64, got {acc}")
    if w is not None and kind != MSE:
        raise ValueError("weight is only taken by the MSE kernel")
    if not isinstance(x, Tensor):
        raise ValueError(f"input must be a tensor, got {type(x).__name__}")
    n = x.numel()
    named = (("input", x), ("target", y), ("weight", w), ("loss", loss), ("grad_input", gx), ("grad_target", gy))
    operands = []
    for name, t in named:
        if t is None:
            operands.append((0, 0))
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        codes = _codes(kind, name)
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() != n or t.dtype not in codes:
            raise ValueError(f"native pointwise {name}: expected a contiguous CPU tensor of {n} elements and dtype "
                             f"in {sorted(map(str, codes))}, got {tuple(t.shape)} {t.dtype} on {t.device} "
                             f"(contiguous: {t.is_contiguous()})")
        operands.append((t.data_ptr(), codes[t.dtype]))
    if n == 0:
        return 0.0
    return native.module(EXTENSION).pointwise(kind, acc == torch.float64, n, *operands, float(scale),
                                              threads if threads is not None else native.threads_for(n))


def _run(kind: int, kernel: Kernel, operands: Sequence[Tensor | None], want: Sequence[bool], *, acc: torch.dtype,
         out_dtype: torch.dtype, keep: bool, grad_scale: Tensor | float = 1.0) -> tuple[Tensor, list[Tensor | None]]:
    """:func:`losskit.ops.reference.elementwise.run` of ``kernel`` (the reference of ``kind``), computed in C.

    ``operands``: input, target (broadcastable to the input) and an optional weight. Returns the
    unreduced loss (``out_dtype``, the input's shape) if ``keep``, else a 1-element ``acc`` tensor holding
    the sum; and the gradients (operand ``i``'s shape and dtype, times ``grad_scale``) where ``want``.
    """
    del kernel  # the reference expression; the C kernel of ``kind`` computes the same
    x, y, *rest = operands
    w = rest[0] if rest else None
    # The only input-sized allocations: the gradients and the "none" loss, each written once by the kernel
    # (native.empty: huge pages, no zero-fill); strided inputs are copied a piece at a time by the driver.
    grads = [native.empty(op.shape, op.dtype, op.device) if wanted else None for op, wanted in zip((x, y), want)]
    out = native.empty(x.shape, out_dtype, x.device) if keep else None
    scale = float(grad_scale)

    def call(ins: Sequence[Tensor | None], outs: Sequence[Tensor | None]) -> float:
        return pointwise(kind, *ins, *outs, scale=scale, acc=acc)

    total = native_elementwise.run(call, (x, y, w), (out, *grads), x.shape)
    grads += [None] * (len(operands) - 2)
    if out is not None:
        return out, grads
    return torch.tensor([total], dtype=acc, device=x.device), grads


def pointwise_runner(kind: int) -> Runner:
    """The compiled runner of ``kind`` (``MSE``, ``KL_PROB``, ``KL_LOG``): a function with the signature of
    :func:`losskit.ops.reference.elementwise.run` that computes it in C. :mod:`losskit.ops._dispatch`
    sends only the dtypes the kernel takes."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    return functools.partial(_run, kind)


#: Below this many elements torch's ``mul_`` is as quick as a C call from Python.
_SCALE_MIN_ELEMENTS = 1 << 16


def scale_(grad: Tensor, grad_output: Tensor) -> bool:
    """``grad.mul_(grad_output)`` in C, when it takes the call; returns whether it did (else the caller
    runs ``mul_``).

    It takes a contiguous CPU ``grad`` of at least ``_SCALE_MIN_ELEMENTS`` elements and a ``grad_output``
    of the same floating dtype that broadcasts to it along one consecutive block of dims (a per-row loss
    against a (N, C) gradient, say: the class dim; or none, or all), reading ``grad_output`` in place
    (a broadcast scalar is read once; stride-0 dims count as broadcast). Each product is formed as
    torch's ``mul_`` forms it (in float for bfloat16 and float16) and rounded once: the same bits, in one
    read and one write of ``grad`` split over threads. On a 1024x8192 gradient just written by a kernel
    (the backward's situation), times a per-row grad_output, this machine: torch's ``mul_`` 5.2 ms
    (float32) and 5.4 ms (bfloat16), this pass 2.3 and 4.3 ms (repeated on one tensor, ``mul_`` is the
    faster: 0.9 against 1.3 ms).
    """
    if (grad.device.type != "cpu" or grad_output.device != grad.device or grad.dtype not in _FLOATING
            or grad_output.dtype != grad.dtype or not grad.is_contiguous() or grad.numel() < _SCALE_MIN_ELEMENTS
            or not native.available(EXTENSION) or grad_output.dim() > grad.dim()):
        return False
    try:
        go = grad_output.expand(grad.shape)
    except RuntimeError:
        return False  # not broadcastable: mul_ raises torch's error
    # (A, C, B): the dims before the broadcast block (stride 0 in go; dims of size 1 go either way), the
    # block, the dims after
    dims = [k for k, (size, stride) in enumerate(zip(grad.shape, go.stride())) if stride == 0 and size != 1]
    if dims and dims != list(range(dims[0], dims[-1] + 1)):
        return False  # two broadcast blocks: not one (A, C, B) pattern
    lo, hi = (dims[0], dims[-1] + 1) if dims else (0, 0)
    s = go[tuple(0 if lo <= k < hi else slice(None) for k in range(grad.dim()))]  # (P..., S...), a view
    if not s.is_contiguous():
        if s.numel() * 4 > grad.numel():
            return False  # a copy of grad_output would be a sizeable share of the gradient: mul_
        s = s.contiguous()
    a, c = math.prod(grad.shape[:lo]), math.prod(grad.shape[lo:hi])
    native.module(EXTENSION).scale(grad.data_ptr(), s.data_ptr(), _FLOATING[grad.dtype], a, c,
                                   math.prod(grad.shape[hi:]), native.threads_for(grad.numel()))
    return True
