"""Fused elementwise losses, after validation: binary cross-entropy (from probabilities and from
logits), multi-label soft margin, sigmoid focal, mean and root mean squared error, KL divergence.

Each driver asks :mod:`losskit.ops._dispatch` for a backend. The composite (torch's own loss) runs
where no kernel does; otherwise a *runner* (the ``binary`` or ``pointwise`` operation: the C kernel,
the Triton kernel, or :func:`losskit.ops.reference.elementwise.run` over the torch expression of
:mod:`losskit.ops.reference.losses`, which is also what the others are tested against) computes the
loss and the gradients in one pass, and :func:`losskit._autograd.attach` hands them to autograd.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _checks, _reduction
from .._autograd import attach, needs_grad
from . import _dispatch, composite
from .blocks import accumulation_dtype
from .reference import losses
from .reference.elementwise import KL_LOG, KL_PROB, MSE, Kernel, Runner

def _runner(op: str, backend: str, kind: str | int, **params: float) -> Runner:
    return _dispatch.kernel(op, backend)(kind, **params)


def forward(kernel: Kernel, operands: Sequence[Tensor | None], want: Sequence[bool], reduction: str,
            out_dtype: torch.dtype, denominator: Tensor | float | None = None,
            row_length: int | None = None, *, runner: Runner) -> tuple[Tensor, list[Tensor | None]]:
    """The loss (``out_dtype`` for "none", a 0-dim accumulation-dtype tensor otherwise) and the gradients
    of ``operands`` (input first) where ``want``; call under ``torch.no_grad()``.

    "mean" divides by ``denominator`` (default: the element count). With ``row_length = C`` the loss of
    a row is the sum of its entries over the last dim divided by C, and "mean" averages the rows.
    ``runner`` computes the loss and gradients (``kernel`` is its reference expression).
    """
    acc = accumulation_dtype(out_dtype)
    count = operands[0].numel()
    keep = reduction == "none"
    if row_length is None:
        scale = _reduction.scale(reduction, denominator, count)
        loss, grads = runner(kernel, operands, want, acc=acc, out_dtype=out_dtype, keep=keep, grad_scale=scale)
        return _reduction.reduce(loss, reduction, count if denominator is None else denominator), grads
    rows = operands[0].shape[:-1].numel()
    scale = _reduction.scale(reduction, rows, rows) / row_length if count else 0.0
    loss, grads = runner(kernel, operands, want, acc=acc, out_dtype=out_dtype, keep=keep, grad_scale=scale,
                         sum_last_dim=True)
    # Row sums (or the total of the partial sums, standing for the sum of rows) divided by C: as in torch,
    # a row of C = 0 entries is 0 / 0 = NaN, and there is no term at all when there are no rows.
    if keep:
        per_row = loss / row_length
    else:
        per_row = loss.sum(0, keepdim=True) / row_length if rows else loss.new_zeros(0)
    return _reduction.reduce(per_row, reduction, rows).to(out_dtype), grads


def _fused(kernel: Kernel, operands: Sequence[Tensor | None], reduction: str, out_dtype: torch.dtype,
           denominator: Tensor | float | None = None, row_length: int | None = None, *, runner: Runner) -> Tensor:
    """Fused loss of ``operands = (input, target, *constants)``: gradients for input and target when they
    require grad, computed in the same pass as the loss, then attached."""
    want = (*needs_grad(operands[0], operands[1]), *([False] * (len(operands) - 2)))
    with torch.no_grad():
        loss, grads = forward(kernel, operands, want, reduction, out_dtype, denominator, row_length, runner=runner)
    return attach(loss.to(out_dtype), operands[:2], grads[:2], expand_dim=None if row_length is None else -1)


def binary_cross_entropy(x: Tensor, t: Tensor, w: Tensor | None, *, reduction: str, impl: str) -> Tensor:
    backend = _dispatch.backend("binary", impl, x, t, w)
    if backend == _dispatch.COMPOSITE:
        return composite.binary_cross_entropy(x, t, w, reduction=reduction)
    if backend != _dispatch.CPU:
        # The C kernel checks the [0, 1] domain in its pass; the others get whole tensors checked here,
        # before any piece is computed: one synchronisation each, not one per piece.
        _checks.in_unit_interval("input", x)
        _checks.in_unit_interval("target", t)
    return _fused(losses.bce, (x, t, w), reduction, x.dtype, runner=_runner("binary", backend, "bce"))


def binary_cross_entropy_with_logits(x: Tensor, t: Tensor, w: Tensor | None, p: Tensor | None, *, reduction: str,
                                     impl: str) -> Tensor:
    backend = _dispatch.backend("binary", impl, x, t, w, p)
    if backend == _dispatch.COMPOSITE:
        return composite.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=p)
    return _fused(losses.bce_logits, (x, t, w, p), reduction, torch.promote_types(x.dtype, t.dtype),
                  runner=_runner("binary", backend, "logits"))


def multilabel_soft_margin_loss(x: Tensor, t: Tensor, w: Tensor | None, *, reduction: str, out_dtype: torch.dtype,
                                impl: str) -> Tensor:
    backend = _dispatch.backend("binary", impl, x, t, w)
    if backend == _dispatch.COMPOSITE:
        return composite.multilabel_soft_margin_loss(x, t, w, reduction=reduction)
    return _fused(losses.soft_margin, (x, t, w), reduction, out_dtype, row_length=x.shape[-1],
                  runner=_runner("binary", backend, "soft_margin"))


def sigmoid_focal_loss(x: Tensor, t: Tensor, *, alpha: float, gamma: float, reduction: str, impl: str) -> Tensor:
    backend = _dispatch.backend("binary", impl, x, t)
    if backend == _dispatch.COMPOSITE:
        return composite.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction)
    kernel = functools.partial(losses.focal, alpha=alpha, gamma=gamma)
    return _fused(kernel, (x, t), reduction, torch.promote_types(x.dtype, t.dtype),
                  runner=_runner("binary", backend, "focal", alpha=alpha, gamma=gamma))


def _mse_denominator(w: Tensor | None, out_dtype: torch.dtype) -> Tensor | None:
    """Weighted "mean" divides by the weights' sum (torch's rule); None means the element count."""
    return None if w is None else w.sum(dtype=accumulation_dtype(out_dtype))


def mse_loss(x: Tensor, t: Tensor, w: Tensor | None, *, reduction: str, out_dtype: torch.dtype, impl: str) -> Tensor:
    backend = _dispatch.backend("pointwise", impl, x, t, w)
    if backend == _dispatch.COMPOSITE:
        return composite.mse_loss(x, t, reduction=reduction, weight=w)
    return _fused(losses.mse, (x, t, w), reduction, out_dtype, _mse_denominator(w, out_dtype),
                  runner=_runner("pointwise", backend, MSE))


def rmse_loss(x: Tensor, t: Tensor, w: Tensor | None, *, out_dtype: torch.dtype, impl: str) -> Tensor:
    backend = _dispatch.backend("pointwise", impl, x, t, w)
    if backend == _dispatch.COMPOSITE:
        return composite.rmse_loss(x, t, weight=w)
    runner = _runner("pointwise", backend, MSE)
    want = (*needs_grad(x, t), False)
    # d sqrt(m) = dm / (2 sqrt(m)), 0 where m == 0: the factor is known once the whole sum is. The torch
    # path scales its gradients in place afterwards (one more read and write of each); a kernel is
    # cheaper reading the operands twice: the sum first, then the gradients with their final scale.
    two_pass = backend != _dispatch.REFERENCE
    with torch.no_grad():
        denominator = _mse_denominator(w, out_dtype)
        operands = (x, t, w)
        mse, grads = forward(losses.mse, operands, (False,) * 3 if two_pass else want, "mean", out_dtype,
                             denominator, runner=runner)
        rmse = mse.sqrt()
        factor = torch.where(rmse > 0, 0.5 / rmse, torch.zeros_like(rmse))
        if two_pass and any(want):
            scale = _reduction.scale("mean", denominator, x.numel()) * factor
            _, grads = runner(losses.mse, operands, want, acc=mse.dtype, out_dtype=out_dtype, keep=False,
                              grad_scale=scale)
        else:
            for g in grads:
                if g is not None:
                    g.mul_(factor)
    return attach(rmse.to(out_dtype), (x, t), grads[:2])


def kl_div(x: Tensor, t: Tensor, shape: torch.Size, *, reduction: str, log_target: bool, impl: str) -> Tensor:
    """kl_div of ``x`` (log-probabilities) and ``t`` broadcast to ``shape``."""
    backend = _dispatch.backend("pointwise", impl, x, t)
    if backend == _dispatch.COMPOSITE:
        return composite.kl_div(x, t, reduction=reduction, log_target=log_target)
    runner = _runner("pointwise", backend, KL_LOG if log_target else KL_PROB)
    want_x, want_t = needs_grad(x, t)
    with torch.no_grad():
        loss, grad_x, grad_t = _kl_div(x, t, shape, reduction, log_target, want_x, want_t, runner)
    return attach(loss, (x, t), (grad_x, grad_t))


def _kl_div(x: Tensor, t: Tensor, shape: torch.Size, reduction: str, log_target: bool, want_x: bool,
            want_t: bool, runner: Runner) -> tuple[Tensor, Tensor | None, Tensor | None]:
    out_dtype = torch.promote_types(x.dtype, t.dtype)
    numel = math.prod(shape)
    if reduction == "batchmean":
        reduction, denominator = "mean", (x.shape[0] if x.dim() else 1)
    else:
        denominator = numel
    # Both operands are walked as views of the broadcast shape; a broadcast operand's gradient is
    # produced in that shape too (the only case with a gradient larger than its operand).
    operands = (x.expand(shape), t.expand(shape))
    kernel = losses.kl_log_target if log_target else losses.kl_prob_target
    loss, (grad_x, grad_t) = runner(
        kernel, operands, (want_x, want_t), acc=accumulation_dtype(out_dtype), out_dtype=out_dtype,
        keep=reduction == "none", grad_scale=_reduction.scale(reduction, denominator, numel))
    if reduction == "none":
        # grad_output has the broadcast shape; autograd sums the gradient back to each operand's shape.
        return loss, grad_x, grad_t
    loss = _reduction.reduce(loss, reduction, denominator).to(out_dtype)
    return loss, _sum_to(grad_x, x.shape), _sum_to(grad_t, t.shape)


def _sum_to(grad: Tensor | None, shape: torch.Size) -> Tensor | None:
    """A gradient computed in the broadcast shape, summed back to its operand's ``shape``."""
    if grad is None or grad.shape == shape:
        return grad
    return grad.sum_to_size(shape).contiguous()



