"""Modules over :mod:`losskit.functional._classification` and ``_softmax``; see each functional for the maths."""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as F
from .._types import Impl, Reduction
from ._base import WeightedLoss


class CrossEntropyLoss(WeightedLoss):
    """Module form of :func:`losskit.functional.cross_entropy` (drop-in for ``torch.nn.CrossEntropyLoss``)."""

    def __init__(self, weight: Tensor | None = None, *, ignore_index: int = -100, reduction: Reduction = "mean",
                 label_smoothing: float = 0.0, impl: Impl = "auto") -> None:
        super().__init__(weight, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.impl = impl

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing, impl=self.impl)


class NLLLoss(WeightedLoss):
    """Module form of :func:`losskit.functional.nll_loss` (drop-in for ``torch.nn.NLLLoss``)."""

    def __init__(self, weight: Tensor | None = None, *, ignore_index: int = -100,
                 reduction: Reduction = "mean", impl: Impl = "auto") -> None:
        super().__init__(weight, reduction)
        self.ignore_index = ignore_index
        self.impl = impl

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                          impl=self.impl)


class FocalLoss(WeightedLoss):
    """Module form of :func:`losskit.functional.focal_loss` (multi-class softmax focal loss)."""

    def __init__(self, weight: Tensor | None = None, *, gamma: float = 2.0, ignore_index: int = -100,
                 reduction: Reduction = "mean", impl: Impl = "auto") -> None:
        super().__init__(weight, reduction)
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.impl = impl

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.focal_loss(input, target, self.weight, gamma=self.gamma, ignore_index=self.ignore_index,
                            reduction=self.reduction, impl=self.impl)


class Softmax(nn.Module):
    """Module form of :func:`losskit.functional.softmax`."""

    def __init__(self, dim: int | None = None, *, impl: Impl = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.impl = impl

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, impl=self.impl)


class LogSoftmax(nn.Module):
    """Module form of :func:`losskit.functional.log_softmax`."""

    def __init__(self, dim: int | None = None, *, impl: Impl = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.impl = impl

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, impl=self.impl)
