"""Pure-torch per-element losses: the reference expressions of the elementwise kernels.

Each ``kernel(operands, want) -> (loss, grads)`` takes pieces of its operands in the accumulation dtype
(None where an operand is absent) and returns the unreduced loss and, where ``want[i]``, the gradient
with respect to operand ``i`` for a grad_output of ones. :func:`losskit.ops.reference.elementwise.run`
walks them over a whole tensor (the reference backend); the C and Triton kernels compute the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_Grads = tuple[Tensor | None, Tensor | None]

#: Floor of ``(1 - x) x`` in torch's BCE backward: ATen's ``EPSILON = 1e-12f``, a float32 constant,
#: 9.99999996e-13, used for every dtype (float64 included); the composite and the Triton kernel read it here.
BCE_EPSILON = float(torch.tensor(1e-12, dtype=torch.float32))


def _weighted(t: Tensor | None, w: Tensor | None) -> Tensor | None:
    """``t * w`` (in place; ``t`` is a fresh temporary) or ``t`` when either is None."""
    return t if t is None or w is None else t.mul_(w)


def bce(ops: Sequence[Tensor | None], want: Sequence[bool]) -> tuple[Tensor, _Grads]:
    """torch's CPU kernel and backward (ATen ``binary_cross_entropy``, ``EPSILON = float32(1e-12)``)::

        loss = w * ((y - 1) * max(log1p(-x), -100) - y * max(log(x), -100))
        dx   = w * (x - y) / max((1 - x) * x, 1e-12)
        dy   = w * -logit(x)
    """
    x, y, w = ops
    loss = (y - 1) * torch.log1p(-x).clamp_min_(-100) - y * torch.log(x).clamp_min_(-100)
    dx = (x - y).div_(((1 - x) * x).clamp_min_(BCE_EPSILON)) if want[0] else None
    dy = torch.logit(x).neg_() if want[1] else None
    return _weighted(loss, w), (_weighted(dx, w), _weighted(dy, w))


def bce_logits(ops: Sequence[Tensor | None], want: Sequence[bool]) -> tuple[Tensor, _Grads]:
    """torch's formulas (ATen ``binary_cross_entropy_with_logits`` and its backward), ``p`` = pos_weight::

        loss = w * ((1 - y) * x - (1 + (p - 1) * y) * logsigmoid(x))
        dx   = w * ((p * y + 1 - y) * sigmoid(x) - p * y)        (w * (sigmoid(x) - y) without p)
        dy   = w * (logsigmoid(-x) - p * logsigmoid(x))           (w * -x without p)
    """
    x, y, w, p = ops
    log_s = F.logsigmoid(x)
    weighted_log_s = log_s if p is None else log_s * ((p - 1) * y + 1)
    loss = (1 - y) * x - weighted_log_s
    dx = dy = None
    if want[0]:
        if p is None:
            dx = torch.sigmoid(x) - y
        else:
            py = p * y
            dx = (py + 1 - y).mul_(torch.sigmoid(x)).sub_(py)
    if want[1]:
        dy = -x if p is None else F.logsigmoid(-x).sub_(log_s.mul_(p))
    return _weighted(loss, w), (_weighted(dx, w), _weighted(dy, w))


def soft_margin(ops: Sequence[Tensor | None], want: Sequence[bool]) -> tuple[Tensor, _Grads]:
    """Per entry, before the mean over the last dim (torch's Python definition and its autograd)::

        loss = -w * (y * logsigmoid(x) + (1 - y) * logsigmoid(-x))
        dx   = w * (sigmoid(x) - y)
        dy   = w * (logsigmoid(-x) - logsigmoid(x))
    """
    x, y, w = ops
    log_s, log_sn = F.logsigmoid(x), F.logsigmoid(-x)
    loss = (y * log_s).add_((1 - y) * log_sn).neg_()
    dx = torch.sigmoid(x).sub_(y) if want[0] else None
    dy = log_sn - log_s if want[1] else None
    return _weighted(loss, w), (_weighted(dx, w), _weighted(dy, w))


def focal(ops: Sequence[Tensor | None], want: Sequence[bool], *, alpha: float, gamma: float
                  ) -> tuple[Tensor, _Grads]:
    """torchvision's ``sigmoid_focal_loss``, with ``s = sigmoid(x)``, ``ce`` torch's BCE-with-logits::

        q = 1 - p_t = s (1 - y) + (1 - s) y                   (no cancellation, unlike 1 - p_t)
        a = alpha y + (1 - alpha)(1 - y)                     (1 when alpha < 0)
        loss = a * ce * q**gamma
        dx = a * q**gamma * ((s - y) + gamma * (ce / q) * s (1 - s) (1 - 2y))
        dy = a' * ce * q**gamma + a * q**gamma * (-x + gamma * (ce / q) * (1 - 2s)),  a' = 2 alpha - 1 (0)

    ``ce / q`` tends to 1 where ``q`` underflows to 0 (``ce`` ~ ``q`` for a confidently right logit), so
    it is taken as 1 there: the gradient is 0 instead of torchvision's ``0 * inf = NaN`` for gamma < 1.
    """
    x, y = ops
    s, sn = torch.sigmoid(x), torch.sigmoid(-x)
    ny = 1 - y
    ce = torch.mul(ny, x).sub_(F.logsigmoid(x))  # torch's BCE-with-logits
    q = torch.mul(s, ny).addcmul_(sn, y)
    q_g = q.pow(gamma)
    loss = ce * q_g
    a = ny.mul_(1 - alpha).add_(y, alpha=alpha) if alpha >= 0 else None  # reuses the 1 - y piece
    # gamma * ce / q (1 where q == 0), written over ce: few live pieces, the focal kernel has the most.
    ratio = ce.div_(q).masked_fill_(q == 0, 1).mul_(gamma) if gamma and (want[0] or want[1]) else None
    dx = dy = None
    if want[1]:
        dy = torch.neg(x)
        if ratio is not None:
            dy.addcmul_(ratio, sn - s)
        dy = _weighted(dy.mul_(q_g), a)
        if a is not None:
            dy.add_(loss, alpha=2 * alpha - 1)
    if want[0]:
        dx = s - y
        if ratio is not None:
            r = ratio.mul_(s).mul_(sn)  # gamma (ce / q) s (1 - s), ratio is not used after this
            dx.add_(r).sub_(r.mul_(y).mul_(2))  # + r (1 - 2y)
        dx = _weighted(dx.mul_(q_g), a)
    return _weighted(loss, a), (dx, dy)


def mse(ops: Sequence[Tensor | None], want: Sequence[bool]
                ) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
    """``loss = w * (x - y)**2``, ``dx = 2 w (x - y)``, ``dy = -dx`` (w = 1 when None)."""
    x, y, w = ops
    d = x - y
    loss = d * d
    dx = d.mul_(2) if want[0] or want[1] else None
    if w is not None:
        loss.mul_(w)
        if dx is not None:
            dx.mul_(w)
    dy = torch.neg(dx) if want[1] else None
    return loss, (dx if want[0] else None, dy)


def kl_prob_target(ops: Sequence[Tensor | None], want: Sequence[bool]) -> tuple[Tensor, list[Tensor | None]]:
    """``xlogy(t, t) - t x``; d/dx = -t, d/dt = log t + 1 - x (NaN at t == 0 and t == inf, as torch's
    autograd, whose ``t / t`` term is NaN there)."""
    x, t = ops
    loss = torch.xlogy(t, t).sub_(t * x)
    grad_x = -t if want[0] else None
    grad_t = t.log().add_(1).sub_(x).masked_fill_((t == 0) | (t == math.inf), math.nan) if want[1] else None
    return loss, [grad_x, grad_t]


def kl_log_target(ops: Sequence[Tensor | None], want: Sequence[bool]) -> tuple[Tensor, list[Tensor | None]]:
    """``exp(tau) (tau - x)``; d/dx = -exp(tau), d/dtau = exp(tau) (tau - x + 1)."""
    x, tau = ops
    e = tau.exp()
    loss = e * (tau - x)
    grad_t = loss + e if want[1] else None
    grad_x = e.neg_() if want[0] else None
    return loss, [grad_x, grad_t]
