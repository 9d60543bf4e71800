"""Triton row kernels of softmax, log_softmax (forward and backward) and entropy; the GPU twins of
:mod:`losskit.ops.cpu.native_softmax`, with the same signatures and semantics.

Reference expressions (per row of ``C`` entries along dim 1 of an ``(N, C, L)`` operand):

* ``softmax_rows``: ``torch.softmax(x, 1, dtype=out.dtype)`` / ``torch.log_softmax(x, 1, dtype=out.dtype)``;
* ``softmax_backward_rows``: ``y * (g - (g * y).sum(1, keepdim=True))`` (softmax) and
  ``g - y.exp() * g.sum(1, keepdim=True)`` (log_softmax), from the saved output ``y``;
* ``entropy_rows``: ``-torch.xlogy(q, q).sum(1)`` with ``q = x.softmax(1)`` (logits) or ``q = x``
  (probabilities), and its gradient, with the conventions of :func:`losskit.functional.entropy` (the
  torch path's ``_entropy_rows_`` in :mod:`losskit.functional._divergence`).

Layout. A program takes a tile of ``BLOCK_R`` rows and walks their ``C`` columns in blocks of
``BLOCK_C``, so any C (262144 and beyond) runs in registers of a fixed size (:func:`_launch` says how the
sizes are chosen). With the reduced dim innermost (``L == 1``) a tile is ``BLOCK_R`` consecutive samples,
each a contiguous row, and loads run along the columns (16-byte vectors per thread when the row starts
are aligned). With ``L > 1`` (say ``(N, C, H*W)``) the entries of a row lie ``L`` elements apart, and a
program that owned one row would fetch a 32-byte sector for each 2- or 4-byte element. A tile is
therefore ``BLOCK_R >= 32`` consecutive positions ``l`` of one sample: for each class they are adjacent
in memory (stride 1, which Triton specialises and so knows), the compiler lays the tile out along them
(32 lanes of a warp on 32 positions of one class, checked in the TTGIR), and every load reads runs of 32
adjacent elements (64 or 128 bytes). Every operand is addressed through its own strides, in 64-bit
offsets (``n * stride_n`` passes 2^31 on large inputs); a stride of 1 costs no multiply.

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

#: Elements of one tile (BLOCK_R x BLOCK_C) per loop step: 16 per thread at 16 warps, whose limit is 128
#: registers a thread. ptxas for sm_90a (compiled ahead of time) gives 32-64 registers for rows of
#: (1, 8192) and (128, 64), 66-116 for (32, 256) position tiles (float32 entropy the most), no spills;
#: 32 elements per thread (8 warps) took 126-210 and 4 warps spilled.
_TILE = 8192
#: Positions per tile when the reduced dim is strided (L > 1): 32 adjacent elements per class per load.
_RUN = 32
#: Rows per tile at most, for short rows: 128 rows of C <= 64, so that a million rows still make
#: thousands of programs (enough for every SM of an H100, 132) while each amortises its row arithmetic.
_MAX_ROWS = 128
#: Elements per thread that :func:`_launch` aims for when choosing num_warps.
_PER_THREAD = 16

_SOFTMAX, _LOG_SOFTMAX, _ENTROPY = 0, 1, 2
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _launch(x3: Tensor, block: int | None) -> tuple[tuple[int], dict[str, int | bool]]:
    """The grid and the tile of an ``(N, C, L)`` operand: ``BLOCK_R`` rows of ``BLOCK_C`` columns.

    BLOCK_C: the row rounded up to a power of two (one block: one read per element), at most what leaves
    room in a ``_TILE`` for the ``_RUN`` positions that make strided (L > 1) loads coalesce. BLOCK_R:
    as many rows (L == 1: samples; L > 1: positions of one sample) as fill the tile, at least ``_RUN``
    positions, at most ``_MAX_ROWS`` and the rows there are. num_warps: ``_PER_THREAD`` elements of the
    tile per thread, 1 to 16 warps. ``block`` (tests): BLOCK_C itself, a power of two.
    """
    if block is not None and (block < 1 or block & (block - 1)):
        raise ValueError(f"block must be a power of two, got {block}")
    n, c, length = x3.shape
    positions = length > 1
    span = triton.next_power_of_2(length if positions else n)  # rows a tile can take
    run = min(_RUN, span) if positions else 1
    block_c = block or min(triton.next_power_of_2(c), _TILE // run)
    block_r = min(span, _MAX_ROWS, max(run, _TILE // block_c))
    grid = (n * triton.cdiv(length, block_r) if positions else triton.cdiv(n, block_r),)
    return grid, {"BLOCK_R": block_r, "BLOCK_C": block_c, "POSITIONS": positions,
                  "num_warps": min(16, max(1, block_r * block_c // (32 * _PER_THREAD)))}


def _check(**operands: Tensor | None) -> None:
    """Every operand in float32/bfloat16/float16 (float64 runs on the other backends)."""
    for name, t in operands.items():
        if t is not None and t.dtype not in _DTYPES:
            raise ValueError(f"triton softmax operand {name}: dtype {t.dtype} is not supported (float32, "
                             f"bfloat16 or float16; float64 runs on the C or torch backend)")


# ---- device helpers -------------------------------------------------------------------------------

@triton.jit
def _row_bases(pid, N, L, sn, sl, on, BLOCK_R: tl.constexpr, POSITIONS: tl.constexpr):
    """The rows of tile ``pid``: (row index ``n * L + l``, in range, input offset of (n, 0, l), output
    offset). POSITIONS (L > 1): ``BLOCK_R`` consecutive positions ``l`` of one sample ``n``, adjacent in
    memory when ``sl == 1`` (and known to be so by the compiler, which lays the tile out along them); else
    (L == 1) ``BLOCK_R`` consecutive samples."""
    if POSITIONS:
        tiles = tl.cdiv(L, BLOCK_R)
        n = (pid // tiles).to(tl.int64)
        l = (pid % tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        return n * L + l, l < L, n * sn + l.to(tl.int64) * sl, n * on + l
    n = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    return n, n < N, n * sn, n * on


@triton.jit
def _load(ptr, base, cols, sc, rmask, C, other):
    """(BLOCK_R, BLOCK_C) float32 tile of columns ``cols``; ``other`` outside the rows and columns."""
    offs = base[:, None] + cols.to(tl.int64)[None, :] * sc
    return tl.load(ptr + offs, mask=rmask[:, None] & (cols < C)[None, :], other=other).to(tl.float32)


@triton.jit
def _load_x(x_ptr, out_ptr, base, cols, sc, rmask, C, ROUND: tl.constexpr):
    """A tile of softmax input, -inf outside; ROUND: x rounded to out's dtype first, as
    ``torch.softmax(x, dtype=...)`` casts x before the operation."""
    x = _load(x_ptr, base, cols, sc, rmask, C, float("-inf"))
    if ROUND:
        x = x.to(out_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _store(ptr, base, cols, L, rmask, C, value):
    """Store a tile at the contiguous (N, C, L) output's rows ``base`` (column stride L)."""
    offs = base[:, None] + cols.to(tl.int64)[None, :] * L
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=rmask[:, None] & (cols < C)[None, :])


@triton.jit
def _absorb(m, s, a, x, ENTROPY: tl.constexpr):
    """Online softmax statistics of a row after one more block ``x``: max ``m``, ``s = sum exp(x - m)``,
    and (entropy) ``a = sum e z`` with ``z = x - m`` (a -inf entry, ``e = 0``, adds 0). Returns them and
    the block's ``e = exp(x - shift)``, where ``shift = m`` but 0 while the row has only -inf (its ``e``
    and ``s`` are then 0, and ``exp(-inf - -inf)`` never arises)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)  # 0 for the first finite block (m = -inf)
    e = tl.exp(x - shift[:, None])
    if ENTROPY:
        # sum e z about the new max: each earlier term is scaled by alpha and its z moves by m - m_new
        ez = tl.sum(tl.where(e == 0, 0.0, e * (x - shift[:, None])), axis=1)
        a = tl.where(s > 0, alpha * (a + (m - shift) * s), 0.0) + ez
    return m_new, s * alpha + tl.sum(e, axis=1), a, e


@triton.jit
def _emit(out_ptr, obase, cols, L, rmask, C, x, e, m, s, mz, MODE: tl.constexpr):
    """Write one block of the output from its input ``x`` and ``e = exp(x - m)``: softmax ``e / s``,
    log_softmax ``x - m - log s``, entropy gradient ``e (mz - (x - m)) / s`` (0 where e = 0, NaN if s is)."""
    if MODE == 0:
        y = e / s[:, None]
    elif MODE == 1:
        y = (x - m[:, None]) - tl.log(s)[:, None]
    else:
        y = tl.where(e == 0, 0.0, e * (mz[:, None] - (x - m[:, None]))) / s[:, None]
    _store(out_ptr, obase, cols, L, rmask, C, y)


# ---- kernels ------------------------------------------------------------------------------------

@triton.jit
def _softmax_kernel(x_ptr, out_ptr, h_ptr, N, C, L, sn, sc, sl, on,
                    MODE: tl.constexpr, WRITE: tl.constexpr, ROUND: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, POSITIONS: tl.constexpr):
    """softmax (MODE 0), log_softmax (1) or entropy of logits (2: ``h`` per row, gradient if WRITE) of
    ``BLOCK_R`` rows; ROUND: see :func:`_load_x`."""
    r, rmask, base, obase = _row_bases(tl.program_id(0), N, L, sn, sl, on, BLOCK_R, POSITIONS)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_R,), tl.float32)
    a = tl.zeros((BLOCK_R,), tl.float32)
    cols = tl.arange(0, BLOCK_C)
    if BLOCK_C >= C:  # the row in registers: one read, one exp per element
        x = _load_x(x_ptr, out_ptr, base, cols, sc, rmask, C, ROUND)
        m, s, a, e = _absorb(m, s, a, x, MODE == 2)
        mz = a / s
        if WRITE:
            _emit(out_ptr, obase, cols, L, rmask, C, x, e, m, s, mz, MODE)
    else:
        for c0 in range(0, C, BLOCK_C):
            x = _load_x(x_ptr, out_ptr, base, c0 + cols, sc, rmask, C, ROUND)
            m, s, a, e = _absorb(m, s, a, x, MODE == 2)
        mz = a / s
        if WRITE:
            blocks = tl.cdiv(C, BLOCK_C)
            for i in range(blocks):  # last block first: the likeliest still in L2
                c = (blocks - 1 - i) * BLOCK_C + cols
                x = _load_x(x_ptr, out_ptr, base, c, sc, rmask, C, ROUND)
                e = x  # log_softmax needs no exp
                if MODE != 1:
                    e = tl.exp(x - m[:, None])  # NaN for a row of only -inf (m = -inf), as torch
                _emit(out_ptr, obase, c, L, rmask, C, x, e, m, s, mz, MODE)
    if MODE == 2:
        tl.store(h_ptr + r, tl.log(s) - mz, mask=rmask)  # log s - sum p z, both terms >= 0


@triton.jit
def _entropy_probs_kernel(p_ptr, grad_ptr, h_ptr, N, C, L, sn, sc, sl, on,
                          WRITE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          POSITIONS: tl.constexpr):
    """``h = -sum xlogy(p, p)`` and (WRITE) ``grad = -(log p + 1)``, 0 where p == 0; one pass."""
    r, rmask, base, obase = _row_bases(tl.program_id(0), N, L, sn, sl, on, BLOCK_R, POSITIONS)
    cols = tl.arange(0, BLOCK_C)
    h = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        p = _load(p_ptr, base, c0 + cols, sc, rmask, C, 0.0)
        lp = tl.log(p)  # -inf at 0, NaN below
        absent = p == 0
        h -= tl.sum(tl.where(absent, 0.0, p * lp), axis=1)
        if WRITE:
            _store(grad_ptr, obase, c0 + cols, L, rmask, C, tl.where(absent, 0.0, -(lp + 1.0)))
    tl.store(h_ptr + r, h, mask=rmask)


@triton.jit
def _softmax_backward_kernel(y_ptr, g_ptr, out_ptr, N, C, L, syn, syc, syl, sgn, sgc, sgl, on,
                             LOG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                             POSITIONS: tl.constexpr):
    """``out = y (g - sum g y)`` (softmax) or ``g - exp(y) sum g`` (log_softmax, LOG) of BLOCK_R rows."""
    pid = tl.program_id(0)
    _, rmask, ybase, obase = _row_bases(pid, N, L, syn, syl, on, BLOCK_R, POSITIONS)
    gbase = _row_bases(pid, N, L, sgn, sgl, on, BLOCK_R, POSITIONS)[2]
    cols = tl.arange(0, BLOCK_C)
    if BLOCK_C >= C:  # the row in registers: one read of y and g
        y = _load(y_ptr, ybase, cols, syc, rmask, C, 0.0)
        g = _load(g_ptr, gbase, cols, sgc, rmask, C, 0.0)
        dot = tl.sum(g if LOG else g * y, axis=1)
        _store(out_ptr, obase, cols, L, rmask, C, _softmax_gin(y, g, dot, LOG))
    else:
        dot = tl.zeros((BLOCK_R,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            g = _load(g_ptr, gbase, c0 + cols, sgc, rmask, C, 0.0)
            if LOG:
                dot += tl.sum(g, axis=1)
            else:
                dot += tl.sum(g * _load(y_ptr, ybase, c0 + cols, syc, rmask, C, 0.0), axis=1)
        blocks = tl.cdiv(C, BLOCK_C)
        for i in range(blocks):  # last block first: the likeliest still in L2
            c = (blocks - 1 - i) * BLOCK_C + cols
            y = _load(y_ptr, ybase, c, syc, rmask, C, 0.0)
            g = _load(g_ptr, gbase, c, sgc, rmask, C, 0.0)
            _store(out_ptr, obase, c, L, rmask, C, _softmax_gin(y, g, dot, LOG))


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
    grid, meta = _launch(x3, block)
    n, c, length = x3.shape
    out = out3 if out3 is not None else x3  # not written (WRITE False)
    _softmax_kernel[grid](x3, out, h if h is not None else x3, n, c, length, *x3.stride(), c * length,
                          MODE=mode, WRITE=out3 is not None, ROUND=out.dtype != x3.dtype, **meta)


def softmax_rows(x3: Tensor, out3: Tensor, *, log: bool, block: int | None = None) -> None:
    """``out3 = softmax(x3, 1)`` (``log_softmax`` if ``log``); ``x3`` (N, C, L) any strides, ``out3``
    contiguous (N, C, L). ``x3`` is converted to ``out3``'s dtype on load, as ``torch.softmax(x,
    dtype=out3.dtype)`` casts its input; computed in float32. ``block``: BLOCK_C (tests)."""
    _check(x3=x3, out3=out3)
    _forward(x3, out3, None, _LOG_SOFTMAX if log else _SOFTMAX, block)


def softmax_backward_rows(y3: Tensor, g3: Tensor, out3: Tensor, *, log: bool, block: int | None = None) -> None:
    """``out3`` = the input gradient of softmax (``log_softmax`` if ``log``) along dim 1 from its output
    ``y3`` and ``grad_output`` ``g3`` (both (N, C, L), any strides); ``out3`` contiguous (N, C, L)."""
    _check(y3=y3, g3=g3, out3=out3)
    if _empty(y3):
        return
    grid, meta = _launch(y3, block)
    n, c, length = y3.shape
    _softmax_backward_kernel[grid](y3, g3, out3, n, c, length, *y3.stride(), *g3.stride(), c * length, LOG=log,
                                   **meta)


def entropy_rows(x3: Tensor, h: Tensor, grad3: Tensor | None, *, logits: bool, block: int | None = None) -> None:
    """Entropy of each row of ``x3`` (N, C, L) along dim 1 into ``h`` ((N, L) contiguous float32), and its
    gradient into ``grad3`` (contiguous (N, C, L)) unless None. ``x3``: logits if ``logits``, else
    probabilities."""
    _check(x3=x3, grad3=grad3)
    if h.dtype != torch.float32:
        raise ValueError(f"triton softmax operand h: expected float32, got {h.dtype}")
    if logits:
        _forward(x3, grad3, h, _ENTROPY, block)
    elif not _empty(x3):
        grid, meta = _launch(x3, block)
        n, c, length = x3.shape
        _entropy_probs_kernel[grid](x3, grad3 if grad3 is not None else x3, h, n, c, length, *x3.stride(),
                                    c * length, WRITE=grad3 is not None, **meta)
