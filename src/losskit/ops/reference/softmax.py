"""Pure-torch entropy rows: the reference backend of the ``entropy_rows`` operation.

Reference expression: ``-torch.xlogy(p, p).sum(1)`` for probabilities ``p = x3`` and
``-torch.xlogy(q, q).sum(1)`` with ``q = x3.softmax(1)`` for logits, with the gradients documented in
:func:`losskit.functional.entropy`. (softmax and log_softmax have no row operation here: their
reference is ``torch.softmax`` / ``torch.log_softmax`` themselves.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..blocks import block_rows, blocks, work_buffer


def entropy_rows(x3: Tensor, h: Tensor, grad3: Tensor | None, *, logits: bool) -> None:
    """Entropy of each row of ``x3`` (N, C, L) along dim 1 into ``h`` ((N, L), accumulation dtype) and
    its gradient into ``grad3`` ((N, C, L)) unless None: the arguments of
    :func:`losskit.ops.cpu.native_softmax.entropy_rows`, computed over cache-sized blocks."""
    n, c, length = x3.shape
    acc = h.dtype
    want = grad3 is not None
    # work: (rows, C) accumulation dtype, BLOCK_BYTES; the kernel adds about three more of its size.
    rows = block_rows(c, torch.finfo(acc).bits // 8)
    buf = work_buffer(min(rows, n * length), c, acc, x3.device)
    h2 = h.view(n, length)
    for blk in blocks(n, length, rows):
        nb, nl = blk.b1 - blk.b0, blk.l1 - blk.l0
        work = buf[:blk.rows]
        work.view(nb, nl, c).copy_(blk.of(x3))
        h2[blk.b0:blk.b1, blk.l0:blk.l1] = entropy_rows_(work, logits, want).view(nb, nl)
        if want:
            blk.of(grad3).copy_(work.view(nb, nl, c))


def entropy_rows_(work: Tensor, logits: bool, want: bool) -> Tensor:
    """Entropy of each row of ``work`` (rows, C); if ``want``, ``work`` becomes ``dH/dwork``."""
    if not logits:
        h = -torch.xlogy(work, work).sum(1)
        if want:
            absent = work == 0
            work.log_().add_(1).neg_().masked_fill_(absent, 0.0)  # -(log p + 1); 0 where p == 0
        return h
    work.sub_(work.amax(1, keepdim=True))  # z = x - max <= 0 (NaN for a row of -inf)
    e = work.exp()  # (rows, C)
    absent = e == 0  # -inf logits (or exp underflow): p z -> 0
    s = e.sum(1)
    mean_z = (e * work).masked_fill_(absent, 0.0).sum(1) / s  # sum_c p_c z_c <= 0
    h = s.log() - mean_z
    if want:
        # p_c (mean_z - z_c) = e_c (mean_z - z_c) / s
        work.neg_().add_(mean_z.unsqueeze(1)).mul_(e).masked_fill_(absent, 0.0).div_(s.unsqueeze(1))
    return h
