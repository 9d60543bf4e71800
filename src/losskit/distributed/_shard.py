"""Softmax cross-entropy of logits split by vocabulary across ranks: what one rank computes.

Reference expression. Rank ``r`` of ``W`` holds the logits ``x_r`` of classes ``start_r : start_r + V_r``
(ranks in order, ``V = sum_r V_r``); with ``x = torch.cat([x_0, ..., x_{W-1}], dim=1)`` every rank gets

    F.cross_entropy(x, target, weight, ignore_index=..., label_smoothing=..., reduction=...)

and the slice ``start_r : start_r + V_r`` of its gradient, and no rank ever holds ``x``.

Two passes over the local logits, in cache-sized ``(rows, V_r)`` blocks in the accumulation dtype:

1. statistics of every position: the local max ``m_r``, ``s_r = sum_c exp(x_c - m_r)``, the target
   logit ``x_y`` on the rank that owns ``y`` (0 elsewhere) and, with label smoothing,
   ``t_r = sum_c w_c (x_c - m_r)``. Then two collectives: ``M = all_reduce_max(m_r)``; each rank
   rescales ``s_r *= exp(m_r - M)`` and ``t_r += (m_r - M) * sum_c w_c`` (both relative to the global max
   now, so no term grows with the logits' magnitude) and one ``all_reduce_sum`` of the packed
   ``(s, x_y, t)`` gives ``lse = M + log S``, the target logit and the smoothing sum on every rank: the
   loss of every position, identical on all ranks.
2. the gradient, as in :mod:`losskit.ops.reference.rows`: ``p_c = exp(x_c - M) / S``,
   ``grad_c = scale * (alpha * p_c - beta * [c == y] - g * w_c)``.

Pass 2 recomputes ``exp`` from the input instead of keeping pass 1's values: that is the price of never
writing into the caller's logits and of keeping nothing input-sized but the gradient.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _reduction
from ..ops.blocks import Block
from ._comm import Comm


@dataclass(frozen=True)
class Shard:
    """Classes ``start : start + size`` of a vocabulary of ``total``, held by this rank."""

    start: int
    size: int
    total: int


def _put(dst2: Tensor, blk: Block, values: Tensor) -> None:
    """Write a block's ``(rows,)`` values into a per-position ``(N, L)`` tensor."""
    dst2[blk.b0:blk.b1, blk.l0:blk.l1] = values.view(blk.b1 - blk.b0, blk.l1 - blk.l0)


class ShardXent:
    """Per-position state of one vocab-parallel cross-entropy call; positions laid out as ``(N, L)``.

    ``target2``: (N, L) int64 global class indices, the same on every rank; ``weight``: (V,) class
    weights in the accumulation dtype, the same on every rank, or None.
    """

    def __init__(self, target2: Tensor, shard: Shard, weight: Tensor | None, ignore_index: int,
                 label_smoothing: float, acc: torch.dtype) -> None:
        self.shard, self.ls, self.acc = shard, label_smoothing, acc
        self.valid = target2 != ignore_index  # (N, L)
        local = target2 - shard.start
        self.owned = self.valid & (local >= 0) & (local < shard.size)  # this rank holds the target logit
        self.safe = local.masked_fill(~self.owned, 0)  # (N, L) an index into the shard for every position
        keep = self.valid.to(acc)
        self.w_y = weight[target2.masked_fill(~self.valid, 0)] * keep if weight is not None else keep
        self.w_local = None if weight is None else weight[shard.start:shard.start + shard.size]  # (V_r,)
        self.w_total = weight.sum() if weight is not None else float(shard.total)
        self.w_shard = self.w_local.sum() if self.w_local is not None else float(shard.size)
        n, length = target2.shape
        self.m = torch.empty(n, length, dtype=acc, device=target2.device)  # local max
        # packed rows, one all_reduce for all: sum of exp, target logit, smoothing sum (with smoothing).
        self.packed = torch.empty(3 if label_smoothing else 2, n, length, dtype=acc, device=target2.device)

    def denominator(self) -> Tensor:
        """The weighted-mean denominator: sum of ``w_y`` over non-ignored positions (a count unweighted)."""
        return self.w_y.sum()

    def stats_block_(self, blk: Block, work: Tensor) -> None:
        """Pass 1 on one block: ``work`` (rows, V_r) holds its logits in the accumulation dtype (destroyed)."""
        safe, owned = blk.positions(self.safe), blk.positions(self.owned)
        m = work.amax(1)  # (rows,)
        x_y = work.gather(1, safe.unsqueeze(1)).squeeze(1)
        _put(self.packed[1], blk, torch.where(owned, x_y, torch.zeros_like(x_y)))
        # A shard whose row is all -inf (a masked vocabulary range) adds exp(-inf) = 0; shifting it by 0
        # instead of its max keeps -inf - -inf = NaN out of the sums.
        work.sub_(m.masked_fill(m == -torch.inf, 0).unsqueeze(1))
        if self.ls:
            _put(self.packed[2], blk, work @ self.w_local if self.w_local is not None else work.sum(1))
        _put(self.packed[0], blk, work.exp_().sum(1))
        _put(self.m, blk, m)

    def finish(self, comm: Comm, reduction: str) -> Tensor:
        """The collectives, then the loss of every position (reduced) and the factors of pass 2."""
        big_m = comm.all_reduce_(self.m.clone(), "max")  # (N, L) global max
        finite = self.m != -torch.inf
        shift = self.m.masked_fill(~finite, 0) - big_m  # (shard's shift) - M <= 0
        self.packed[0].mul_(torch.where(finite, shift.exp(), torch.zeros_like(shift)))
        if self.ls:
            self.packed[2].add_(shift * self.w_shard)
        comm.all_reduce_(self.packed, "sum")
        log_s = self.packed[0].log()  # log sum_c exp(x_c - M) over the whole vocabulary
        self.big_m = big_m
        logp_y = ((self.packed[1] - big_m) - log_s).masked_fill(~self.valid, 0.0)  # ignored: 0, even if NaN
        ls, n_classes = self.ls, self.shard.total
        loss = -(1 - ls) * self.w_y * logp_y
        if ls:  # sum_c w_c * -logp_c = W * log S - sum_c w_c (x_c - M)
            loss = loss + (ls / n_classes) * (self.w_total * log_s - self.packed[2]).masked_fill(~self.valid, 0)

        denominator = self.denominator()
        scale = _reduction.scale(reduction, denominator, loss.numel())
        keep = self.valid.to(self.acc)
        self.beta = (1 - ls) * self.w_y * scale
        alpha = self.beta + (ls / n_classes) * self.w_total * keep * scale if ls else self.beta
        self.alpha_over_s = alpha / self.packed[0]  # p_c = exp(x_c - M) / S
        self.g = (ls / n_classes) * keep * scale if ls else None
        return _reduction.reduce(loss, reduction, denominator)

    def scaled(self, factor: Tensor) -> ShardXent:
        """A copy whose gradient factors are multiplied by ``factor`` (N, L), for a per-position
        ``grad_output`` (reduction "none"); this one stays as it is, for a second backward."""
        out = copy.copy(self)
        out.alpha_over_s, out.beta = self.alpha_over_s * factor, self.beta * factor
        out.g = None if self.g is None else self.g * factor
        return out

    def grad_block_(self, blk: Block, work: Tensor) -> None:
        """Pass 2 on one block: ``work`` (rows, V_r) holds its logits and becomes ``scale * dloss/dx``."""
        safe, owned = blk.positions(self.safe), blk.positions(self.owned)
        # exp(x_c - M) / S rather than exp(x_c - lse): x_c - M is exact where x_c is near M, while lse
        # rounded at the logits' magnitude (1e3, say) would cost p_c that rounding's relative error.
        work.sub_(blk.positions(self.big_m).unsqueeze(1)).exp_()
        work.mul_(blk.positions(self.alpha_over_s).unsqueeze(1))  # alpha * p_c
        beta = blk.positions(self.beta) * owned
        work.scatter_add_(1, safe.unsqueeze(1), -beta.unsqueeze(1))
        if self.g is not None:
            g = blk.positions(self.g)
            work.sub_(torch.outer(g, self.w_local) if self.w_local is not None else g.unsqueeze(1))
