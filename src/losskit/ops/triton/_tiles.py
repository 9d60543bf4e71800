"""What the Triton kernels share: how a tile is sized and laid over the rows, how its elements are
addressed, and the checks of a wrapper's operands.

Every row kernel here (:mod:`.xent`, :mod:`.softmax`, :mod:`.shard`) takes an ``(N, C, L)`` operand and
reduces along C: a program owns a tile of ``BLOCK_R`` rows (positions) and walks their C columns in
blocks of ``BLOCK_C``, so registers stay the same for any C. :class:`Tiling` sizes the tile (the
elementwise kernels use it too, for their rows of columns) and :class:`RowTiles` lays it over the
operand; the ``@triton.jit`` helpers below give a program its rows and load or store a tile through
any strides, in 64-bit offsets (``row * stride`` passes 2^31 on inputs of 2^31 elements or more, a
vocabulary of 262144 over 8192 rows).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Storage dtypes of the Triton kernels' floating operands: each is converted to float32 on load. float64
#: is the C and torch backends' (the dispatcher routes it there).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Rows of a tile at least where the columns are strided and the rows adjacent (``L > 1``, or an
#: ``(N, C)`` view of a ``(C, N)`` tensor): a warp's 32 lanes then load 32 adjacent elements of one
#: column, one 128-byte line of float32 (64 B of 16-bit), where one row per program would fetch a 32-byte
#: sector for each 2- or 4-byte element.
RUN = 32
#: Rows of a tile at most, for short rows (C <= 32 at 4096 elements): a million rows still make
#: thousands of programs (an H100 has 132 SMs), while each shares its per-row work (state in registers,
#: the row's logs and divisions) over a tile.
MAX_ROWS = 128
#: Threads of a warp.
_WARP = 32


def check_dtypes(**operands: Tensor | torch.dtype | None) -> None:
    """Every operand (a tensor, or the dtype of an output to be made) in :data:`DTYPES`; None: absent."""
    for name, op in operands.items():
        dtype = op.dtype if isinstance(op, Tensor) else op
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"{name} is {dtype}: the Triton kernels take float32, bfloat16 and float16 (computed "
                             f"in float32; float64 runs on the C or torch backend)")


def check_power_of_two(name: str, value: int) -> None:
    """``tl.arange`` sizes, and so every BLOCK, are powers of two."""
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")


def scalar_arg(value: float | Tensor) -> tuple[float | Tensor, bool]:
    """``(argument, IS_PTR)`` of a scalar that depends on the data (a reduction's scale): a Python float is
    passed by value (as a float: an int 1 would be specialised into the kernel), a 0-dim device tensor as a
    pointer that :func:`scalar` reads in the kernel, so that the caller never syncs with the device (and
    can capture the call in a CUDA graph)."""
    return (value, True) if isinstance(value, Tensor) else (float(value), False)


class Tiling(NamedTuple):
    """How a family of kernels sizes its ``(BLOCK_R, BLOCK_C)`` tiles.

    ``elements``: of one tile, a power of two: the registers one loop step holds, ``elements / (32
    num_warps)`` values of each tiled operand per thread. ``per_thread``: the elements of a tile per thread
    that num_warps is chosen for (8 is one 16-byte load of bfloat16 or two of float32 per operand): a full
    tile gets ``elements / (32 per_thread)`` warps, a smaller tile (short rows, few rows) proportionally
    fewer, at least one. Both are the kernel's own, measured with ptxas where it is declared: what fits
    without spills depends on what the kernel keeps beside the tile. ``max_rows``: rows of a tile at most.
    """

    elements: int
    per_thread: int
    max_rows: int = MAX_ROWS

    def shape(self, cols: int, rows: int, strided: bool = False, block: int | None = None) -> tuple[int, int, int]:
        """``(BLOCK_R, BLOCK_C, num_warps)`` for rows of ``cols`` columns, ``rows`` of which a tile may take.

        BLOCK_C: the row rounded up to a power of two (one block: each element read once), at most what
        leaves room for :data:`RUN` rows where the columns are ``strided`` (rows adjacent). BLOCK_R: as many
        rows as fill the tile (short rows), at least :data:`RUN` where strided, at most ``max_rows`` and
        the rows there are. ``block`` (tests): BLOCK_C itself, a power of two.
        """
        if block is not None:
            check_power_of_two("block", block)
        span = triton.next_power_of_2(max(rows, 1))
        run = min(RUN, span) if strided else 1
        block_c = block or min(triton.next_power_of_2(max(cols, 1)), self.elements // run)
        block_r = min(span, self.max_rows, max(run, self.elements // block_c))
        per_warp = _WARP * self.per_thread
        return block_r, block_c, max(1, min(self.elements // per_warp, block_r * block_c // per_warp))


class RowTiles(NamedTuple):
    """How an ``(N, C, L)`` launch is tiled: ``samples`` x ``length`` rows (positions), ``length`` split into
    tiles of ``BLOCK_R`` (``options``, with BLOCK_C and num_warps), one program each (``grid``).

    ``flip``: L == 1, the N rows are taken as the ``length`` positions of one sample (their stride becomes
    the position stride), so that short rows share a tile and row ``r = n * L + l`` keeps its index. A
    tile stays inside one sample: its positions ``l0 + arange`` are then adjacent where the position stride
    is 1 (specialised by Triton), which the compiler sees and lays its threads along (vectorised where L
    is a multiple of 16); a tile spanning samples (``r // L``, ``r % L``) would hide that.
    """

    samples: int
    length: int
    flip: bool
    grid: tuple[int]
    options: dict[str, int]

    @staticmethod
    def of(x3: Tensor, tiling: Tiling, block: int | None = None) -> RowTiles:
        """The tiles of ``x3`` (N, C, L), its columns strided unless its class stride is 1."""
        n, c, length = x3.shape
        flip = length == 1
        samples, length = (1, n) if flip else (n, length)
        block_r, block_c, warps = tiling.shape(c, length, x3.stride(1) != 1, block)
        return RowTiles(samples, length, flip, (samples * triton.cdiv(length, block_r),),
                        {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": warps})

    def strided(self, t: Tensor | None) -> tuple[Tensor | None, int, int, int]:
        """A kernel's view of an (N, C, L) operand: (tensor, stride_n, stride_c, stride_l); None: absent."""
        if t is None:
            return None, 0, 0, 0
        sn, sc, sl = t.stride()
        return (t, 0, sc, sn) if self.flip else (t, sn, sc, sl)


# ---- device helpers -------------------------------------------------------------------------------

@triton.jit
def tile_rows(L, BLOCK_R: tl.constexpr):
    """This program's tile of :class:`RowTiles`: ``BLOCK_R`` consecutive positions ``l`` of one sample
    ``n``, as (r = n * L + l, in range, n, l), all int64."""
    tiles = tl.cdiv(L, BLOCK_R)
    pid = tl.program_id(0)
    n = (pid // tiles).to(tl.int64)
    l = (pid % tiles).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    return n * L + l, l < L, n, l


@triton.jit
def tile_mask(rmask, cols, C):
    """(BLOCK_R, BLOCK_C): rows in range and columns in ``[0, C)``."""
    return rmask[:, None] & (cols < C)[None, :]


@triton.jit
def _offsets(base, cols, sc):
    """64-bit offsets of a tile: rows at ``base`` (int64), columns ``cols`` ``sc`` elements apart."""
    return base[:, None] + cols.to(tl.int64)[None, :] * sc


@triton.jit
def load_tile(ptr, base, cols, sc, mask, other, EVICT: tl.constexpr = ""):
    """The float32 (BLOCK_R, BLOCK_C) tile at rows ``base``, columns ``cols`` (stride ``sc``); ``other``
    outside ``mask``. EVICT: the load's eviction policy ("evict_first": read once, leave L2 to others)."""
    return tl.load(ptr + _offsets(base, cols, sc), mask=mask, other=other, eviction_policy=EVICT).to(tl.float32)


@triton.jit
def store_tile(ptr, base, cols, sc, mask, value):
    """Store ``value`` rounded once to ``ptr``'s dtype at rows ``base``, columns ``cols`` (stride ``sc``)."""
    tl.store(ptr + _offsets(base, cols, sc), value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def column_at(ptr, base, col, sc, hit):
    """Each row's float32 element at column ``col`` (an index from the data), read only where ``hit`` says
    it is in range, 0 elsewhere: an index is never an address unless checked."""
    return tl.load(ptr + base + tl.where(hit, col, 0) * sc, mask=hit, other=0.0).to(tl.float32)


@triton.jit
def class_weights(w_ptr, cols, C, HAS_WEIGHT: tl.constexpr):
    """(BLOCK_C,) float32 class weights of ``cols`` (ones without weights), 0 outside ``[0, C)``. Every
    program reads them: kept in L2 (evict_last), 4 bytes per class."""
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cols < C, other=0.0, eviction_policy="evict_last").to(tl.float32)
    else:
        w = tl.where(cols < C, 1.0, 0.0)
    return w


@triton.jit
def scalar(value, IS_PTR: tl.constexpr):
    """The float32 scalar of :func:`scalar_arg`: the value, or (IS_PTR) read from the 0-dim tensor."""
    if IS_PTR:
        out = tl.load(value).to(tl.float32)
    else:
        out = tl.cast(value, tl.float32)
    return out
