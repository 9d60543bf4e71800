"""Modules over :mod:`losskit.functional._binary`; see each functional for the maths."""

from __future__ import annotations

from torch import Tensor

from .. import _checks
from .. import functional as F
from .._types import Impl, Reduction
from ._base import Loss, WeightedLoss


class BCELoss(WeightedLoss):
    """Module form of :func:`losskit.functional.binary_cross_entropy` (drop-in for ``torch.nn.BCELoss``)."""

    def __init__(self, weight: Tensor | None = None, *, reduction: Reduction = "mean", impl: Impl = "auto") -> None:
        super().__init__(weight, reduction)
        self.impl = impl

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy(input, target, self.weight, reduction=self.reduction, impl=self.impl)


class BCEWithLogitsLoss(WeightedLoss):
    """Module form of :func:`losskit.functional.binary_cross_entropy_with_logits` (drop-in for
    ``torch.nn.BCEWithLogitsLoss``); ``weight`` and ``pos_weight`` are buffers."""

    pos_weight: Tensor | None

    def __init__(self, weight: Tensor | None = None, *, reduction: Reduction = "mean",
                 pos_weight: Tensor | None = None, impl: Impl = "auto") -> None:
        super().__init__(weight, reduction)
        _checks.optional_floating("pos_weight", pos_weight)
        self.register_buffer("pos_weight", pos_weight)
        self.impl = impl

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(input, target, self.weight, reduction=self.reduction,
                                                  pos_weight=self.pos_weight, impl=self.impl)


class MultiLabelSoftMarginLoss(WeightedLoss):
    """Module form of :func:`losskit.functional.multilabel_soft_margin_loss` (drop-in for
    ``torch.nn.MultiLabelSoftMarginLoss``)."""

    def __init__(self, weight: Tensor | None = None, *, reduction: Reduction = "mean", impl: Impl = "auto") -> None:
        super().__init__(weight, reduction)
        self.impl = impl

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.multilabel_soft_margin_loss(input, target, self.weight, reduction=self.reduction, impl=self.impl)


class SigmoidFocalLoss(Loss):
    """Module form of :func:`losskit.functional.sigmoid_focal_loss` (torchvision's definition and defaults,
    including ``reduction="none"``)."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, *, reduction: Reduction = "none",
                 impl: Impl = "auto") -> None:
        super().__init__(reduction)
        self.alpha = alpha
        self.gamma = gamma
        self.impl = impl

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.sigmoid_focal_loss(input, target, self.alpha, self.gamma, self.reduction, impl=self.impl)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, {super().extra_repr()}"
