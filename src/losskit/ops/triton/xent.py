"""Triton row kernels of softmax cross-entropy (with label smoothing, probability targets and the focal
loss) and nll_loss: the GPU twins of :func:`losskit.ops.cpu.native.xent_rows` and
:func:`losskit.ops.cpu.native_softmax.nll_rows`, with the same signatures and semantics.

Reference expressions, per position ``(n, l)`` of an ``(N, C, L)`` operand (classes on dim 1), target
``y``, class weights ``w`` (ones when None), smoothing ``ls``, ``p = x[n, :, l].float().softmax(0)``:

* :func:`xent_rows`: the loss and ``scale * dloss/dx`` of :func:`losskit.ops.reference.rows.xent_rows_`,
  i.e. ``F.cross_entropy(x, y, w, ignore_index=..., label_smoothing=ls, reduction="none")``, the focal
  loss ``-w_y (1 - p_y)^gamma log p_y`` (``gamma != 0``; index targets, no smoothing), and
  ``F.cross_entropy(x, t, w, label_smoothing=ls, reduction="none")`` for probability targets ``t``, whose
  gradient ``scale * dloss/dt = scale (1 - ls) w_c (-log p_c)`` goes to ``target_grad3``;
* :func:`nll_rows`: ``-w_y x[n, y, l]`` (0 where ``y == ignore_index``) and the gradient of the reduced
  loss: zeros but ``-w_y * scale`` at each target.

Layout (:mod:`._tiles`: :class:`~._tiles.Tiling` sizes the tiles, :class:`~._tiles.RowTiles` lays them). A
program takes a tile of ``BLOCK_R`` consecutive positions ``l`` of one sample ``n`` (their targets and
losses at ``r = n * L + l``) and walks their ``C`` classes in blocks of ``BLOCK_C``, so any C (262144 and
beyond) runs in registers of a fixed size. With the classes innermost (``L == 1``: language models,
classification) a large C gets one row per program and ``BLOCK_C``-long contiguous loads, short rows share
a program. With ``L > 1`` (``(N, C, H, W)`` segmentation) the classes of a position lie ``L`` apart but
its neighbours are adjacent: a tile of at least 32 positions of one sample makes every load 32 adjacent
elements per class, laid along the threads and vectorised when ``L`` is a multiple of 16 (checked on the
sm_90 TTGIR for L = 4, 49, 512 * 512). Every operand is addressed through its own strides as 64-bit
offsets. ``grad3`` may be ``x3`` itself (the chunked linear cross-entropy turns its logits into their
gradient in place): each element is read by the program that writes it, before it writes it.

Algorithm (:func:`xent_rows`). Pass 1 reads a row's blocks once: the online max ``m``, the sum of
``exp(x - m)``, and, for smoothing and probability targets, ``V = sum_c v_c`` and ``A = sum_c v_c (m - x_c)``
with ``v_c = w_c`` (index targets) or ``w_c t'_c`` (probabilities, ``t' = (1 - ls) t + ls / C``), shifted
by ``V (m_new - m)`` when the max grows, so that ``A`` is a sum of terms >= 0. The target's logit is one
load per position before the loop. Then, per row, ``log s``, the loss (``sum_c v_c (-log p_c) = V log s +
A``) and the gradient's coefficients; pass 2 re-reads the logits (and ``t``) and writes the gradient
once: ``scale (alpha p_c - beta [c == y] - g v_c)`` (``alpha``, ``beta``, ``g`` as in ``rows.py``). Rows
that fit one block (``C <= BLOCK_C``) stay in registers: read once. Pass 2 walks the blocks last first,
the likeliest still in L2.

Bytes moved per element (``sx``, ``st``, ``sg``, ``stg``: the logits', probability targets', gradient's
and target gradient's element sizes; per position also 8 bytes of int64 target, 4 of loss, and one
logit for index targets; class weights, 4 bytes per class, are read by every program from L2)::

    kernel                                    C <= BLOCK_C              C > BLOCK_C
    xent, index targets, loss only            sx                        sx
    xent, index targets, gradient             sx + sg                   2 sx + sg
    xent, probabilities, loss only            sx + st                   sx + st
    xent, probabilities, gradient             sx + st + sg (+ stg)      2 sx + 2 st + sg (+ stg)
    nll, gradient                             sg                        sg

The logits are read at most twice (the second read of a long row comes from L2 when the rows in flight
fit it: 50 MiB on an H100 holds about 100 rows of 262144 bfloat16 logits), the gradient written once.

Precision. Operands are converted to float32 on load and all arithmetic is float32 (one exp per element
and pass), as in the float32 rows of torch and Liger; the results are rounded once to the output dtype.
Where float32 rows usually lose accuracy, these do not: the sum of exps leaves out one maximal term (its
``exp(0) = 1``; ``s - 1`` is carried and ``log s = log1p(s - 1)``), and ``-log p_y = (m - x_y) + log s``
and ``A`` add terms >= 0 only, so a loss near 0 (``p_y`` near 1) keeps its relative accuracy instead of
drowning in ``1 + small`` rounded to float32. The focal loss's ``q = 1 - p_y`` is ``-expm1(log p_y)``,
and ``q^gamma`` is ``q^k`` (``k = floor(gamma)`` products, at most 8: an integer gamma such as 2 is exact
to a few ulp) times ``exp2(f log2 q)`` for the rest ``f``, off by about ``|f ln q| / 2`` ulp, which grows
only where ``p_y`` nears 1 and the loss vanishes.
float64 operands are refused (ValueError naming the dtype): they run on the C or torch backends.

Special rows, as torch: a row of only ``-inf`` or with a NaN gives a NaN loss and gradient; ``-inf``
logits with a finite max give ``p = 0`` (and an infinite loss where the target or smoothing reads them).

Safety: a target is used as an address only when in ``[0, C)``. The functionals check targets before
calling (a host sync); without that check, a target neither in range nor ``ignore_index`` gives its row
a NaN loss and a NaN gradient row, never a read or write out of bounds.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._math import log1p
from ._tiles import (RowTiles, Tiling, check_dtypes, class_weights, column_at, load_tile, scalar, scalar_arg,
                     store_tile, tile_mask, tile_rows)

__all__ = ["nll_rows", "xent_rows"]

#: Tiles of 4096 elements at 8 per thread (one 16-byte load of bfloat16): 16 warps for a full tile.
#: Compiled for sm_90 and counted by ptxas (bfloat16, every option): 32-62 registers with one row per
#: program (C = 262144), 48-128 with tiles of many short rows (each thread holds the per-row state of
#: several rows), no spills; 16 elements per thread took up to 141.
_TILING = Tiling(elements=4096, per_thread=8)
#: The focal loss's q^gamma takes at most this many products of q (the rest of gamma goes to one exp2).
_MAX_GAMMA_PRODUCTS = 8


# ---- device helpers -------------------------------------------------------------------------------

@triton.jit
def _load(ptr, base, cols, sc, rmask, C):
    """(BLOCK_R, BLOCK_C) float32 tile of classes ``cols`` at rows ``base``; -inf outside, and its mask."""
    mask = tile_mask(rmask, cols, C)
    return load_tile(ptr, base, cols, sc, mask, float("-inf")), mask


@triton.jit
def _class_target(y_ptr, r, rmask, C, ignore_index, w_ptr, x_ptr, xbase, sxc, HAS_WEIGHT: tl.constexpr):
    """Index targets of rows ``r``: (y, kept: not ignore_index, in range: an address in [0, C), x[y], w[y]);
    ``x[y]`` and ``w[y]`` are read only where the target is in range (0 elsewhere)."""
    y = tl.load(y_ptr + r, mask=rmask, other=ignore_index)
    kept = y != ignore_index
    hit = kept & (y >= 0) & (y < C)  # rows out of range have y = ignore_index: not kept
    x_y = column_at(x_ptr, xbase, y, sxc, hit)
    w_y = tl.where(hit, 1.0, 0.0)
    if HAS_WEIGHT:
        w_y = column_at(w_ptr, 0, y, 1, hit)
    return y, kept, hit, x_y, w_y


@triton.jit
def _kept(value, hit, kept):
    """``value`` on rows whose target is in range, 0 on ignored rows, NaN on rows of out-of-range targets."""
    return tl.where(hit, value, tl.where(kept, float("nan"), 0.0))


@triton.jit
def _expm1(z):
    """exp(z) - 1 for z <= 0 to a few ulp (Kahan: (u - 1) z / log(u), u = exp(z))."""
    u = tl.exp(z)
    return tl.where(u == 1.0, z, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * (z / tl.log(u))))


@triton.jit
def _smoothing_weights(t_ptr, tbase, stc, cols, mask, w, ls, C, PROB: tl.constexpr):
    """(BLOCK_R, BLOCK_C) ``v_c``: ``w_c t'_c`` with ``t' = (1 - ls) t + ls / C`` (PROB), else ``w_c``; 0
    outside ``mask``."""
    if PROB:
        t = load_tile(t_ptr, tbase, cols, stc, mask, 0.0)
        v = ((1.0 - ls) * t + ls / C) * w[None, :]
    else:
        v = tl.broadcast_to(w[None, :], mask.shape)
    return tl.where(mask, v, 0.0)


@triton.jit
def _block(x_ptr, xbase, sxc, t_ptr, tbase, stc, w_ptr, cols, rmask, C, ls, PROB: tl.constexpr,
           SMOOTH: tl.constexpr, WANT_V: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """One block of classes ``cols``: (logits, mask, class weights, smoothing weights ``v``). Weights are
    read only where smoothing or probability targets use them, ``v`` only if WANT_V (else placeholders)."""
    x, mask = _load(x_ptr, xbase, cols, sxc, rmask, C)
    w, v = cols, x
    if SMOOTH:
        w = class_weights(w_ptr, cols, C, HAS_WEIGHT)
        if WANT_V:
            v = _smoothing_weights(t_ptr, tbase, stc, cols, mask, w, ls, C, PROB)
    return x, mask, w, v


@triton.jit
def _absorb(x, v, mask, m, s1, vs, a, SMOOTH: tl.constexpr):
    """Pass 1 over one block: the running max ``m`` (float32), ``s1 = sum exp(x - m) - 1`` (one maximal
    entry's ``exp(0)`` left out), ``vs = sum v`` and ``a = sum v (m - x)``, updated with block
    ``x`` (-inf outside ``mask``) and its smoothing weights ``v``.

    The block's entries equal to the new max ``m'`` count as 1 each; the old ``s1 + 1`` scales by
    ``r = exp(m - m')``, so ``s1' = r s1 + r + sum_{x < m'} exp(x - m') + (count(x == m') - 1)``. While the
    row has only -inf (``m' = -inf``), ``r = 1`` and its entries count 1 each, to be dropped (``r = 0``)
    at the first finite block: ``exp(-inf - -inf)`` is never used. A NaN entry makes ``s1`` NaN.
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    top = mask & (x == m_new[:, None])
    e = tl.where(mask & ~top, tl.exp(x - m_new[:, None]), 0.0)
    r = tl.where(m_new == float("-inf"), 1.0, tl.exp(m - m_new))
    s1 = s1 * r + r + tl.sum(e, axis=1) + (tl.sum(top.to(tl.float32), axis=1) - 1.0)
    if SMOOTH:
        # a = sum v (m - x) >= 0: earlier terms grow by m' - m; a -inf logit's term is v * inf (NaN if
        # v = 0, as torch's 0 * -inf)
        shift = tl.where(m > float("-inf"), vs * (m_new - m), 0.0)
        d = tl.where(x == float("-inf"), v * float("inf"), v * (m_new[:, None] - x))
        a = a + shift + tl.sum(tl.where(mask, d, 0.0), axis=1)
        vs = vs + tl.sum(v, axis=1)
    return m_new, s1, vs, a


@triton.jit
def _emit(x, v, w, mask, cols, y, m, coef, beta, g, log_s, tcoef, g_ptr, gbase, sgc, tg_ptr, tgbase, stgc,
          PROB: tl.constexpr, SMOOTH: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_TGRAD: tl.constexpr):
    """Pass 2 over one block: ``grad = coef e - beta [c == y] - g v`` with ``e = exp(x - m)`` and
    ``coef = scale alpha / s``, and (probabilities) ``target_grad = tcoef w (log s - (x - m))``."""
    z = x - m[:, None]
    if HAS_TGRAD:
        store_tile(tg_ptr, tgbase, cols, stgc, mask, tcoef * w[None, :] * (log_s[:, None] - z))
    if HAS_GRAD:
        grad = coef[:, None] * tl.exp(z)
        if not PROB:
            grad = grad - tl.where(cols[None, :] == y[:, None], beta[:, None], 0.0)
        if SMOOTH:
            grad = grad - g[:, None] * v
        store_tile(g_ptr, gbase, cols, sgc, mask, grad)


# ---- kernels ------------------------------------------------------------------------------------

@triton.jit
def _xent_kernel(x_ptr, sxn, sxc, sxl, y_ptr, t_ptr, stn, stc, stl, g_ptr, sgn, sgc, sgl, tg_ptr, stgn, stgc, stgl,
                 w_ptr, loss_ptr, scale, C, L, ignore_index, label_smoothing, gamma, gamma_int,
                 PROB: tl.constexpr, SMOOTH: tl.constexpr, FOCAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 HAS_GRAD: tl.constexpr, HAS_TGRAD: tl.constexpr, SCALE_PTR: tl.constexpr,
                 ONE_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Loss (and gradients) of ``BLOCK_R`` positions: index targets ``y`` or probabilities ``t`` (PROB);
    SMOOTH: the ``v`` sums are needed (PROB or label smoothing); FOCAL: ``gamma != 0`` (``gamma_int`` its
    integer part); ONE_BLOCK: ``C <= BLOCK_C``."""
    r, rmask, n, l = tile_rows(L, BLOCK_R)
    xbase, tbase = n * sxn + l * sxl, n * stn + l * stl
    gbase, tgbase = n * sgn + l * sgl, n * stgn + l * stgl
    ls = tl.cast(label_smoothing, tl.float32)
    cols = tl.arange(0, BLOCK_C)
    y = tl.zeros((BLOCK_R,), tl.int64)
    if not PROB:
        y, kept, hit, x_y, w_y = _class_target(y_ptr, r, rmask, C, ignore_index, w_ptr, x_ptr, xbase, sxc,
                                               HAS_WEIGHT)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s1 = tl.full((BLOCK_R,), -1.0, tl.float32)
    vs = tl.zeros((BLOCK_R,), tl.float32)
    a = tl.zeros((BLOCK_R,), tl.float32)
    if ONE_BLOCK:  # C <= BLOCK_C: the row in registers, read once
        x, mask, w, v = _block(x_ptr, xbase, sxc, t_ptr, tbase, stc, w_ptr, cols, rmask, C, ls, PROB, SMOOTH,
                               True, HAS_WEIGHT)
        m, s1, vs, a = _absorb(x, v, mask, m, s1, vs, a, SMOOTH)
    else:
        for c0 in range(0, C, BLOCK_C):
            x, mask, w, v = _block(x_ptr, xbase, sxc, t_ptr, tbase, stc, w_ptr, c0 + cols, rmask, C, ls, PROB,
                                   SMOOTH, True, HAS_WEIGHT)
            m, s1, vs, a = _absorb(x, v, mask, m, s1, vs, a, SMOOTH)

    # per row: log s, loss = beta (-log p_y) + g (V log s + A), grad = scale (alpha p - beta [c == y] - g v)
    log_s = tl.where(m == float("-inf"), float("nan"), log1p(s1))  # a row of only -inf: NaN, as torch
    if PROB:
        loss = vs * log_s + a
        alpha, beta, g = vs, tl.zeros_like(vs), tl.full((BLOCK_R,), 1.0, tl.float32)
    else:
        nll_y = (m - x_y) + log_s  # -log p_y, a sum of two terms >= 0
        if FOCAL:
            # d/dx_c of -q^g log p_y = a (p_c - [c == y]), a = q^g - g p_y q^(g-1) log p_y, q = 1 - p_y,
            # with q^(g-1) log p_y written q^g (log p_y / q), whose limit at q = 0 is -q^g
            q = -_expm1(-nll_y)
            q_g = tl.full((BLOCK_R,), 1.0, tl.float32)
            for _ in range(gamma_int):  # q^gamma = q^k q^f: k products, one exp2 for the fraction f
                q_g = q_g * q
            q_g = tl.where(q > 0, q_g * tl.exp2((gamma - gamma_int) * tl.log2(q)), 0.0)
            ratio = tl.where(q > 0, -nll_y / q, -1.0)
            loss = w_y * q_g * nll_y
            beta = w_y * q_g * (1.0 - gamma * tl.exp(-nll_y) * ratio)
        else:
            beta = (1.0 - ls) * w_y
            loss = beta * nll_y
        alpha = beta
        g = tl.zeros_like(beta)
        if SMOOTH:
            g = tl.where(hit, ls / C, 0.0)
            loss = loss + g * (vs * log_s + a)
            alpha = beta + g * vs
        loss = _kept(loss, hit, kept)
        alpha = _kept(alpha, hit, kept)
    tl.store(loss_ptr + r, loss.to(tl.float32), mask=rmask)
    if HAS_GRAD or HAS_TGRAD:
        sc = scalar(scale, SCALE_PTR)
        coef = sc * alpha / (1.0 + s1)
        beta, g, tcoef = sc * beta, sc * g, sc * (1.0 - ls)
        if ONE_BLOCK:
            _emit(x, v, w, mask, cols, y, m, coef, beta, g, log_s, tcoef, g_ptr, gbase, sgc, tg_ptr, tgbase,
                  stgc, PROB, SMOOTH, HAS_GRAD, HAS_TGRAD)
        else:
            blocks = tl.cdiv(C, BLOCK_C)
            for i in range(blocks):  # last block first: the likeliest still in L2
                c = (blocks - 1 - i) * BLOCK_C + cols
                x, mask, w, v = _block(x_ptr, xbase, sxc, t_ptr, tbase, stc, w_ptr, c, rmask, C, ls, PROB, SMOOTH,
                                       HAS_GRAD, HAS_WEIGHT)
                _emit(x, v, w, mask, c, y, m, coef, beta, g, log_s, tcoef, g_ptr, gbase, sgc, tg_ptr, tgbase,
                      stgc, PROB, SMOOTH, HAS_GRAD, HAS_TGRAD)


@triton.jit
def _nll_kernel(x_ptr, sxn, sxc, sxl, y_ptr, g_ptr, sgn, sgc, sgl, w_ptr, loss_ptr, scale, C, L, ignore_index,
                HAS_WEIGHT: tl.constexpr, HAS_GRAD: tl.constexpr, SCALE_PTR: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``loss = -w_y x[y]`` of ``BLOCK_R`` positions; gradient rows of zeros but ``-w_y scale`` at ``y``."""
    r, rmask, n, l = tile_rows(L, BLOCK_R)
    xbase, gbase = n * sxn + l * sxl, n * sgn + l * sgl
    y, kept, hit, x_y, w_y = _class_target(y_ptr, r, rmask, C, ignore_index, w_ptr, x_ptr, xbase, sxc, HAS_WEIGHT)
    tl.store(loss_ptr + r, _kept(-w_y * x_y, hit, kept), mask=rmask)
    if HAS_GRAD:
        at_y = _kept(-w_y * scalar(scale, SCALE_PTR), hit, kept)[:, None]
        rest = _kept(tl.zeros_like(w_y), hit, kept)[:, None]  # NaN on a row of an out-of-range target
        cols = tl.arange(0, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            store_tile(g_ptr, gbase, c, sgc, tile_mask(rmask, c, C), tl.where(c[None, :] == y[:, None], at_y, rest))


# ---- wrappers -----------------------------------------------------------------------------------

def xent_rows(x3: Tensor, target: Tensor, grad3: Tensor | None, target_grad3: Tensor | None,
              weight: Tensor | None, loss: Tensor, *, ignore_index: int, label_smoothing: float, gamma: float,
              scale: float | Tensor, block: int | None = None) -> None:
    """Softmax cross-entropy of every position of an ``(N, C, L)`` input, loss and gradients in one call:
    per row, the loss and ``scale * dloss/dx`` of :func:`losskit.ops.reference.rows.xent_rows_` (module
    docstring: bytes moved, precision, special rows; a target neither in [0, C) nor ``ignore_index``: NaN).

    ``x3``: (N, C, L) logits, any strides, float32/bfloat16/float16. ``target``: (N*L,) contiguous int64
    class indices (in [0, C) or ``ignore_index``), or (N, C, L) probabilities of any strides and floating
    dtype. ``grad3``: None or (N, C, L) in x3's dtype receiving ``scale * dloss/dx``, contiguous or ``x3``
    itself (then the logits become their gradient). ``target_grad3``: None or (N, C, L) receiving ``scale
    * dloss/dtarget`` (probabilities). ``weight``: None or (C,) float32 contiguous. ``loss``: (N, L)
    contiguous float32, receives the unreduced weighted loss (0 where ignored). ``scale``: a float or a
    0-dim float32 tensor on x3's device, read by the kernel. ``gamma != 0``: the focal loss (index
    targets). ``block``: BLOCK_C, a power of two (tests: rows longer than one block).
    """
    check_dtypes(x3=x3)
    if x3.shape[0] * x3.shape[2] == 0:
        return
    geo = RowTiles.of(x3, _TILING, block)
    prob = target.is_floating_point()
    scale, scale_ptr = scalar_arg(scale)
    _xent_kernel[geo.grid](*geo.strided(x3), None if prob else target, *geo.strided(target if prob else None),
                           *geo.strided(grad3), *geo.strided(target_grad3), weight, loss, scale, x3.shape[1],
                           geo.length, int(ignore_index), float(label_smoothing), float(gamma),
                           min(int(gamma), _MAX_GAMMA_PRODUCTS),
                           PROB=prob, SMOOTH=prob or label_smoothing != 0, FOCAL=gamma != 0,
                           HAS_WEIGHT=weight is not None, HAS_GRAD=grad3 is not None,
                           HAS_TGRAD=target_grad3 is not None, SCALE_PTR=scale_ptr,
                           ONE_BLOCK=geo.options["BLOCK_C"] >= x3.shape[1], **geo.options)


def nll_rows(x3: Tensor, target: Tensor, grad3: Tensor | None, weight: Tensor | None, loss: Tensor, *,
             ignore_index: int, scale: float | Tensor, block: int | None = None) -> None:
    """nll_loss of every position of ``x3`` (N, C, L) log-probabilities, any strides: ``-w[y] x[n, y, l]``
    and zeros but ``-w[y] * scale`` at the target, each gradient element written once (a target neither in
    [0, C) nor ``ignore_index``: a NaN loss and gradient row).

    ``target``: (N*L,) contiguous int64 in [0, C) or ``ignore_index``. ``loss``: (N, L) contiguous
    float32, receives ``-w[y] x[n, y, l]`` (0 where ignored). ``grad3``: contiguous (N, C, L) in x3's
    dtype that receives zeros and ``-w[y] * scale`` at each non-ignored target, or None. ``weight``: (C,)
    contiguous float32, or None. ``scale``: a float or a 0-dim float32 tensor on x3's device.
    """
    check_dtypes(x3=x3)
    if x3.shape[0] * x3.shape[2] == 0:
        return
    geo = RowTiles.of(x3, _TILING, block)
    scale, scale_ptr = scalar_arg(scale)
    _nll_kernel[geo.grid](*geo.strided(x3), target, *geo.strided(grad3), weight, loss, scale, x3.shape[1],
                          geo.length, int(ignore_index), HAS_WEIGHT=weight is not None,
                          HAS_GRAD=grad3 is not None, SCALE_PTR=scale_ptr, **geo.options)
