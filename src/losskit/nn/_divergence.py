"""Modules over :mod:`losskit.functional._divergence`; see each functional for the maths."""

from __future__ import annotations

from typing import get_args

from torch import Tensor, nn

from .. import functional as F
from .._types import Impl, KLReduction
from ._base import Loss


class KLDivLoss(Loss):
    """Module form of :func:`losskit.functional.kl_div` (drop-in for ``torch.nn.KLDivLoss``)."""

    def __init__(self, *, reduction: KLReduction = "mean", log_target: bool = False, impl: Impl = "auto") -> None:
        super().__init__(reduction, get_args(KLReduction))
        self.log_target = log_target
        self.impl = impl

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.kl_div(input, target, reduction=self.reduction, log_target=self.log_target, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, log_target={self.log_target}"


class Entropy(nn.Module):
    """Module form of :func:`losskit.functional.entropy` (Shannon entropy along ``dim``, no reduction)."""

    def __init__(self, dim: int = -1, *, logits: bool = False, impl: Impl = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.logits = logits
        self.impl = impl

    def forward(self, input: Tensor) -> Tensor:
        return F.entropy(input, self.dim, logits=self.logits, impl=self.impl)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, logits={self.logits}"
