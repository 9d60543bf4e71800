"""Compiled CPU kernels of the binary losses (``impl="compiled"``): the C extension ``_native_binary``.

Reference expressions: the per-element loss and gradients of the pure-torch kernels of
:mod:`losskit.functional._binary` (``_bce_kernel``, ``_bce_logits_kernel``, ``_soft_margin_kernel``,
``_focal_kernel``), i.e. torch's ``F.binary_cross_entropy``, ``F.binary_cross_entropy_with_logits``,
``F.multilabel_soft_margin_loss`` and torchvision's ``sigmoid_focal_loss`` with their backward formulas,
each gradient times the reduction's factor. One call does ``n`` contiguous elements in blocks of 4 KiB of
the accumulation type (float32, float64 for float64 operands), split over threads: each input is read once,
each gradient (and the unreduced loss) written once, in the storage dtype (float16, and bfloat16 with a
weight or pos_weight, converted to float in cache; bfloat16 otherwise in registers, 16 elements as 8 words
read and written in pairs, see ``_native_binary.h``). Per element one exp and one log1p (logit losses) or
one log and one log1p (BCE), the vector functions of ``_native_common.h`` and ``_native_log.h`` (log: < 1
ulp, log1p: < 1.5 ulp, exp: < 1.1 ulp, measured); for a bfloat16 input, a read of tables over its 65536
bit patterns that hold those functions' float results (1.25 MiB, built on the first bfloat16 call), so
bfloat16 results are the float path's rounded once, bit for bit. Loss sums: per-lane sums over a block, blocks added in
double in block order, so the result does not depend on the thread count.

:func:`binary` checks every operand it hands to C (CPU, dtype, contiguity, element counts; a broadcast
constant's period is its element count), so a wrong operand is a ValueError, never a stray access. BCE's
[0, 1] domain is checked by the kernel in the same pass (no separate read of input and target); an
out-of-range value is reported as ``_checks.in_unit_interval`` reports it, with the value, and no
result is returned.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ... import _checks
from ..reference import elementwise
from . import native, native_elementwise
from ..reference.elementwise import Kernel, Runner

#: The extension module's name under ``losskit.ops.cpu``.
EXTENSION = "_native_binary"
#: Loss kinds of the C kernel.
KINDS = {"bce": 0, "logits": 1, "soft_margin": 2, "focal": 3}
_DTYPE_CODES = native._DTYPE_CODES  # the storage dtypes of _native_common.h

#: A broadcast constant as the kernel takes it: ``(values, start, div)``, element ``j`` of the call being
#: ``values[((start + j) // div) % values.numel()]``; ``values`` contiguous in the accumulation dtype.
Periodic = tuple[Tensor, int, int]


def _operand(name: str, t: Tensor | None, n: int, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """``(data_ptr, dtype code)`` of a contiguous CPU tensor of ``n`` elements (of ``dtype`` if given)."""
    if t is None:
        return (0, 0)
    if (t.device.type != "cpu" or not t.is_contiguous() or t.numel() != n or t.dtype not in _DTYPE_CODES
            or (dtype is not None and t.dtype != dtype)):
        want = dtype if dtype is not None else "a floating dtype"
        raise ValueError(f"native binary kernel operand {name}: expected {n} contiguous elements of {want} on the "
                         f"CPU, got {tuple(t.shape)} {t.dtype} on {t.device} (contiguous: {t.is_contiguous()})")
    return (t.data_ptr(), _DTYPE_CODES[t.dtype])


def _periodic(name: str, c: Periodic | None, acc: torch.dtype) -> tuple[int, int, int, int]:
    if c is None:
        return (0, 0, 1, 1)
    values, start, div = c
    if (values.device.type != "cpu" or not values.is_contiguous() or values.dtype != acc or values.numel() < 1
            or start < 0 or div < 1):
        raise ValueError(f"native binary kernel operand {name}: expected contiguous {acc} CPU values with start >= 0 "
                         f"and div >= 1, got {tuple(values.shape)} {values.dtype} on {values.device}, start={start}, "
                         f"div={div}")
    return (values.data_ptr(), int(start), int(div), values.numel())


def binary(kind: str, x: Tensor, y: Tensor, gx: Tensor | None, gy: Tensor | None, out: Tensor | None,
           constants: Sequence[Periodic | None], *, row_len: int, scale: float, acc: torch.dtype,
           alpha: float = 0.0, gamma: float = 0.0, threads: int | None = None) -> float:
    """Loss and gradients of the ``n = x.numel()`` elements of contiguous ``x`` and ``y``, in one call.

    ``gx``, ``gy``: outputs (``x``'s and ``y``'s dtype, n elements) for ``scale * dloss/dx`` and
    ``scale * dloss/dy``, or None. ``out``: the per-element loss (n elements of a dtype whose accumulation
    dtype is ``acc``) or, with ``row_len > 0``, the loss sum of each row of ``row_len`` elements
    (``n // row_len`` elements of ``acc``); or None. ``constants``: ``(weight, pos_weight)`` (focal: none)
    as :data:`Periodic` or None. Returns the sum of the losses (0 when ``out`` is given).
    """
    ext = native.module(EXTENSION)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if acc not in (torch.float32, torch.float64):
        raise ValueError(f"acc must be float32 or float64, got {acc}")
    n = x.numel()
    if row_len < 0 or (row_len > 0 and n % row_len):
        raise ValueError(f"row_len must be >= 0 and divide the element count {n}, got {row_len}")
    if out is not None and row_len == 0 and (out.dtype == torch.float64) != (acc == torch.float64):
        raise ValueError(f"out: a {out.dtype} loss is not accumulated in {acc}")
    w, p = (*constants, None, None)[:2]
    views = (_operand("x", x, n), _operand("y", y, n), _operand("gx", gx, n, x.dtype), _operand("gy", gy, n, y.dtype),
             _operand("out", out, n // row_len if row_len else n, acc if row_len else None))
    if n == 0:
        return 0.0
    try:
        return ext.binary(KINDS[kind], acc == torch.float64, *views, _periodic("weight", w, acc),
                          _periodic("pos_weight", p, acc), n, row_len, float(alpha), float(gamma), float(scale),
                          threads if threads is not None else native.threads_for(n))
    except ValueError:
        if kind == "bce":  # the kernel found a value outside [0, 1]: report it with the value
            _checks.in_unit_interval("input", x)
            _checks.in_unit_interval("target", y)
        raise


def _periodic_values(c: Tensor, shape: torch.Size, acc: torch.dtype) -> tuple[Tensor, int] | None:
    """``(values, div)`` with ``c.expand(shape).flatten()[i] == values[(i // div) % values.numel()]``, or
    None when ``c`` varies along dims that are not one consecutive block (``(N, 1, L)`` against
    ``(N, C, L)``), or would need a copy larger than a piece (a full-size constant of another dtype)."""
    sizes = ([1] * len(shape) + list(c.shape))[len(c.shape):]  # c's sizes aligned to the input's dims
    dims = [k for k, size in enumerate(sizes) if size != 1]
    if not dims:
        return c.reshape(1).to(acc), 1
    lo, hi = dims[0], dims[-1] + 1
    if any(sizes[k] != shape[k] for k in range(lo, hi)):
        return None
    if (c.dtype != acc or not c.is_contiguous()) and c.numel() > elementwise.CHUNK:
        return None
    return c.reshape(-1).to(acc).contiguous(), math.prod(shape[hi:])


def _run(kind: str, alpha: float, gamma: float, kernel: Kernel, operands: Sequence[Tensor | None],
         want: Sequence[bool], *, acc: torch.dtype, out_dtype: torch.dtype, keep: bool,
         grad_scale: Tensor | float = 1.0, sum_last_dim: bool = False) -> tuple[Tensor, list[Tensor | None]]:
    """:func:`losskit.ops.reference.elementwise.run` of ``kernel`` (the reference of ``kind``), computed in C.

    ``operands``: input, target, then weight and pos_weight (BCE with logits) or weight (BCE, soft
    margin), each broadcastable to the input or None. Contiguous input and target with constants that
    repeat along the flattened input (a scalar, a trailing ``(C,)`` or ``(L, C)``, a per-row ``(N, 1)``)
    are one call, the constants read in place; otherwise :func:`native_elementwise.run` feeds pieces.
    """
    del kernel  # the reference expression; the C kernel of ``kind`` computes the same
    x, y, *constants = operands
    shape, device = x.shape, x.device
    grads = [native.empty(op.shape, op.dtype, device) if wanted else None for op, wanted in zip(operands, want)]
    gx, gy = grads[:2]
    rows = keep and sum_last_dim
    row_len = shape[-1] if rows else 0
    if rows:
        out = torch.zeros(shape[:-1], dtype=acc, device=device)  # row sums; a row of 0 entries stays 0
    else:
        out = native.empty(shape, out_dtype, device) if keep else None
    params = {"scale": float(grad_scale), "acc": acc, "alpha": alpha, "gamma": gamma}
    periodic = [None if c is None else _periodic_values(c, shape, acc) for c in constants]
    if x.numel() == 0:
        total = 0.0
    elif (x.is_contiguous() and y.is_contiguous() and y.is_floating_point()
            and all(p is not None for c, p in zip(constants, periodic) if c is not None)):
        consts = [None if p is None else (p[0], 0, p[1]) for p in periodic]
        total = binary(kind, x, y, gx, gy, out, consts, row_len=row_len, **params)
    else:
        def call(ins: Sequence[Tensor | None], outs: Sequence[Tensor | None]) -> float:
            xp, yp, *cs = ins
            o, gxp, gyp = outs
            return binary(kind, xp, yp if yp.is_floating_point() else yp.to(acc), gxp, gyp, o,
                          [None if c is None else (c.to(acc).reshape(-1), 0, 1) for c in cs],
                          row_len=row_len if o is not None else 0, **params)

        total = native_elementwise.run(call, operands, (out, gx, gy), shape, one_call=False)
    if keep:
        return out, grads
    return torch.tensor([total], dtype=acc, device=device), grads


def binary_runner(kind: str, *, alpha: float = 0.0, gamma: float = 0.0) -> Runner:
    """The compiled runner of ``kind`` (with focal's ``alpha`` and ``gamma``): a function with the
    signature of :func:`losskit.ops.reference.elementwise.run` that computes it in C. Integer targets are
    converted; :mod:`losskit.ops._dispatch` sends only dtypes the kernel stores."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return functools.partial(_run, kind, float(alpha), float(gamma))


def log_(x: Tensor, *, plus1: bool = False) -> Tensor:
    """The kernels' vector log (``log1p`` if ``plus1``), in place, of a contiguous float32/float64 CPU tensor."""
    ext = native.module(EXTENSION)
    if x.device.type != "cpu" or not x.is_contiguous() or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be a contiguous float32/float64 CPU tensor, got {x.dtype} on {x.device}")
    ext.log(x.data_ptr(), x.numel(), x.dtype == torch.float64, plus1)
    return x
