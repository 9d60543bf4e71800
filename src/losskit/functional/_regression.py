"""Regression losses: ``mse_loss`` and ``rmse_loss``, validated here and computed by the fused passes of
:mod:`losskit.ops.elementwise`."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from .._autocast import float32_under_autocast
from .._types import Impl, Reduction
from ..ops import elementwise as ops
from ._elementwise import check_constant, check_pair

__all__ = ["mse_loss", "rmse_loss"]


def _check_mse(input: object, target: object, weight: object) -> tuple[Tensor, Tensor, Tensor | None, torch.dtype]:
    x, t = check_pair(input, target, integer_target=True)
    w = check_constant("weight", weight, x, exact_shape=True)
    # Autocast: mse_loss's rule, for rmse_loss too (no torch counterpart): float32, except weighted on CPU,
    # where torch's weighted mse_loss is a composite of ops off CPU autocast's float32 list.
    x, t, w = float32_under_autocast(x.device.type, x, t, w, except_on=("cpu",) if w is not None else ())
    out_dtype = torch.promote_types(x.dtype, t.dtype)
    return x, t, w, out_dtype if w is None else torch.promote_types(out_dtype, w.dtype)


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

    The kernels read each operand once and write each gradient once per element. ``impl`` as in
    :func:`losskit.functional.cross_entropy`.

    Example:
        >>> import torch, losskit.functional as LF
        >>> LF.mse_loss(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.5, 2.0, 3.0]))
        tensor(0.4167)
    """
    x, t, w, out_dtype = _check_mse(input, target, weight)
    _checks.reduction(reduction)
    return ops.mse_loss(x, t, w, reduction=reduction, out_dtype=out_dtype, impl=impl)


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
    return ops.rmse_loss(x, t, w, out_dtype=out_dtype, impl=impl)
