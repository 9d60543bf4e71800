"""Triton kernels of the vocab-parallel cross-entropy's local part: the two passes of
:class:`losskit.distributed._shard.ShardXent` over a rank's whole local logits, one launch each.

Reference expressions, with ``x = x3.float()`` the ``(N, V_r, L)`` logits of this rank's classes,
per-position tensors ``(N, L)`` broadcast over classes ``c`` (dim 1), and ``m' = m`` with ``-inf``
replaced by 0 (a row of all ``-inf``, a masked vocabulary range, is shifted by 0 and sums to 0):

* :func:`shard_stats`, ``ShardXent.stats_block_`` on every position::

      m = x.amax(1);  d = x - m'
      packed[0] = d.exp().sum(1)
      packed[1] = torch.where(owned, x.gather(1, safe[:, None]).squeeze(1), 0)
      packed[2] = (w_local[:, None] * d).sum(1)            # with label smoothing only

* :func:`shard_grad`, ``ShardXent.grad_block_`` on every position, after ``ShardXent.finish``::

      grad3 = ((x - big_m).exp() * alpha_over_s - beta * owned * (c == safe) - g * w_local).to(x3.dtype)

Roofline, ``s`` bytes per logit (4 float32, 2 bfloat16/float16): :func:`shard_stats` reads each logit
once (online max: the running sums are rescaled when the max grows) and writes nothing per element:
``s`` bytes per element. :func:`shard_grad` reads each logit once and writes its gradient once: ``2s``
bytes per element. Both passes move ``3s`` bytes per element (12 float32, 6 bfloat16); the torch blocks
move the same ``3s`` to and from memory, plus a float32 copy of every block and five or more passes
over it in cache (on CUDA, a kernel launch each). Per position, beside that: the target index and flag
(9 B), one target logit (one 32-byte sector, pass 1), 12-16 B of statistics written (pass 1) or 12-16 B
of factors read (pass 2): nothing next to ``V_r * s``. With class weights (read only where smoothing
uses them) every program reads ``w_local``, 4 bytes per class, from L2 (512 KiB at ``V_r = 131072``),
not from HBM. Loads vectorise (16-byte) where rows start 16-byte aligned: ``V_r`` (``L`` for
``L > 1``) a multiple of 16 / ``s``.

Layout: as the cross-entropy rows of :mod:`.xent` (:class:`~._tiles.RowTiles`): a tile of positions of one
sample walks its ``V_r`` classes in blocks, at least 32 positions where the classes are strided, short
rows sharing a tile. Nothing is allocated: the wrappers write the outputs they are given; no host
synchronisation.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._math import running_max
from ._tiles import (RowTiles, Tiling, check_dtypes, class_weights, column_at, load_tile, store_tile, tile_mask,
                     tile_rows)

__all__ = ["shard_grad", "shard_stats"]

#: Tiles of 4096 elements at 16 per thread: 8 warps (256 threads) for a full tile, 16 float32 registers
#: of logits per thread (four 16-byte loads of float32, two of bfloat16); the loop carries three running
#: values per row beside it, so registers stay bounded at any row length (no spills).
_TILING = Tiling(elements=4096, per_thread=16)


@triton.jit
def _stats_kernel(x_ptr, sxn, sxc, sxl, safe_ptr, owned_ptr, w_ptr, m_ptr, s_ptr, xy_ptr, t_ptr, C, L,
                  HAS_W: tl.constexpr, SMOOTHING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # x: (N, V_r, L) any strides and float dtype, read once; m, s, x_y, t: (N, L) float32 planes, written.
    r, rmask, n, l = tile_rows(L, BLOCK_R)
    xbase = n * sxn + l * sxl
    safe = tl.load(safe_ptr + r, mask=rmask, other=0)
    hit = rmask & (tl.load(owned_ptr + r, mask=rmask, other=0) != 0) & (safe >= 0) & (safe < C)
    x_y = column_at(x_ptr, xbase, safe, sxc, hit)

    cols = tl.arange(0, BLOCK_C)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)  # running max
    s = tl.zeros((BLOCK_R,), tl.float32)  # sum exp(x - shift), shift = running max or 0 while it is -inf
    t = tl.zeros((BLOCK_R,), tl.float32)  # sum w (x - shift)
    w_seen = tl.zeros((BLOCK_R,), tl.float32)  # sum of w over the columns already in t
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = tile_mask(rmask, c, C)
        x = load_tile(x_ptr, xbase, c, sxc, mask, float("-inf"), "evict_first")  # (BLOCK_R, BLOCK_C)
        m_new, shift, alpha = running_max(m, x)
        d = x - shift[:, None]
        s = s * alpha + tl.sum(tl.exp(d), 1)
        if SMOOTHING:
            w = class_weights(w_ptr, c, C, HAS_W)
            old_shift = tl.where(m == float("-inf"), 0.0, m)
            t += (old_shift - shift) * w_seen + tl.sum(tl.where((c < C)[None, :], w[None, :] * d, 0.0), 1)
            w_seen += tl.sum(w, 0)
        m = m_new
    tl.store(m_ptr + r, m, mask=rmask)
    tl.store(s_ptr + r, s, mask=rmask)
    tl.store(xy_ptr + r, x_y, mask=rmask)
    if SMOOTHING:
        tl.store(t_ptr + r, t, mask=rmask)


@triton.jit
def _grad_kernel(x_ptr, sxn, sxc, sxl, big_m_ptr, aos_ptr, beta_ptr, g_ptr, safe_ptr, owned_ptr, w_ptr,
                 grad_ptr, sgn, sgc, sgl, C, L,
                 HAS_G: tl.constexpr, HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # x: (N, V_r, L) any strides, read once; grad: (N, V_r, L) in x's dtype, written once; factors (N, L).
    r, rmask, n, l = tile_rows(L, BLOCK_R)
    xbase, gbase = n * sxn + l * sxl, n * sgn + l * sgl
    big_m = tl.load(big_m_ptr + r, mask=rmask, other=0.0)
    aos = tl.load(aos_ptr + r, mask=rmask, other=0.0)
    beta = tl.load(beta_ptr + r, mask=rmask, other=0.0)
    owned = tl.load(owned_ptr + r, mask=rmask, other=0) != 0
    target = tl.where(owned, tl.load(safe_ptr + r, mask=rmask, other=0), -1)  # a column only where owned
    if HAS_G:
        g = tl.load(g_ptr + r, mask=rmask, other=0.0)

    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = tile_mask(rmask, c, C)
        x = load_tile(x_ptr, xbase, c, sxc, mask, 0.0, "evict_first")  # (BLOCK_R, BLOCK_C)
        grad = tl.exp(x - big_m[:, None]) * aos[:, None]
        grad -= tl.where(c[None, :] == target[:, None], beta[:, None], 0.0)
        if HAS_G:
            grad -= g[:, None] * class_weights(w_ptr, c, C, HAS_W)[None, :]
        store_tile(grad_ptr, gbase, c, sgc, mask, grad)


def shard_stats(x3: Tensor, safe: Tensor, owned: Tensor, w_local: Tensor | None, m: Tensor, packed: Tensor, *,
                smoothing: bool, block: int | None = None) -> None:
    """Pass 1 of :class:`~losskit.distributed._shard.ShardXent` over all of ``x3`` in one launch.

    ``x3``: (N, V_r, L) local logits, any strides, float32/bfloat16/float16 (float64: ValueError).
    ``safe`` (N, L) int64 local target index, used only where ``owned`` (N, L) bool; ``w_local`` (V_r,)
    float32 or None. Writes ``m`` (N, L) float32 and ``packed`` (2, or 3 with ``smoothing``, N, L)
    float32, both contiguous, as the module docstring's reference expression.
    """
    check_dtypes(x3=x3)
    _require_contiguous("m", m)
    _require_contiguous("packed", packed)
    if x3.shape[0] * x3.shape[2] == 0:
        return
    geo = RowTiles.of(x3, _TILING, block)
    has_w = smoothing and w_local is not None
    _stats_kernel[geo.grid](
        *geo.strided(x3), safe.contiguous(), owned.contiguous(), w_local.contiguous() if has_w else m, m, packed[0],
        packed[1], packed[2] if smoothing else m, x3.shape[1], geo.length,
        HAS_W=has_w, SMOOTHING=smoothing, **geo.options)


def shard_grad(x3: Tensor, big_m: Tensor, alpha_over_s: Tensor, beta: Tensor, g: Tensor | None, safe: Tensor,
               owned: Tensor, w_local: Tensor | None, grad3: Tensor, *, block: int | None = None) -> None:
    """Pass 2 of :class:`~losskit.distributed._shard.ShardXent` over all of ``x3`` in one launch.

    ``x3``, ``safe``, ``owned``, ``w_local``: as :func:`shard_stats`'s. ``big_m`` (global max),
    ``alpha_over_s``, ``beta`` and ``g`` (None: no smoothing term): (N, L) float32 factors of
    ``ShardXent.finish``. Writes ``grad3`` ((N, V_r, L) in ``x3``'s dtype, any strides) as the module
    docstring's reference expression.
    """
    check_dtypes(x3=x3)
    if x3.shape[0] * x3.shape[2] == 0:
        return
    geo = RowTiles.of(x3, _TILING, block)
    has_g, has_w = g is not None, g is not None and w_local is not None
    big_m = big_m.contiguous()
    _grad_kernel[geo.grid](
        *geo.strided(x3), big_m, alpha_over_s.contiguous(), beta.contiguous(), g.contiguous() if has_g else big_m,
        safe.contiguous(), owned.contiguous(), w_local.contiguous() if has_w else big_m, *geo.strided(grad3),
        x3.shape[1], geo.length, HAS_G=has_g, HAS_W=has_w, **geo.options)


def _require_contiguous(name: str, t: Tensor) -> None:
    """An output written at flat ``(N, L)`` offsets must be contiguous."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (written at flat offsets), got strides {t.stride()}")
