"""Modules over :mod:`losskit.functional._regression`; see each functional for the maths."""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as F
from .._types import Impl, Reduction
from ._base import Loss


class MSELoss(Loss):
    """Module form of :func:`losskit.functional.mse_loss` (drop-in for ``torch.nn.MSELoss``; per-element
    weights, which have the input's shape, are an argument of the functional only)."""

    def __init__(self, *, reduction: Reduction = "mean", impl: Impl = "auto") -> None:
        super().__init__(reduction)
        self.impl = impl

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, reduction=self.reduction, impl=self.impl)


class RMSELoss(nn.Module):
    """Module form of :func:`losskit.functional.rmse_loss` (``sqrt`` of the mean squared error)."""

    def __init__(self, *, impl: Impl = "auto") -> None:
        super().__init__()
        self.impl = impl

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.rmse_loss(input, target, impl=self.impl)
