"""The losses where no fast kernel runs (MPS, CUDA without Triton, a CPU without the C extension).

Each function is torch's own loss where torch has one, else a short composite of torch ops; either way
torch's autograd gives the gradient. The number of ops per call is constant whatever the size: the
block-wise reference (:mod:`losskit.ops.reference`) issues a few ops per cache-sized block, which is
thousands of kernel launches on a large input on an accelerator, where the composites issue tens.
Composites compute in the accumulation dtype (float32, float64 for float64) and return the dtype their
functional documents. Memory: autograd keeps what each op's backward needs (log-probabilities, sigmoids:
one to three input-sized tensors in the accumulation dtype), where the fused paths keep the gradient only.
Every function runs under torch.func transforms and torch.compile, which the dispatcher also sends here.

Called after the functional validated the arguments and applied its autocast casts: nothing is checked
here. The results are those documented in :mod:`losskit.functional` (torch's where torch has the loss).
Where autograd of the plain formula would give ``inf * 0 = NaN`` and the documented gradient is finite, a
double ``torch.where`` keeps the unselected branch finite (:func:`_pow_finite_at_zero`, :func:`rmse_loss`,
:func:`entropy`); :func:`binary_cross_entropy` alone has its own backward: torch's kernel asserts on NaN
(a device-side assert on CUDA), where losskit propagates it, and torch's gradient is not autograd's of
the clamped formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _reduction
from .blocks import accumulation_dtype, class_dim
from .reference.losses import BCE_EPSILON

__all__ = ["binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy", "entropy", "focal_loss",
           "kl_div", "log_softmax", "mse_loss", "multilabel_soft_margin_loss", "nll_loss", "rmse_loss",
           "sigmoid_focal_loss", "softmax"]

#: torch's reduction enum of ``torch.kl_div`` (``F.kl_div`` would repeat the functional's "mean" warning).
_KL_NONE = 0


def _pow_finite_at_zero(q: Tensor, gamma: float) -> Tensor:
    """``q ** gamma`` with gradient 0 where ``q == 0``: pow's own is ``gamma * 0 ** (gamma - 1) = inf`` for
    gamma < 1, and the focal losses multiply it by a factor that is 0 there (a NaN after the chain rule)."""
    positive = q > 0
    return torch.where(positive, torch.where(positive, q, 1.0).pow(gamma), 0.0 ** gamma)


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None, *, ignore_index: int, reduction: str,
                  label_smoothing: float) -> Tensor:
    """``F.cross_entropy``, for index and probability targets, in the input's dtype."""
    if target.shape != input.shape:
        target = target.long()  # torch takes int64 (or uint8) indices only
    # torch wants the weight in the input's dtype; probabilities of another dtype promote its result
    loss = F.cross_entropy(input, target, None if weight is None else weight.to(input.dtype),
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    return loss.to(input.dtype)


def focal_loss(input: Tensor, target: Tensor, weight: Tensor | None, *, gamma: float, ignore_index: int,
               reduction: str) -> Tensor:
    """``-w_y (1 - p_y) ** gamma * log p_y`` from ``log_softmax`` + gather; "mean" divides by ``sum w_y``."""
    cd, acc = class_dim(input), accumulation_dtype(input.dtype)
    ignored = target == ignore_index  # the positions' shape
    safe = target.long().masked_fill(ignored, 0)
    # masked: an ignored position is 0, even where its class-0 log-probability is -inf
    logp_y = input.to(acc).log_softmax(cd).gather(cd, safe.unsqueeze(cd)).squeeze(cd).masked_fill(ignored, 0.0)
    w_y = (~ignored).to(acc) if weight is None else weight.to(acc)[safe].masked_fill(ignored, 0.0)
    # 1 - p_y as -expm1(log p_y): accurate when p_y is near 1
    loss = -w_y * _pow_finite_at_zero(-torch.expm1(logp_y), gamma) * logp_y
    return _reduction.reduce(loss, reduction, w_y.sum()).to(input.dtype)


def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None, *, ignore_index: int, reduction: str) -> Tensor:
    """``F.nll_loss`` (int64 targets, the weight in the input's dtype, as torch requires)."""
    return F.nll_loss(input, target.long(), None if weight is None else weight.to(input.dtype),
                      ignore_index=ignore_index, reduction=reduction)


def softmax(input: Tensor, dim: int, dtype: torch.dtype | None) -> Tensor:
    """``torch.softmax``."""
    return torch.softmax(input, dim, dtype=dtype)


def log_softmax(input: Tensor, dim: int, dtype: torch.dtype | None) -> Tensor:
    """``torch.log_softmax``."""
    return torch.log_softmax(input, dim, dtype=dtype)


def entropy(input: Tensor, dim: int, *, logits: bool) -> Tensor:
    """``-sum(p log p)`` along ``dim``, 0 log 0 = 0 with gradient 0; ``log p = log_softmax(input)`` for logits."""
    x = input.to(accumulation_dtype(input.dtype))
    if logits:
        # Every term -p log p >= 0: no cancellation. A -inf logit (or an underflowed p) is a 0 term, and
        # its log p is replaced before the product, so that no 0 * -inf reaches the loss or the gradient.
        logp = x.log_softmax(dim)
        p = logp.exp()
        h = -(p * torch.where(p > 0, logp, 0.0)).sum(dim)
    else:
        # xlogy(p, p) differentiates to NaN at p = 0 through its second argument: 1 there instead.
        h = -torch.xlogy(x, torch.where(x == 0, 1.0, x)).sum(dim)
    return h.to(input.dtype)


def kl_div(input: Tensor, target: Tensor, *, reduction: str, log_target: bool) -> Tensor:
    """``torch.kl_div``, reduced here ("batchmean": the sum divided by ``input.shape[0]``)."""
    loss = torch.kl_div(input, target, _KL_NONE, log_target=log_target)
    if reduction == "batchmean":
        return _reduction.reduce(loss, "mean", input.shape[0] if input.dim() else 1)
    return _reduction.reduce(loss, reduction)


class _BinaryCrossEntropy(torch.autograd.Function):
    """torch's elementwise BCE and its gradients (``w`` None or broadcastable to ``x``)::

        loss = w * ((y - 1) * max(log1p(-x), -100) - y * max(log(x), -100))
        dx   = w * (x - y) / max((1 - x) x, 1e-12),   dy = w * -logit(x)

    Written with ``setup_context`` and a generated vmap rule, so that torch.func transforms (which the
    dispatcher sends here) can run it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, y: Tensor, w: Tensor | None) -> Tensor:  # type: ignore[override]
        loss = (y - 1) * torch.log1p(-x).clamp_min(-100) - y * torch.log(x).clamp_min(-100)
        return loss if w is None else loss * w

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:  # type: ignore[override]
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, y, w = ctx.saved_tensors
        g = grad if w is None else grad * w
        dx = g * (x - y) / ((1 - x) * x).clamp_min(BCE_EPSILON) if ctx.needs_input_grad[0] else None
        dy = -g * torch.logit(x) if ctx.needs_input_grad[1] else None
        return dx, dy, None


def binary_cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None, *, reduction: str) -> Tensor:
    """torch's BCE formula and gradients, NaN propagating (torch's kernel raises, or asserts on CUDA)."""
    acc = accumulation_dtype(input.dtype)
    w = None if weight is None else weight.to(acc)
    loss = _BinaryCrossEntropy.apply(input.to(acc), target.to(acc), w)
    return _reduction.reduce(loss, reduction).to(input.dtype)


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Tensor | None, *, reduction: str,
                                     pos_weight: Tensor | None) -> Tensor:
    """``F.binary_cross_entropy_with_logits``, the weights in the output dtype (that of input and target)."""
    out = torch.promote_types(input.dtype, target.dtype)
    w, p = (None if c is None else c.to(out) for c in (weight, pos_weight))
    return F.binary_cross_entropy_with_logits(input.to(out), target.to(out), w, reduction=reduction, pos_weight=p)


def multilabel_soft_margin_loss(input: Tensor, target: Tensor, weight: Tensor | None, *, reduction: str) -> Tensor:
    """``F.multilabel_soft_margin_loss``."""
    return F.multilabel_soft_margin_loss(input, target, weight, reduction=reduction)


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, *, alpha: float, gamma: float, reduction: str) -> Tensor:
    """``alpha_t * ce * (1 - p_t) ** gamma``, torchvision's formula with ``1 - p_t = lerp(s, sigmoid(-x), y)``."""
    out = torch.promote_types(inputs.dtype, targets.dtype)
    acc = accumulation_dtype(out)
    x, y = inputs.to(acc), targets.to(acc)
    # 1 - p_t = s (1 - y) + (1 - s) y, with 1 - s as sigmoid(-x): no cancellation where s is near 1
    q = torch.lerp(torch.sigmoid(x), torch.sigmoid(-x), y)
    loss = F.binary_cross_entropy_with_logits(x, y, reduction="none") * _pow_finite_at_zero(q, gamma)
    if alpha >= 0:
        loss = loss * (y * (2 * alpha - 1) + (1 - alpha))  # alpha y + (1 - alpha)(1 - y)
    return _reduction.reduce(loss, reduction).to(out)


def mse_loss(input: Tensor, target: Tensor, *, reduction: str, weight: Tensor | None) -> Tensor:
    """``F.mse_loss`` (torch's weighted "mean" divides by ``sum w``)."""
    return F.mse_loss(input, target, reduction=reduction, weight=weight)


def rmse_loss(input: Tensor, target: Tensor, *, weight: Tensor | None) -> Tensor:
    """``sqrt(F.mse_loss(input, target, weight=weight))``, with gradient 0 (not NaN) where it is 0."""
    m = mse_loss(input, target, reduction="mean", weight=weight)
    zero = m == 0  # not m > 0: a NaN mean stays NaN
    return torch.where(zero, 0.0, torch.where(zero, 1.0, m).sqrt())
