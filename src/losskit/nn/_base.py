"""Module plumbing shared by every loss module: reduction checked at construction, weights as buffers."""

from __future__ import annotations

from torch import Tensor, nn

from .. import _checks


class Loss(nn.Module):
    """A loss module: holds options, ``forward`` is one call to the functional."""

    def __init__(self, reduction: str = "mean", allowed: tuple[str, ...] = ("none", "mean", "sum")) -> None:
        super().__init__()
        self.reduction = _checks.reduction(reduction, allowed)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class WeightedLoss(Loss):
    """A loss with an optional per-class ``weight``, registered as a buffer (follows ``.to()``, in
    ``state_dict``)."""

    weight: Tensor | None

    def __init__(self, weight: Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__(reduction)
        _checks.optional_floating("weight", weight)
        self.register_buffer("weight", weight)
