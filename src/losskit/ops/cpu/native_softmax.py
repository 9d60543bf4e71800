"""Compiled CPU row kernels of softmax, log_softmax, entropy and nll_loss (C extension ``_native_softmax``).

Reference expressions (per row of ``C`` entries along the reduced dimension; the tests use them):

* ``softmax_rows``: ``torch.softmax(x, dim)`` / ``torch.log_softmax(x, dim)``;
* ``softmax_backward_rows``: ``y * (g - (g * y).sum(dim, keepdim=True))`` for softmax and
  ``g - y.exp() * g.sum(dim, keepdim=True)`` for log_softmax, from the saved output ``y``;
* ``entropy_rows``: ``-torch.xlogy(q, q).sum(dim)`` with ``q = x.softmax(dim)`` (logits) or ``q = x``
  (probabilities), and its gradient (see :func:`losskit.functional.entropy`);
* ``nll_rows``: ``-w[y] * x[n, y, l]`` per position (0 where ``y == ignore_index``) and the gradient
  of the reduced loss, zeros but ``-w[y] * scale`` at each target.

Each row is read from memory once and its output (or gradient) written once: the later passes over a
row find it in L1/L2 (see ``_native_softmax_rows.h``); one exp per element. Rows whose entries are
strided (the reduced dim not innermost, ``L > 1``; C up to 4096) and rows shorter than 16 run 8
(float64: 4) at a time in column tiles, one row per vector lane, so that memory is read in runs and the
per-row cost is shared. Rows (or tiles) are split over :func:`losskit.ops.cpu.native.threads_for`
threads. Operands are ``(N, C, L)`` tensors of any strides
(the reduced dimension in the middle, as :func:`losskit.ops.blocks.as_3d` gives for classes);
float32/float64/bfloat16/float16 are read and written as they are, and computed in float32 (float64 for
float64); when every operand is a contiguous bfloat16 row (the reduced dim innermost), rows are read and
written in registers as even/odd pairs with an exp of bfloat16 grade, and agree with the float rows' to
one bfloat16 step. There, the entropy of probabilities (p log p and its gradient) and log_softmax's
backward (exp of the saved output) read each element's function of its one bfloat16 operand from tables
over the 65536 bit patterns, filled by the float rows' own code: each entry is the float rows' value to
the bit (the entropy of probabilities equals the float rows' bit for bit; log_softmax's backward still
sums grad_output in pair order). log_softmax's forward sums ``exp(x)`` from a table in double, times
``exp(-max)`` (logits within about +-660; else the exps are computed), and stays torch's to the bit.
Outputs must be contiguous; :func:`losskit.ops.cpu.native.empty` allocates them.

Safety: every operand handed to C is checked here (CPU device, dtype, shape, contiguity of outputs,
target count and dtype); nll_loss targets are validated by the loss first and again by the kernel
before it indexes with them. Errors come back as ValueError/MemoryError, never as a crash.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native

#: The C extension built from ``_native_softmax.c``.
EXTENSION = "_native_softmax"

_OPS = {"softmax": 0, "log_softmax": 1, "softmax_backward": 2, "log_softmax_backward": 3, "entropy_logits": 4,
        "entropy_probs": 5}
#: nll_loss gradient tiles hold at least this many positions of one sample, and about ``_NLL_TILE``
#: elements: C = 8192 float32 -> 1 row of 32 KiB; C = 21 (segmentation), L = 512*512 -> 780 positions
#: (64 KiB), each class's segment 3 KiB contiguous. Zeros and the targets' values are written while
#: the tile is in L1/L2.
_NLL_MIN_WIDTH = 16
_NLL_TILE = 1 << 14


def _operand(name: str, t: Tensor, shape: tuple[int, int, int], *, output: bool = False) -> tuple[int, ...]:
    """The kernel's view of ``t`` (:func:`losskit.ops.cpu.native._view`), after checking that ``t`` is an
    ``(N, C, L)`` CPU tensor of ``shape`` and a floating dtype, and contiguous when the kernel writes it."""
    if not isinstance(t, Tensor):
        raise ValueError(f"native_softmax operand {name}: expected a tensor, got {type(t).__name__}")
    if output and not t.is_contiguous():
        raise ValueError(f"native_softmax operand {name}: an output must be contiguous, got strides {t.stride()}")
    try:
        return native._view(t, shape)
    except ValueError as err:
        raise ValueError(f"native_softmax operand {name}: {err}") from None


def _dims(x3: Tensor) -> tuple[int, int, int]:
    if not isinstance(x3, Tensor) or x3.dim() != 3:
        raise ValueError(f"native_softmax operand x: expected an (N, C, L) tensor, got "
                         f"{tuple(x3.shape) if isinstance(x3, Tensor) else type(x3).__name__}")
    n, c, length = x3.shape
    return n, c, length


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(op: str, x3: Tensor, g3: Tensor | None, out3: Tensor | None, per_row: Tensor | None, acc: torch.dtype,
          threads: int | None) -> None:
    n, c, length = _dims(x3)
    shape = (n, c, length)
    views = (_operand("x", x3, shape), _operand("g", g3, shape) if g3 is not None else native._view(None),
             _operand("out", out3, shape, output=True) if out3 is not None else native._view(None))
    if per_row is not None and (per_row.dtype != acc or not per_row.is_contiguous() or per_row.numel() != n * length
                                or per_row.device.type != "cpu"):
        raise ValueError(f"native_softmax operand per_row: expected ({n}, {length}) contiguous {acc} on the CPU, got "
                         f"{tuple(per_row.shape)} {per_row.dtype} on {per_row.device}")
    if n * length == 0 or c == 0:
        return
    native.module(EXTENSION).rows(_OPS[op], *views, 0 if per_row is None else per_row.data_ptr(), n * length, length,
                                  c, acc == torch.float64, threads if threads is not None else
                                  native.threads_for(x3.numel()))


def softmax_rows(x3: Tensor, out3: Tensor, *, log: bool, threads: int | None = None) -> None:
    """``out3 = softmax(x3, 1)`` (``log_softmax`` if ``log``); ``x3`` (N, C, L) any strides, ``out3``
    contiguous (N, C, L) of any floating dtype, the accumulation dtype following ``out3``'s (``x3`` is
    converted on load, as ``torch.softmax(x, dtype=...)`` converts its input)."""
    _rows("log_softmax" if log else "softmax", x3, None, out3, None, _acc(out3.dtype), threads)


def softmax_backward_rows(y3: Tensor, g3: Tensor, out3: Tensor, *, log: bool, threads: int | None = None) -> None:
    """``out3`` = the input gradient of softmax (``log_softmax`` if ``log``) along dim 1 from its output
    ``y3`` and ``grad_output`` ``g3`` (both (N, C, L), any strides); ``out3`` contiguous (N, C, L)."""
    _rows("log_softmax_backward" if log else "softmax_backward", y3, g3, out3, None, _acc(y3.dtype), threads)


def entropy_rows(x3: Tensor, h: Tensor, grad3: Tensor | None, *, logits: bool, threads: int | None = None) -> None:
    """Entropy of each row of ``x3`` (N, C, L) along dim 1 into ``h`` ((N, L) contiguous, accumulation
    dtype of ``x3``), and its gradient into ``grad3`` (contiguous (N, C, L)) unless None."""
    _rows("entropy_logits" if logits else "entropy_probs", x3, None, grad3, h, _acc(x3.dtype), threads)


def nll_rows(x3: Tensor, target: Tensor, grad3: Tensor | None, weight: Tensor | None, loss: Tensor, *,
             ignore_index: int, scale: float, threads: int | None = None) -> None:
    """nll_loss of every position of ``x3`` (N, C, L) log-probabilities, any strides.

    ``target``: (N*L,) contiguous int64 in [0, C) or ``ignore_index``. ``loss``: (N, L) contiguous in the
    accumulation dtype, receives ``-w[y] x[n, y, l]`` (0 where ignored). ``grad3``: contiguous (N, C, L)
    that receives zeros and ``-w[y] * scale`` at each non-ignored target, or None. ``weight``: (C,)
    contiguous in the accumulation dtype, or None.
    """
    n, c, length = _dims(x3)
    shape = (n, c, length)
    acc = _acc(x3.dtype)
    x_view = _operand("x", x3, shape)
    g_view = _operand("grad", grad3, shape, output=True) if grad3 is not None else native._view(None)
    if (not isinstance(target, Tensor) or target.dtype != torch.int64 or not target.is_contiguous()
            or target.numel() != n * length or target.device.type != "cpu"):
        raise ValueError(f"native_softmax operand target: expected ({n * length},) contiguous int64 on the CPU, got "
                         f"{getattr(target, 'shape', type(target).__name__)} {getattr(target, 'dtype', '')}")
    if loss.dtype != acc or not loss.is_contiguous() or loss.numel() != n * length or loss.device.type != "cpu":
        raise ValueError(f"native_softmax operand loss: expected ({n}, {length}) contiguous {acc} on the CPU, got "
                         f"{tuple(loss.shape)} {loss.dtype}")
    if weight is not None and (weight.dtype != acc or not weight.is_contiguous() or weight.numel() != c
                               or weight.device.type != "cpu"):
        raise ValueError(f"native_softmax operand weight: expected ({c},) contiguous {acc} on the CPU, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if n * length == 0:
        return
    width = min(length, max(_NLL_MIN_WIDTH, _NLL_TILE // max(1, c)))  # c = 0: the kernel's size check refuses it
    tiles = n * -(-length // width)
    native.module(EXTENSION).nll(x_view, target.data_ptr(), loss.data_ptr(), 0 if weight is None else weight.data_ptr(),
                                 g_view[0], g_view[1], n, length, c, width, int(ignore_index), float(scale),
                                 acc == torch.float64, threads if threads is not None else
                                 min(native.threads_for(x3.numel() if grad3 is not None else 0), tiles))

