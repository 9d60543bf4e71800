"""Module over :func:`losskit.functional.linear_cross_entropy`; see the functional for the maths."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _checks
from .. import functional as F
from .._types import Reduction
from ._base import WeightedLoss


class LinearCrossEntropyLoss(WeightedLoss):
    """Module form of :func:`losskit.functional.linear_cross_entropy`, drop-in for
    ``torch.nn.LinearCrossEntropyLoss`` (torch 2.13): same constructor, same parameters and ``state_dict``
    keys (``linear.weight`` of shape ``(C * prod(out_features), in_features)``, ``linear.bias`` when
    ``bias=True``, the ``weight`` buffer), initialised exactly as ``torch.nn.Linear``. ``z_loss``,
    ``softcap`` and ``chunk_size`` are losskit's keyword-only extras.
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (), bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 reduction: Reduction = "mean", weight: Tensor | None = None, ignore_index: int | None = None,
                 label_smoothing: float = 0.0, options: object = None, z_loss: float = 0.0,
                 softcap: float | None = None, chunk_size: int | None = None) -> None:
        super().__init__(weight, reduction)
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape {(num_classes,)}, got {tuple(weight.shape)}")
        _checks.number_in("label_smoothing", label_smoothing, 0.0, 1.0)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        # Stored flat as torch does (nn.Linear has no K-dimensional weight); reshaped in forward.
        self.linear = nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                device=device, dtype=dtype)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        shape = (self.num_classes, *self.out_features)
        bias = None if self.linear.bias is None else self.linear.bias.view(shape)
        return F.linear_cross_entropy(input, self.linear.weight.view(*shape, self.linear.in_features), target,
                                      linear_bias=bias, weight=self.weight, reduction=self.reduction,
                                      ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                                      options=self.options, z_loss=self.z_loss, softcap=self.softcap,
                                      chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")
