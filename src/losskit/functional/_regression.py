"""Regression losses: ``mse_loss`` and ``rmse_loss``, fused passes of :mod:`losskit.ops.reference.elementwise`
(``impl="torch"``) or of the C kernel :mod:`losskit.ops.cpu.native_pointwise` (``impl="compiled"``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _checks, _reduction
from .._autocast import float32_under_autocast
from .._autograd import attach, needs_grad
from .._types import Impl, Reduction
from ..ops.cpu import native_pointwise
from ..ops.reference import elementwise
from ..ops.blocks import accumulation_dtype
from ..ops.cpu.native_elementwise import Runner
from ._elementwise import check_constant, check_pair, elementwise_loss, forward

__all__ = ["mse_loss", "rmse_loss"]


def _mse_kernel(ops: Sequence[Tensor | None], want: Sequence[bool]
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


def _check_mse(input: object, target: object, weight: object) -> tuple[Tensor, Tensor, Tensor | None, torch.dtype]:
    x, t = check_pair(input, target, integer_target=True)
    w = check_constant("weight", weight, x, exact_shape=True)
    # Autocast: mse_loss's rule, for rmse_loss too (no torch counterpart): float32, except weighted on CPU,
    # where torch's weighted mse_loss is a composite of ops off CPU autocast's float32 list.
    x, t, w = float32_under_autocast(x.device.type, x, t, w, except_on=("cpu",) if w is not None else ())
    out_dtype = torch.promote_types(x.dtype, t.dtype)
    return x, t, w, out_dtype if w is None else torch.promote_types(out_dtype, w.dtype)


def _runner(impl: object, x: Tensor, t: Tensor, w: Tensor | None) -> Runner:
    return native_pointwise.runner(impl, native_pointwise.MSE, x, t, w) or elementwise.run


def _denominator(w: Tensor | None, out_dtype: torch.dtype) -> Tensor | None:
    """Weighted "mean" divides by the weights' sum (torch's rule); None means the element count."""
    return None if w is None else w.sum(dtype=accumulation_dtype(out_dtype))


def mse_loss(input: Tensor, target: Tensor, *, reduction: Reduction = "mean", weight: Tensor | None = None,
             impl: Impl = "auto") -> Tensor:
    r"""Mean squared error; drop-in for ``torch.nn.functional.mse_loss`` (torch 2.13, with ``weight``).

    With an optional ``weight`` of the input's exact shape, the unreduced loss is

    .. math:: \ell = w\, (x - y)^2,

    and "mean" divides the sum by the number of elements, or by :math:`\sum w` when ``weight`` is given
    (NaN when that sum is 0, as torch). ``input`` (floating) and ``target`` (floating or integer) must have
    the same shape: unlike torch, which broadcasts them with a warning, a mismatch is a ValueError.
    Output: the promoted dtype of input, target (and weight), shape ``()`` or the input's. Gradients with
    respect to input and target are computed in the forward pass.

    ``impl``: ``"compiled"`` losskit's C kernel (CPU tensors: one read of each operand and one write of
    each gradient per element, see :mod:`losskit.ops.cpu.native_pointwise`), ``"torch"`` the piece-wise
    torch path (any device; the reference), ``"auto"`` the compiled kernel for CPU tensors when built.

    Example:
        >>> import torch, losskit.functional as LF
        >>> LF.mse_loss(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.5, 2.0, 3.0]))
        tensor(0.4167)
    """
    x, t, w, out_dtype = _check_mse(input, target, weight)
    _checks.reduction(reduction)
    return elementwise_loss(_mse_kernel, (x, t, w), reduction, out_dtype, _denominator(w, out_dtype),
                            runner=_runner(impl, x, t, w))


def rmse_loss(input: Tensor, target: Tensor, *, weight: Tensor | None = None, impl: Impl = "auto") -> Tensor:
    r"""Root mean squared error: ``sqrt(mse_loss(input, target, reduction="mean", weight=weight))``.

    .. math:: \mathrm{rmse} = \sqrt{\frac{\sum w\, (x - y)^2}{\sum w}} \quad (\text{w = 1 when None}),
              \qquad \frac{\partial\, \mathrm{rmse}}{\partial x} = \frac{w\, (x - y)}{\mathrm{rmse} \sum w},

    with the gradient taken as 0 (not ``0 / 0 = NaN``, what ``torch.sqrt(F.mse_loss(...))`` gives) where
    the loss is exactly 0. Shapes and dtypes as :func:`mse_loss`; the result is a scalar. ``impl`` as in
    :func:`mse_loss`.

    Example:
        >>> import torch, losskit.functional as LF
        >>> LF.rmse_loss(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.5, 2.0, 3.0]))
        tensor(0.6455)
    """
    x, t, w, out_dtype = _check_mse(input, target, weight)
    runner = _runner(impl, x, t, w)
    want = (*needs_grad(x, t), False)
    # d sqrt(m) = dm / (2 sqrt(m)), 0 where m == 0: the factor is known once the whole sum is. The torch
    # path scales its gradients in place afterwards (one more read and write of each); the C kernel is
    # cheaper reading the operands twice: the sum first, then the gradients with their final scale.
    two_pass = runner is not elementwise.run
    with torch.no_grad():
        denominator = _denominator(w, out_dtype)
        operands = (x, t, w)
        mse, grads = forward(_mse_kernel, operands, (False,) * 3 if two_pass else want, "mean", out_dtype,
                             denominator, runner=runner)
        rmse = mse.sqrt()
        factor = torch.where(rmse > 0, 0.5 / rmse, torch.zeros_like(rmse))
        if two_pass and any(want):
            scale = _reduction.scale("mean", denominator, x.numel()) * factor
            _, grads = runner(_mse_kernel, operands, want, acc=mse.dtype, out_dtype=out_dtype, keep=False,
                              grad_scale=scale)
        else:
            for g in grads:
                if g is not None:
                    g.mul_(factor)
    return attach(rmse.to(out_dtype), (x, t), grads[:2])
