"""The one place where per-element losses are reduced and where the matching gradient scale is chosen.

A fused loss computes its gradient before the reduction is applied, so it needs the factor that the
reduction multiplies each element by: 1 for "sum" and "none" (for "none" the caller's grad_output does
the rest in backward) and ``1 / denominator`` for "mean".
"""

from __future__ import annotations

import torch
from torch import Tensor


def reduce(loss: Tensor, reduction: str, denominator: Tensor | float | None = None) -> Tensor:
    """Reduce a per-element ``loss``; "mean" divides the sum by ``denominator`` (default: the count).

    A zero denominator gives NaN for "mean", as torch does (empty batch, all targets ignored).
    """
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if denominator is None:
        denominator = loss.numel()
    return total / denominator


def scale(reduction: str, denominator: Tensor | float | None, count: int) -> Tensor | float:
    """Per-element factor of the reduction: ``1 / denominator`` (default ``1 / count``) for "mean"."""
    if reduction != "mean":
        return 1.0
    if denominator is None:
        denominator = count
    if isinstance(denominator, Tensor):
        return torch.where(denominator != 0, 1.0 / denominator, torch.zeros_like(denominator))
    return 1.0 / denominator if denominator else 0.0
