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

Nothing is allocated: the wrappers write the outputs they are given; no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["shard_grad", "shard_stats"]

#: Elements of one ``(BLOCK_L, BLOCK_C)`` tile. At 8 warps (256 threads) a 4096-element tile is 16 float32
#: registers per thread (four 16-byte loads of float32 logits, two of bfloat16); the loop carries three
#: running values per position beside it, so registers stay bounded at any row length (no spills).
_TILE = 4096
#: Positions of one tile where consecutive positions are adjacent in memory (class stride != 1): each
#: class's 32 logits are one 128-byte line in float32 (64 B in 16-bit), so every load is coalesced.
_POSITIONS = 32
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _config(n_classes: int, length: int, class_stride: int, block: int | None) -> tuple[int, int, int]:
    """``(BLOCK_L, BLOCK_C, num_warps)``: tiles of ``BLOCK_L`` positions by ``BLOCK_C`` classes.

    Classes adjacent in memory (class stride 1: ``(N, V_r)`` logits, the language-model head): one
    position per program, its row walked in blocks of up to ``_TILE`` columns (16 KiB float32). Else
    (``L > 1`` and ``(N, V_r, d1..dk)`` contiguous, class stride ``L``): ``_POSITIONS`` positions per
    program, ``_TILE / _POSITIONS`` = 128 classes per step. Rows shorter than a tile get a tile of their
    next power of two (at least 16 columns); ``num_warps`` keeps 16 elements per thread (1 to 8 warps).
    ``block`` overrides the number of columns (a power of two; tests use small ones).
    """
    block_l = 1 if length == 1 or class_stride == 1 else min(_POSITIONS, triton.next_power_of_2(length))
    if block is None:
        block_c = min(_TILE // block_l, max(16, triton.next_power_of_2(n_classes)))
    elif block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two (columns per step), got {block}")
    else:
        block_c = block
    return block_l, block_c, max(1, min(8, block_l * block_c // 512))


@triton.jit
def _tile_rows(pid, length, l_blocks, stride_n, stride_l, BLOCK_L: tl.constexpr):
    """Program ``pid``'s positions ``(n, l0 : l0 + BLOCK_L)``: their mask, flat ``(N, L)`` index and the
    int64 offset of each position's class 0 in a tensor of strides ``(stride_n, ., stride_l)``."""
    n = (pid // l_blocks).to(tl.int64)
    ls = (pid % l_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    return ls < length, n * length + ls, n * stride_n + ls.to(tl.int64) * stride_l


@triton.jit
def _stats_kernel(x_ptr, safe_ptr, owned_ptr, w_ptr, m_ptr, s_ptr, xy_ptr, t_ptr,
                  n_classes, length, l_blocks, stride_n, stride_c, stride_l,
                  HAS_W: tl.constexpr, SMOOTHING: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    # x: (N, V_r, L) any strides and float dtype, read once; m, s, x_y, t: (N, L) float32 planes, written.
    l_in, pos, row = _tile_rows(tl.program_id(0), length, l_blocks, stride_n, stride_l, BLOCK_L)
    safe = tl.load(safe_ptr + pos, mask=l_in, other=0)
    hit = l_in & (tl.load(owned_ptr + pos, mask=l_in, other=0) != 0) & (safe >= 0) & (safe < n_classes)
    x_y = tl.load(x_ptr + row + safe * stride_c, mask=hit, other=0.0).to(tl.float32)  # in range where read

    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    m = tl.full((BLOCK_L,), float("-inf"), tl.float32)  # running max
    s = tl.zeros((BLOCK_L,), tl.float32)  # sum exp(x - shift), shift = running max or 0 while it is -inf
    t = tl.zeros((BLOCK_L,), tl.float32)  # sum w (x - shift)
    w_seen = tl.zeros((BLOCK_L,), tl.float32)  # sum of w over the columns already in t
    for c0 in range(0, n_classes, BLOCK_C):
        c = c0 + cols
        c_in = c < n_classes
        x = tl.load(x_ptr + row[:, None] + c[None, :] * stride_c, mask=l_in[:, None] & c_in[None, :],
                    other=float("-inf"), eviction_policy="evict_first").to(tl.float32)  # (BLOCK_L, BLOCK_C)
        m_new = tl.maximum(m, tl.max(x, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = x - shift[:, None]
        # exp(m - m_new) would be exp(-inf - -inf) = NaN while both are -inf (s is 0 then: keep it).
        s = s * tl.where(m_new == m, 1.0, tl.exp(m - m_new)) + tl.sum(tl.exp(d), 1)
        if SMOOTHING:
            if HAS_W:
                w = tl.load(w_ptr + c, mask=c_in, other=0.0, eviction_policy="evict_last")
            else:
                w = c_in.to(tl.float32)
            old_shift = tl.where(m == float("-inf"), 0.0, m)
            t += (old_shift - shift) * w_seen + tl.sum(tl.where(c_in[None, :], w[None, :] * d, 0.0), 1)
            w_seen += tl.sum(w, 0)
        m = m_new
    tl.store(m_ptr + pos, m, mask=l_in)
    tl.store(s_ptr + pos, s, mask=l_in)
    tl.store(xy_ptr + pos, x_y, mask=l_in)
    if SMOOTHING:
        tl.store(t_ptr + pos, t, mask=l_in)


@triton.jit
def _grad_kernel(x_ptr, big_m_ptr, aos_ptr, beta_ptr, g_ptr, safe_ptr, owned_ptr, w_ptr, grad_ptr,
                 n_classes, length, l_blocks, stride_n, stride_c, stride_l, gstride_n, gstride_c, gstride_l,
                 HAS_G: tl.constexpr, HAS_W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    # x: (N, V_r, L) any strides, read once; grad: (N, V_r, L) in x's dtype, written once; factors (N, L).
    pid = tl.program_id(0)
    l_in, pos, row = _tile_rows(pid, length, l_blocks, stride_n, stride_l, BLOCK_L)
    _, _, grad_row = _tile_rows(pid, length, l_blocks, gstride_n, gstride_l, BLOCK_L)
    big_m = tl.load(big_m_ptr + pos, mask=l_in, other=0.0)
    aos = tl.load(aos_ptr + pos, mask=l_in, other=0.0)
    beta = tl.load(beta_ptr + pos, mask=l_in, other=0.0)
    owned = tl.load(owned_ptr + pos, mask=l_in, other=0) != 0
    target = tl.where(owned, tl.load(safe_ptr + pos, mask=l_in, other=0), -1)  # a column only where owned
    if HAS_G:
        g = tl.load(g_ptr + pos, mask=l_in, other=0.0)

    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    for c0 in range(0, n_classes, BLOCK_C):
        c = c0 + cols
        c_in = c < n_classes
        mask = l_in[:, None] & c_in[None, :]
        x = tl.load(x_ptr + row[:, None] + c[None, :] * stride_c, mask=mask, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)  # (BLOCK_L, BLOCK_C)
        grad = tl.exp(x - big_m[:, None]) * aos[:, None]
        grad -= tl.where(c[None, :] == target[:, None], beta[:, None], 0.0)
        if HAS_G:
            if HAS_W:
                grad -= g[:, None] * tl.load(w_ptr + c, mask=c_in, other=0.0, eviction_policy="evict_last")[None, :]
            else:
                grad -= g[:, None]
        tl.store(grad_ptr + grad_row[:, None] + c[None, :] * gstride_c, grad.to(grad_ptr.dtype.element_ty),
                 mask=mask)


def _launch_shape(x3: Tensor, block: int | None) -> tuple[int, int, int, int]:
    """``(BLOCK_L, BLOCK_C, num_warps, programs)`` for ``x3``, after checking its dtype."""
    if x3.dtype not in _DTYPES:
        raise ValueError(f"x3 must be float32, bfloat16 or float16 for the Triton kernels (computed in "
                         f"float32), got {x3.dtype}")
    n, n_classes, length = x3.shape
    block_l, block_c, warps = _config(n_classes, length, x3.stride(1), block)
    return block_l, block_c, warps, n * triton.cdiv(length, block_l)


def _strides(t: Tensor) -> tuple[int, int, int]:
    """``t``'s (N, V_r, L) strides, with 0 for L when L == 1 (l is always 0 then). A stride of 0 is
    divisible by 16, so Triton knows each row starts where the class-0 pointer does and vectorises the
    row's loads (16-byte, from aligned rows); a stride of 1 it would make a constant, but ``l * 1`` for an
    unknown ``l`` proves no alignment."""
    n_stride, c_stride, l_stride = t.stride()
    return n_stride, c_stride, l_stride if t.shape[2] > 1 else 0


def _require_contiguous(name: str, t: Tensor) -> None:
    """An output written at flat ``(N, L)`` offsets must be contiguous."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (written at flat offsets), got strides {t.stride()}")


def shard_stats(x3: Tensor, safe: Tensor, owned: Tensor, w_local: Tensor | None, m: Tensor, packed: Tensor, *,
                smoothing: bool, block: int | None = None) -> None:
    """Pass 1 of :class:`~losskit.distributed._shard.ShardXent` over all of ``x3`` in one launch.

    ``x3``: (N, V_r, L) local logits, any strides, float32/bfloat16/float16 (float64: ValueError).
    ``safe`` (N, L) int64 local target index, used only where ``owned`` (N, L) bool; ``w_local`` (V_r,)
    float32 or None. Writes ``m`` (N, L) float32 and ``packed`` (2, or 3 with ``smoothing``, N, L)
    float32, both contiguous, as the module docstring's reference expression.
    """
    block_l, block_c, warps, programs = _launch_shape(x3, block)
    _require_contiguous("m", m)
    _require_contiguous("packed", packed)
    if programs == 0:
        return
    _, n_classes, length = x3.shape
    has_w = smoothing and w_local is not None
    _stats_kernel[(programs,)](
        x3, safe.contiguous(), owned.contiguous(), w_local.contiguous() if has_w else m, m, packed[0], packed[1],
        packed[2] if smoothing else m, n_classes, length, triton.cdiv(length, block_l), *_strides(x3),
        HAS_W=has_w, SMOOTHING=smoothing, BLOCK_L=block_l, BLOCK_C=block_c, num_warps=warps)


def shard_grad(x3: Tensor, big_m: Tensor, alpha_over_s: Tensor, beta: Tensor, g: Tensor | None, safe: Tensor,
               owned: Tensor, w_local: Tensor | None, grad3: Tensor, *, block: int | None = None) -> None:
    """Pass 2 of :class:`~losskit.distributed._shard.ShardXent` over all of ``x3`` in one launch.

    ``x3``, ``safe``, ``owned``, ``w_local``: as :func:`shard_stats`'s. ``big_m`` (global max),
    ``alpha_over_s``, ``beta`` and ``g`` (None: no smoothing term): (N, L) float32 factors of
    ``ShardXent.finish``. Writes ``grad3`` ((N, V_r, L) in ``x3``'s dtype, any strides) as the module
    docstring's reference expression.
    """
    block_l, block_c, warps, programs = _launch_shape(x3, block)
    if programs == 0:
        return
    _, n_classes, length = x3.shape
    has_g, has_w = g is not None, g is not None and w_local is not None
    big_m = big_m.contiguous()
    _grad_kernel[(programs,)](
        x3, big_m, alpha_over_s.contiguous(), beta.contiguous(), g.contiguous() if has_g else big_m,
        safe.contiguous(), owned.contiguous(), w_local.contiguous() if has_w else big_m, grad3,
        n_classes, length, triton.cdiv(length, block_l), *_strides(x3), *_strides(grad3),
        HAS_G=has_g, HAS_W=has_w, BLOCK_L=block_l, BLOCK_C=block_c, num_warps=warps)
