"""Triton row kernels of softmax, log_softmax (forward and backward) and entropy; the GPU twins of
:mod:`losskit.ops.cpu.native_softmax`, with the same signatures and semantics.

Reference expressions (per row of ``C`` entries along dim 1 of an ``(N, C, L)`` operand):

* ``softmax_rows``: ``torch.softmax(x, 1, dtype=out.dtype)`` / ``torch.log_softmax(x, 1, dtype=out.dtype)``;
* ``softmax_backward_rows``: ``y * (g - (g * y).sum(1, keepdim=True))`` (softmax) and
  ``g - y.exp() * g.sum(1, keepdim=True)`` (log_softmax), from the saved output ``y``;
* ``entropy_rows``: ``-torch.xlogy(q, q).sum(1)`` with ``q = x.softmax(1)`` (logits) or ``q = x``
  (probabilities), and its gradient, with the conventions of :func:`losskit.functional.entropy` (the
  torch path's ``_entropy_rows_`` in :mod:`losskit.functional._divergence`).

Layout (:mod:`._tiles`: :class:`~._tiles.Tiling` sizes the tiles, :class:`~._tiles.RowTiles` lays them).
A program takes a tile of ``BLOCK_R`` rows and walks their ``C`` columns in blocks of ``BLOCK_C``, so any C
(262144 and beyond) runs in registers of a fixed size. With the reduced dim innermost (``L == 1``) a tile
is ``BLOCK_R`` consecutive samples, each a contiguous row, and loads run along the columns (16-byte
vectors per thread when the row starts are aligned). Where the entries of a row are strided (``L > 1``,
say ``(N, C, H*W)``, or an ``(N, C)`` view of a ``(C, N)`` tensor) a program that owned one row would
fetch a 32-byte sector for each 2- or 4-byte element. A tile is therefore ``BLOCK_R >= 32`` consecutive
positions ``l`` of one sample: for each class they are adjacent in memory (stride 1, which Triton
specialises and so knows), the compiler lays the tile out along them (32 lanes of a warp on 32
positions of one class, checked in the TTGIR), and every load reads runs of 32 adjacent elements (64 or
128 bytes). Every operand, the outputs too, is addressed through its own strides, in 64-bit offsets; a
stride of 1 costs no multiply.

Precision: every operand is converted to float32 on load and every sum is a float32 sum; one rounding to
the output dtype on store. float64 operands are refused (ValueError naming the dtype): they run on the
C or torch backends.

Softmax rows use the online max/sum: each block's max ``m'`` rescales the running sum by ``exp(m - m')``
(and the entropy's running ``sum e z`` by ``exp(m - m')`` after shifting it by ``(m - m') s``), one exp
per element and pass. A row that fits one block (``C <= BLOCK_C``) is kept in registers between the
reduction and the write. Bytes moved per element (``sx``, ``sy``, ``sg``, ``so``: the operands' and the
output's element sizes; the per-row ``h`` is 4 bytes per row)::

    kernel                        C <= BLOCK_C            C > BLOCK_C
    softmax / log_softmax         sx + so                 2 sx + so
    softmax backward              sy + sg + so            2 (sy + sg) + so
    log_softmax backward          sy + sg + so            sy + 2 sg + so
    entropy of logits             sx (+ so for grad)      2 sx + so with grad, sx without
    entropy of probabilities      sx (+ so for grad)      the same: one pass

The second pass over a long row walks its blocks in reverse, so that it starts with the blocks the first
pass read last, which are the likeliest still to be in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._math import running_max
from ._tiles import RowTiles, Tiling, check_dtypes, load_tile, store_tile, tile_mask, tile_rows

#: Tiles of 8192 elements at 16 per thread: 16 warps for a full tile, whose limit is 128 registers a
#: thread. ptxas for sm_90a (compiled ahead of time) gives 32-64 registers for rows of (1, 8192) and
#: (128, 64), 66-116 for (32, 256) position tiles (float32 entropy the most), no spills; 32 elements per
#: thread (8 warps) took 126-210 and 4 warps spilled.
_TILING = Tiling(elements=8192, per_thread=16)

_SOFTMAX, _LOG_SOFTMAX, _ENTROPY = 0, 1, 2


# ---- device helpers -------------------------------------------------------------------------------

@triton.jit
def _load_x(x_ptr, out_ptr, base, cols, sc, mask, ROUND: tl.constexpr):
    """A tile of softmax input, -inf outside ``mask``; ROUND: x rounded to out's dtype first, as
    ``torch.softmax(x, dtype=...)`` casts x before the operation."""
    x = load_tile(x_ptr, base, cols, sc, mask, float("-inf"))
    if ROUND:
        x = x.to(out_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _absorb(m, s, a, x, ENTROPY: tl.constexpr):
    """Online softmax statistics of a row after one more block ``x``: max ``m``, ``s = sum exp(x - m)``,
    and (entropy) ``a = sum e z`` with ``z = x - m`` (a -inf entry, ``e = 0``, adds 0). Returns them and
    the block's ``e = exp(x - shift)``, where ``shift = m`` but 0 while the row has only -inf (its ``e``
    and ``s`` are then 0, see :func:`._math.running_max`)."""
    m_new, shift, alpha = running_max(m, x)
    e = tl.exp(x - shift[:, None])
    if ENTROPY:
        # sum e z about the new max: each earlier term is scaled by alpha and its z moves by m - m_new
        ez = tl.sum(tl.where(e == 0, 0.0, e * (x - shift[:, None])), axis=1)
        a = tl.where(s > 0, alpha * (a + (m - shift) * s), 0.0) + ez
    return m_new, s * alpha + tl.sum(e, axis=1), a, e


@triton.jit
def _emit(out_ptr, obase, cols, soc, mask, x, e, m, s, mz, MODE: tl.constexpr):
    """Write one block of the output from its input ``x`` and ``e = exp(x - m)``: softmax ``e / s``,
    log_softmax ``x - m - log s``, entropy gradient ``e (mz - (x - m)) / s`` (0 where e = 0, NaN if s is)."""
    if MODE == 0:
        y = e / s[:, None]
    elif MODE == 1:
        y = (x - m[:, None]) - tl.log(s)[:, None]
    else:
        y = tl.where(e == 0, 0.0, e * (mz[:, None] - (x - m[:, None]))) / s[:, None]
    store_tile(out_ptr, obase, cols, soc, mask, y)


# ---- kernels ------------------------------------------------------------------------------------

@triton.jit
def _softmax_kernel(x_ptr, sxn, sxc, sxl, out_ptr, son, soc, sol, h_ptr, C, L,
                    MODE: tl.constexpr, WRITE: tl.constexpr, ROUND: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """softmax (MODE 0), log_softmax (1) or entropy of logits (2: ``h`` per row, gradient if WRITE) of
    ``BLOCK_R`` rows; ROUND: see :func:`_load_x`."""
    r, rmask, n, l = tile_rows(L, BLOCK_R)
    base, obase = n * sxn + l * sxl, n * son + l * sol
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_R,), tl.float32)
    a = tl.zeros((BLOCK_R,), tl.float32)
    cols = tl.arange(0, BLOCK_C)
    if BLOCK_C >= C:  # the row in registers: one read, one exp per element
        mask = tile_mask(rmask, cols, C)
        x = _load_x(x_ptr, out_ptr, base, cols, sxc, mask, ROUND)
        m, s, a, e = _absorb(m, s, a, x, MODE == 2)
        mz = a / s
        if WRITE:
            _emit(out_ptr, obase, cols, soc, mask, x, e, m, s, mz, MODE)
    else:
        for c0 in range(0, C, BLOCK_C):
            x = _load_x(x_ptr, out_ptr, base, c0 + cols, sxc, tile_mask(rmask, c0 + cols, C), ROUND)
            m, s, a, e = _absorb(m, s, a, x, MODE == 2)
        mz = a / s
        if WRITE:
            blocks = tl.cdiv(C, BLOCK_C)
            for i in range(blocks):  # last block first: the likeliest still in L2
                c = (blocks - 1 - i) * BLOCK_C + cols
                mask = tile_mask(rmask, c, C)
                x = _load_x(x_ptr, out_ptr, base, c, sxc, mask, ROUND)
                e = x  # log_softmax needs no exp
                if MODE != 1:
                    e = tl.exp(x - m[:, None])  # NaN for a row of only -inf (m = -inf), as torch
                _emit(out_ptr, obase, c, soc, mask, x, e, m, s, mz, MODE)
    if MODE == 2:
        tl.store(h_ptr + r, tl.log(s) - mz, mask=rmask)  # log s - sum p z, both terms >= 0


@triton.jit
def _entropy_probs_kernel(p_ptr, spn, spc, spl, grad_ptr, sgn, sgc, sgl, h_ptr, C, L,
                          WRITE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``h = -sum xlogy(p, p)`` and (WRITE) ``grad = -(log p + 1)``, 0 where p == 0; one pass."""
    r, rmask, n, l = tile_rows(L, BLOCK_R)
    base, gbase = n * spn + l * spl, n * sgn + l * sgl
    cols = tl.arange(0, BLOCK_C)
    h = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        mask = tile_mask(rmask, c0 + cols, C)
        p = load_tile(p_ptr, base, c0 + cols, spc, mask, 0.0)
        lp = tl.log(p)  # -inf at 0, NaN below
        absent = p == 0
        h -= tl.sum(tl.where(absent, 0.0, p * lp), axis=1)
        if WRITE:
            store_tile(grad_ptr, gbase, c0 + cols, sgc, mask, tl.where(absent, 0.0, -(lp + 1.0)))
    tl.store(h_ptr + r, h, mask=rmask)


@triton.jit
def _softmax_backward_kernel(y_ptr, syn, syc, syl, g_ptr, sgn, sgc, sgl, out_ptr, son, soc, sol, C, L,
                             LOG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out = y (g - sum g y)`` (softmax) or ``g - exp(y) sum g`` (log_softmax, LOG) of BLOCK_R rows."""
    _, rmask, n, l = tile_rows(L, BLOCK_R)
    ybase, gbase, obase = n * syn + l * syl, n * sgn + l * sgl, n * son + l * sol
    cols = tl.arange(0, BLOCK_C)
    if BLOCK_C >= C:  # the row in registers: one read of y and g
        mask = tile_mask(rmask, cols, C)
        y = load_tile(y_ptr, ybase, cols, syc, mask, 0.0)
        g = load_tile(g_ptr, gbase, cols, sgc, mask, 0.0)
        dot = tl.sum(g if LOG else g * y, axis=1)
        store_tile(out_ptr, obase, cols, soc, mask, _softmax_gin(y, g, dot, LOG))
    else:
        dot = tl.zeros((BLOCK_R,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            mask = tile_mask(rmask, c0 + cols, C)
            g = load_tile(g_ptr, gbase, c0 + cols, sgc, mask, 0.0)
            if LOG:
                dot += tl.sum(g, axis=1)
            else:
                dot += tl.sum(g * load_tile(y_ptr, ybase, c0 + cols, syc, mask, 0.0), axis=1)
        blocks = tl.cdiv(C, BLOCK_C)
        for i in range(blocks):  # last block first: the likeliest still in L2
            c = (blocks - 1 - i) * BLOCK_C + cols
            mask = tile_mask(rmask, c, C)
            y = load_tile(y_ptr, ybase, c, syc, mask, 0.0)
            g = load_tile(g_ptr, gbase, c, sgc, mask, 0.0)
            store_tile(out_ptr, obase, c, soc, mask, _softmax_gin(y, g, dot, LOG))


@triton.jit
def _softmax_gin(y, g, dot, LOG: tl.constexpr):
    if LOG:
        return g - tl.exp(y) * dot[:, None]
    return y * (g - dot[:, None])


# ---- wrappers -----------------------------------------------------------------------------------

def _empty(x3: Tensor) -> bool:
    return x3.numel() == 0  # no rows, or rows of no columns


def _forward(x3: Tensor, out3: Tensor | None, h: Tensor | None, mode: int, block: int | None) -> None:
    if _empty(x3):
        return
    geo = RowTiles.of(x3, _TILING, block)
    out = out3 if out3 is not None else x3  # not written (WRITE False)
    _softmax_kernel[geo.grid](*geo.strided(x3), *geo.strided(out), h if h is not None else x3, x3.shape[1],
                              geo.length, MODE=mode, WRITE=out3 is not None, ROUND=out.dtype != x3.dtype,
                              **geo.options)


def softmax_rows(x3: Tensor, out3: Tensor, *, log: bool, block: int | None = None) -> None:
    """``out3 = softmax(x3, 1)`` (``log_softmax`` if ``log``); ``x3`` (N, C, L) any strides, ``out3``
    contiguous (N, C, L). ``x3`` is converted to ``out3``'s dtype on load, as ``torch.softmax(x,
    dtype=out3.dtype)`` casts its input; computed in float32. ``block``: BLOCK_C (tests)."""
    check_dtypes(x3=x3, out3=out3)
    _forward(x3, out3, None, _LOG_SOFTMAX if log else _SOFTMAX, block)


def softmax_backward_rows(y3: Tensor, g3: Tensor, out3: Tensor, *, log: bool, block: int | None = None) -> None:
    """``out3`` = the input gradient of softmax (``log_softmax`` if ``log``) along dim 1 from its output
    ``y3`` and ``grad_output`` ``g3`` (both (N, C, L), any strides); ``out3`` contiguous (N, C, L)."""
    check_dtypes(y3=y3, g3=g3, out3=out3)
    if _empty(y3):
        return
    geo = RowTiles.of(y3, _TILING, block)
    _softmax_backward_kernel[geo.grid](*geo.strided(y3), *geo.strided(g3), *geo.strided(out3), y3.shape[1],
                                       geo.length, LOG=log, **geo.options)


def entropy_rows(x3: Tensor, h: Tensor, grad3: Tensor | None, *, logits: bool, block: int | None = None) -> None:
    """Entropy of each row of ``x3`` (N, C, L) along dim 1 into ``h`` ((N, L) contiguous float32), and its
    gradient into ``grad3`` (contiguous (N, C, L)) unless None. ``x3``: logits if ``logits``, else
    probabilities."""
    check_dtypes(x3=x3, grad3=grad3)
    if h.dtype != torch.float32:
        raise ValueError(f"h must be float32, got {h.dtype}")
    if logits:
        _forward(x3, grad3, h, _ENTROPY, block)
    elif not _empty(x3):
        geo = RowTiles.of(x3, _TILING, block)
        _entropy_probs_kernel[geo.grid](*geo.strided(x3), *geo.strided(grad3 if grad3 is not None else x3), h,
                                        x3.shape[1], geo.length, WRITE=grad3 is not None, **geo.options)
