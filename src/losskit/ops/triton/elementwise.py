"""Triton kernels of the elementwise losses: binary cross-entropy (on probabilities and on logits, with
weight and pos_weight), multilabel soft margin, sigmoid focal, squared error and both kl_div forms.

Reference expression: :func:`binary_runner` and :func:`pointwise_runner` return a
:data:`~losskit.ops.cpu.native_elementwise.Runner`, a function with the signature and results of
:func:`losskit.ops.reference.elementwise.run` called with the torch kernel of the loss, ::

    run(kernel, operands, want, acc=acc, out_dtype=out_dtype, keep=keep, grad_scale=s, sum_last_dim=...)

with ``kernel`` the loss's torch expression in :mod:`losskit.ops.reference.losses` (``bce``, ``bce_logits``,
``soft_margin``, ``focal``, ``mse``, ``kl_prob_target``, ``kl_log_target``): the same formulas in the
same order of operations, torch's clamps (BCE's logs at -100, its backward's ``(1 - x) x`` at float32
``1e-12``) and NaN/infinity behaviour. The ``kernel`` argument is that reference and is not called.

One launch, one pass: each program reads a tile of each operand once, computes the loss and the
wanted gradients in float32 (bfloat16/float16 are converted as they are loaded, integer targets too),
writes each gradient (times the reduction's factor ``grad_scale``, a float or a 0-dim device tensor
read in the kernel: no host sync) and the unreduced loss once, in their storage dtypes, and stores one
float32 partial sum of its tile's losses (``keep=False``: the caller sums them in a fixed order; or,
with ``sum_last_dim``, one per row and tile, summed over the tiles afterwards). float64 is not this
backend's: a float64 operand, ``acc`` or ``out_dtype`` is a ValueError naming it.

Addressing: the input's shape is *collapsed* (size-1 dims dropped, neighbouring dims merged where the
strides of every operand allow, the outputs being contiguous) to at most :data:`MAX_DIMS` = 4 dims,
three outer "row" dims and the column dim. Every operand is read in place through its four strides, a
broadcast one (a ``(C,)`` or ``(N, 1)`` weight, kl_div's expanded target) with stride 0, a strided input
by its strides: nothing of the input's size is allocated but the gradients and the ``"none"`` loss.
Contiguous full-size operands collapse to one dim, read as contiguous vectors (a stride of 1 is a
compile-time constant in Triton's specialisation). A shape that still has more than four dims after
collapsing (five dims that all broadcast differently) is walked by a loop of launches over its first dim.
Tiles are ``BLOCK_R`` rows x ``BLOCK_C`` columns (:class:`~._tiles.Tiling`: a whole row padded to a power of
2 when it fits, several short rows to a tile, a longer row split over tiles of ``TILE`` columns); offsets
are 64-bit.

Bytes per element (the roofline: every kernel is memory bound, a few dozen flops an element), with
``b_x``, ``b_y`` ... the storage sizes: read ``b_x + b_y`` plus ``b_w`` / ``b_p`` for a full-size
constant (a broadcast one is read from cache), write ``b_x`` for the input's gradient, ``b_y`` for the
target's, ``b_out`` for ``reduction="none"``; per tile 4 bytes of partial sum. BCE with logits in
float32, input gradient, reduction "mean": 12 B/element; bfloat16: 6 B/element; with a target gradient
and the "none" loss, 20 (float32) and 10 (bfloat16) B/element; the same count holds for every kind. At
an H100's 3.35 TB/s, 12 B/element is ~280 G elements/s, against some 40 flops and 2 transcendentals an
element: memory bound.

Numerics: float32 throughout. ``log1p`` is :func:`._math.log1p` (Kahan's, a few ulp); the logit losses
take ``logsigmoid(+-x) = min(+-x, 0) - log1p(exp(-|x|))`` and the sigmoid pair from the one ``exp(-|x|)``,
which never overflows. On CUDA ``tl.exp`` of a float32 is ``ex2.approx`` of ``x log2(e)``: about
``|x| + 2`` ulp, well within float32's tolerance for logits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.elementwise import KL_LOG, KL_PROB, MSE, Kernel, Runner
from ..reference.losses import BCE_EPSILON
from ._math import log1p
from ._tiles import Tiling, check_dtypes, check_power_of_two, scalar, scalar_arg

__all__ = ["binary_runner", "pointwise_runner"]

# The kernel's KIND: the binary losses, then the pointwise ones.
_BCE, _LOGITS, _SOFT_MARGIN, _FOCAL, _MSE, _KL_PROB, _KL_LOG = (tl.constexpr(k) for k in range(7))
_BINARY_KINDS = {"bce": _BCE, "logits": _LOGITS, "soft_margin": _SOFT_MARGIN, "focal": _FOCAL}
_POINTWISE_KINDS = {MSE: _MSE, KL_PROB: _KL_PROB, KL_LOG: _KL_LOG}

#: Most dims an operand is addressed with after collapsing (three row dims and the column dim).
MAX_DIMS = 4
#: Elements of one tile, at 8 a thread (:data:`_PER_THREAD`): 8 warps for a full tile, two 16-byte float32
#: vectors (one for bfloat16) of each operand in flight per thread. Compiled for sm_90 (Triton 3.8
#: compiles to a cubin without a GPU): 32 (kl_div) to 61 (BCE with logits, weight and pos_weight)
#: registers a thread, no spills, every contiguous operand read as 16-byte vectors. One float32 partial
#: sum per tile is 1/2048 of the input.
TILE = 2048
_PER_THREAD = 8

_BCE_EPSILON: tl.constexpr = tl.constexpr(BCE_EPSILON)  # ATen's EPSILON, see reference.losses
_INF: tl.constexpr = tl.constexpr(math.inf)
_NAN: tl.constexpr = tl.constexpr(math.nan)


# ---- per-element maths (float32) ---------------------------------------------------------------------

@triton.jit
def _clamp_min(v, lo):
    """torch's ``clamp_min``: a NaN stays NaN (``tl.maximum`` would return ``lo``)."""
    return tl.where(v < lo, lo, v)


@triton.jit
def _logistic(x):
    """``(logsigmoid(x), logsigmoid(-x), sigmoid(x), sigmoid(-x))`` from one exp(-|x|) in (0, 1]."""
    e = tl.exp(-tl.abs(x))
    l1p = log1p(e)
    r = 1.0 / (1.0 + e)
    pos = x >= 0.0
    er = e * r
    return tl.minimum(x, 0.0) - l1p, tl.minimum(-x, 0.0) - l1p, tl.where(pos, r, er), tl.where(pos, er, r)


@triton.jit
def _pow(q, gamma, GAMMA_INT: tl.constexpr):
    """``q ** gamma``: products for an integer gamma in [0, 64] (``GAMMA_INT``; q**0 = 1 even for a NaN q,
    as torch's pow), else ``exp(gamma log q)`` (0 at q = 0 as pow; NaN for q < 0, which only targets
    outside [0, 1] give, where pow is NaN too unless gamma is an integer above 64)."""
    if GAMMA_INT >= 0:
        out = tl.full(q.shape, 1.0, tl.float32)
        base = q
        for k in tl.static_range(7):
            if (GAMMA_INT >> k) & 1:
                out = out * base
            if (GAMMA_INT >> (k + 1)) != 0:
                base = base * base
    else:
        out = tl.exp(gamma * tl.log(q))
    return out


@triton.jit
def _bce(x, y):
    """``losses.bce``: loss, d/dx, d/dy (unweighted)."""
    lx = tl.log(x)
    l1 = log1p(-x)
    loss = (y - 1.0) * _clamp_min(l1, -100.0) - y * _clamp_min(lx, -100.0)
    dx = (x - y) / _clamp_min((1.0 - x) * x, _BCE_EPSILON)
    return loss, dx, l1 - lx  # -logit(x) = log1p(-x) - log(x)


@triton.jit
def _bce_logits(x, y, p, HAS_P: tl.constexpr):
    """``losses.bce_logits`` (unweighted), ``p`` the pos_weight where HAS_P."""
    ls, lsn, s, _ = _logistic(x)
    if HAS_P:
        py = p * y
        loss = (1.0 - y) * x - ls * ((p - 1.0) * y + 1.0)
        dx = (py + 1.0 - y) * s - py
        dy = lsn - ls * p
    else:
        loss = (1.0 - y) * x - ls
        dx = s - y
        dy = -x
    return loss, dx, dy


@triton.jit
def _soft_margin(x, y):
    """``losses.soft_margin`` (unweighted)."""
    ls, lsn, s, _ = _logistic(x)
    return -(y * ls + (1.0 - y) * lsn), s - y, lsn - ls


@triton.jit
def _focal(x, y, alpha, one_minus_alpha, two_alpha_minus_1, gamma, HAS_ALPHA: tl.constexpr,
           GAMMA_INT: tl.constexpr):
    """``losses.focal``: q = 1 - p_t without cancellation, ``ce / q`` taken as 1 where q == 0; the alpha
    terms come from the host, formed in double as the reference forms them."""
    ls, _, s, sn = _logistic(x)
    ny = 1.0 - y
    ce = ny * x - ls
    q = s * ny + sn * y
    q_g = _pow(q, gamma, GAMMA_INT)
    loss = ce * q_g
    if GAMMA_INT == 0:  # the reference has no ratio term then (it would be 0 * inf = NaN at x = inf)
        dy = -x * q_g
        dx = (s - y) * q_g
    else:
        zero = q == 0.0
        ratio = tl.where(zero, 1.0, ce / tl.where(zero, 1.0, q)) * gamma
        dy = (-x + ratio * (sn - s)) * q_g
        r = ratio * s * sn
        dx = ((s - y) + r - r * y * 2.0) * q_g
    if HAS_ALPHA:
        a = ny * one_minus_alpha + y * alpha
        dy = dy * a + loss * two_alpha_minus_1
        dx = dx * a
        loss = loss * a
    return loss, dx, dy


@triton.jit
def _mse(x, y):
    """``losses.mse`` (unweighted; its d/dy is -d/dx after the weight)."""
    d = x - y
    dx = d * 2.0
    return d * d, dx, -dx


@triton.jit
def _kl_prob(x, y):
    """``losses.kl_prob_target``: xlogy(y, y) - y x; d/dy NaN at y == 0 and y == inf, as torch's autograd."""
    lg = tl.log(y)
    absent = y == 0.0
    loss = tl.where(absent, 0.0, y * lg) - y * x
    return loss, -y, tl.where(absent | (y == _INF), _NAN, lg + 1.0 - x)


@triton.jit
def _kl_log(x, y):
    """``losses.kl_log_target``: exp(tau) (tau - x)."""
    e = tl.exp(y)
    loss = e * (y - x)
    return loss, -e, loss + e


@triton.jit
def _tile_at(i0, i1, i2, c, s0, s1, s2, s3):
    """Offsets (BLOCK_R, BLOCK_C), 64-bit, of the elements at row coordinates (i0, i1, i2) and columns c."""
    return (i0 * s0 + i1 * s1 + i2 * s2)[:, None] + c[None, :] * s3


@triton.jit
def _elementwise_kernel(
        X, Y, W, P, OUT, GX, GY, SUMS,  # W P OUT GX GY SUMS: None when absent
        rows, size1, size2, cols, col_tiles,
        sx0, sx1, sx2, sx3, sy0, sy1, sy2, sy3, sw0, sw1, sw2, sw3, sp0, sp1, sp2, sp3,
        scale, alpha, one_minus_alpha, two_alpha_minus_1, gamma,
        KIND: tl.constexpr, HAS_ALPHA: tl.constexpr, GAMMA_INT: tl.constexpr, ROW_SUMS: tl.constexpr,
        SCALE_PTR: tl.constexpr, FLAT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One tile of rows x columns of the collapsed shape (size0, size1, size2, cols), rows = size0 size1
    size2. X, Y, W, P: read through their strides (0 where broadcast); OUT, GX, GY: contiguous in that
    shape; SUMS: the tile's loss sum (``SUMS[tile]``), or with ROW_SUMS each row's (``SUMS[row,
    col_tile]``). FLAT: one row (one collapsed dim), whose offsets are the column indices times the
    strides, so Triton sees contiguous, aligned vectors where the strides are 1."""
    tile = tl.program_id(0)
    col_tile = tile % col_tiles
    c = col_tile.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) int64
    if FLAT:
        r = tl.zeros([BLOCK_R], tl.int64)  # BLOCK_R == 1
        i0 = r
        i1 = r
        i2 = r
        at = r[:, None] + c[None, :]  # outputs: contiguous
    else:
        r = (tile // col_tiles).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) int64
        i2 = r % size2
        i1 = (r // size2) % size1
        i0 = r // size2 // size1
        at = r[:, None] * cols + c[None, :]  # outputs: contiguous
    row_in = r < rows
    mask = row_in[:, None] & (c < cols)[None, :]
    # Masked lanes take values inside every loss's domain (x 1/2, y 0, constants 1); they are neither
    # stored nor summed.
    x = tl.load(X + _tile_at(i0, i1, i2, c, sx0, sx1, sx2, sx3), mask=mask, other=0.5).to(tl.float32)
    y = tl.load(Y + _tile_at(i0, i1, i2, c, sy0, sy1, sy2, sy3), mask=mask, other=0).to(tl.float32)
    if KIND == _BCE:
        loss, dx, dy = _bce(x, y)
    elif KIND == _LOGITS:
        if P is not None:
            p = tl.load(P + _tile_at(i0, i1, i2, c, sp0, sp1, sp2, sp3), mask=mask, other=1.0).to(tl.float32)
            loss, dx, dy = _bce_logits(x, y, p, True)
        else:
            loss, dx, dy = _bce_logits(x, y, x, False)
    elif KIND == _SOFT_MARGIN:
        loss, dx, dy = _soft_margin(x, y)
    elif KIND == _FOCAL:
        loss, dx, dy = _focal(x, y, alpha, one_minus_alpha, two_alpha_minus_1, gamma, HAS_ALPHA, GAMMA_INT)
    elif KIND == _MSE:
        loss, dx, dy = _mse(x, y)
    elif KIND == _KL_PROB:
        loss, dx, dy = _kl_prob(x, y)
    else:
        loss, dx, dy = _kl_log(x, y)
    if W is not None:
        w = tl.load(W + _tile_at(i0, i1, i2, c, sw0, sw1, sw2, sw3), mask=mask, other=1.0).to(tl.float32)
        loss = loss * w
        dx = dx * w
        dy = dy * w
    if OUT is not None:
        tl.store(OUT + at, loss.to(OUT.dtype.element_ty), mask=mask)
    if GX is not None or GY is not None:
        scale = scalar(scale, SCALE_PTR)
        if GX is not None:
            tl.store(GX + at, (dx * scale).to(GX.dtype.element_ty), mask=mask)
        if GY is not None:
            tl.store(GY + at, (dy * scale).to(GY.dtype.element_ty), mask=mask)
    if SUMS is not None:
        kept = tl.where(mask, loss, 0.0)
        if ROW_SUMS:
            tl.store(SUMS + r * col_tiles + col_tile, tl.sum(kept, axis=1), mask=row_in)
        else:
            tl.store(SUMS + tile, tl.sum(kept))


# ---- launch ------------------------------------------------------------------------------------------

def _collapse(shape: Sequence[int], strides: Sequence[Sequence[int]], keep_last: bool
              ) -> tuple[list[int], list[list[int]]]:
    """``(sizes, strides of each operand)`` addressing the same elements in the same (row-major) order:
    size-1 dims dropped, dim k merged into dim k - 1 where every operand has ``stride[k - 1] == stride[k]
    * size[k]`` (the outputs, contiguous, always do); with ``keep_last`` the last dim stays its own (rows
    are summed over it). At least one dim."""
    dims = [(size, [s[k] for s in strides]) for k, size in enumerate(shape)]
    last = [dims.pop()] if keep_last and dims else []
    merged: list[tuple[int, list[int]]] = []
    for size, st in dims:
        if size == 1:
            continue
        if merged and all(outer == inner * size for outer, inner in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * size, st)
        else:
            merged.append((size, st))
    merged += last
    if not merged:
        merged = [(1, [0] * len(strides))]
    return [size for size, _ in merged], [[st[j] for _, st in merged] for j in range(len(strides))]


class _Launch:
    """What is fixed for one runner call: the kind, its constants, the gradient scale and the tile size."""

    def __init__(self, kind: int, alpha: float, gamma: float, grad_scale: Tensor | float, tile: int):
        self.kind, self.alpha, self.gamma = kind, alpha, gamma
        # no per-row state: rows are capped by the tile alone (512 rows of 4 columns)
        self.tiling = Tiling(tile, _PER_THREAD, max_rows=tile)
        self.scale, self.scale_ptr = scalar_arg(grad_scale)
        integral = float(gamma).is_integer() and 0 <= gamma <= 64
        self.gamma_int = int(gamma) if integral else -1

    def __call__(self, ops: Sequence[Tensor | None], out: Tensor | None, grads: Sequence[Tensor | None],
                 row_out: Tensor | None, want_sums: bool) -> Tensor | None:
        """Launch over ``ops = (x, y, w, p)`` (views of x's shape or None); ``out``, ``grads``, ``row_out``:
        contiguous outputs or None. Returns the tiles' float32 partial sums if ``want_sums``."""
        x = ops[0]
        shape = x.shape
        # An absent operand's strides are zeros, which never keep two dims apart.
        sizes, strides = _collapse(shape, [(0,) * len(shape) if op is None else op.stride() for op in ops],
                                   keep_last=row_out is not None)
        if len(sizes) > MAX_DIMS:  # rare: walk the first dim, each slice has fewer dims to address
            parts = [self([None if op is None else op[i] for op in ops], None if out is None else out[i],
                          [None if g is None else g[i] for g in grads], None if row_out is None else row_out[i],
                          want_sums) for i in range(shape[0])]
            return torch.cat(parts) if want_sums else None
        pad = MAX_DIMS - len(sizes)
        sizes = [1] * pad + sizes
        rows, cols = math.prod(sizes[:-1]), sizes[-1]
        block_r, block_c, num_warps = self.tiling.shape(cols, rows)
        col_tiles = triton.cdiv(cols, block_c)
        n_tiles = triton.cdiv(rows, block_r) * col_tiles
        device = x.device
        if row_out is not None:  # (rows, col_tiles) row sums of each tile, then summed over the tiles
            sums = (row_out.view(rows, 1) if col_tiles == 1
                    else torch.empty(rows, col_tiles, dtype=torch.float32, device=device))
        else:
            sums = torch.empty(n_tiles, dtype=torch.float32, device=device) if want_sums else None
        _elementwise_kernel[(n_tiles,)](
            x, ops[1], ops[2], ops[3], out, grads[0], grads[1], sums,
            rows, sizes[1], sizes[2], cols, col_tiles, *(s for st in strides for s in [0] * pad + st),
            self.scale, self.alpha, 1 - self.alpha, 2 * self.alpha - 1, self.gamma,
            KIND=self.kind, HAS_ALPHA=self.alpha >= 0, GAMMA_INT=self.gamma_int, ROW_SUMS=row_out is not None,
            SCALE_PTR=self.scale_ptr, FLAT=rows == 1, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
        if row_out is not None and col_tiles > 1:
            torch.sum(sums, 1, out=row_out.view(rows))
        return sums if want_sums else None


def _check_dtypes(operands: Sequence[Tensor | None], acc: torch.dtype, out_dtype: torch.dtype) -> None:
    """Floating operands and ``out_dtype`` in :data:`._tiles.DTYPES` and ``acc`` float32; integer targets
    are converted as they are loaded."""
    x, y, *constants = operands
    integer = not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
    check_dtypes(input=x, target=None if integer else y, **dict(zip(("weight", "pos_weight"), constants)),
                 out_dtype=out_dtype)
    if acc != torch.float32:
        raise ValueError(f"acc must be torch.float32 for the Triton elementwise kernels, got {acc}")


def _run(kind: int, alpha: float, gamma: float, kernel: Kernel, operands: Sequence[Tensor | None],
         want: Sequence[bool], *, acc: torch.dtype, out_dtype: torch.dtype, keep: bool,
         grad_scale: Tensor | float = 1.0, sum_last_dim: bool = False, tile: int = TILE
         ) -> tuple[Tensor, list[Tensor | None]]:
    """:func:`losskit.ops.reference.elementwise.run` of ``kernel`` (the reference of ``kind``), in one launch.

    ``operands``: input, target, then the constants of the kind (weight and pos_weight for BCE with
    logits, weight for BCE, soft margin and MSE, none for focal and kl_div), each broadcastable to the
    input or None. Gradients are computed for input and target (``want[:2]``); constants have none.
    ``tile``: elements of one tile (a power of 2; tests shrink it to split rows over tiles).
    """
    del kernel  # the reference expression; the Triton kernel of ``kind`` computes the same
    if any(want[2:]):
        raise ValueError("the Triton elementwise kernels compute no gradient of a constant (weight, pos_weight)")
    _check_dtypes(operands, acc, out_dtype)
    check_power_of_two("tile", tile)
    x, y, *constants = operands
    shape, device = x.shape, x.device
    grads: list[Tensor | None] = [torch.empty(op.shape, dtype=op.dtype, device=device) if w else None
                                  for op, w in zip((x, y), want)]
    row_sums = keep and sum_last_dim
    if row_sums:
        out = torch.zeros(shape[:-1], dtype=acc, device=device)  # a row of 0 entries sums to 0
    else:
        out = torch.empty(shape, dtype=out_dtype, device=device) if keep else None
    w, p = (*constants, None, None)[:2]
    ops = [x, y.expand(shape), None if w is None else w.expand(shape), None if p is None else p.expand(shape)]
    sums = None
    if x.numel():
        sums = _Launch(kind, alpha, gamma, grad_scale, tile)(ops, None if row_sums else out, grads,
                                                             out if row_sums else None, want_sums=not keep)
    grads += [None] * (len(operands) - 2)
    if keep:
        return out, grads
    return (sums if sums is not None else torch.zeros(0, dtype=acc, device=device)), grads


def binary_runner(kind: str, *, alpha: float = 0.0, gamma: float = 0.0) -> Runner:
    """The Triton runner of a binary loss: ``kind`` one of ``"bce"``, ``"logits"``, ``"soft_margin"``,
    ``"focal"`` (with ``alpha`` and ``gamma``; ``alpha < 0`` disables the class weighting). See the module
    docstring for the operands and results."""
    if kind not in _BINARY_KINDS:
        raise ValueError(f"kind must be one of {sorted(_BINARY_KINDS)}, got {kind!r}")
    return functools.partial(_run, _BINARY_KINDS[kind].value, float(alpha), float(gamma))


def pointwise_runner(kind: int) -> Runner:
    """The Triton runner of ``kind``: :data:`~losskit.ops.reference.elementwise.MSE` (input, target and an
    optional weight of the input's shape), ``KL_PROB`` or ``KL_LOG`` (input and target, kl_div's views of
    the broadcast shape)."""
    if kind not in _POINTWISE_KINDS:
        raise ValueError(f"kind must be one of {sorted(_POINTWISE_KINDS)}, got {kind!r}")
    return functools.partial(_run, _POINTWISE_KINDS[kind].value, 0.0, 0.0)
