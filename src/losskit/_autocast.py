"""Autocast's float32 policy, applied to losskit's fused losses.

Under ``torch.autocast`` torch runs the losses on autocast's float32 list (``mse_loss``, ``nll_loss``,
``kl_div``, ``binary_cross_entropy_with_logits``, on CPU also ``cross_entropy_loss`` and
``binary_cross_entropy``; ``cross_entropy`` on CUDA through its float32 ``log_softmax`` and
``nll_loss``) with their floating tensor arguments cast to float32, so a bfloat16 activation gives a
float32 loss. The dispatcher does this for aten ops only; losskit's losses are Python functions over
other ops, so each calls :func:`float32_under_autocast` after validating its arguments' types and
before computing, and so returns torch's dtype under autocast.

The lists differ by device type. Where torch's loss is a composite whose only float32 op is on the CUDA,
XPU and MPS lists but not on CPU's (``pow`` in weighted ``mse_loss``, ``sum`` in
``multilabel_soft_margin_loss``), the loss passes ``except_on=("cpu",)``: there torch's result keeps the
input's dtype (losskit still accumulates in float32 and rounds once at the end).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["enabled", "float32_under_autocast"]

T = TypeVar("T")


def enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``tensor.device.type``); False for a device type
    without autocast (``"meta"``), where ``torch.is_autocast_enabled`` would raise."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def float32_under_autocast(device_type: str, *values: T, except_on: Collection[str] = ()) -> tuple[T, ...]:
    """``values`` as autocast's float32 policy passes them to an op when autocast is enabled for
    ``device_type``: each floating tensor on that device type that is neither float32 nor float64 is
    cast with a differentiable ``.to(torch.float32)`` (so its gradient flows back in its own dtype);
    everything else (float32/float64 tensors, integer targets, None, non-tensors still to be validated)
    is returned as is. With autocast off, ``values`` is returned unchanged, without any copy.

    ``device_type`` is the input's (``input.device.type``); a device type without autocast (``"meta"``)
    never casts, nor do the device types in ``except_on``, those whose autocast leaves torch's loss in
    the input's dtype.
    """
    if device_type in except_on or not enabled(device_type):
        return values
    return tuple(_to_float32(v, device_type) for v in values)


def _to_float32(value: T, device_type: str) -> T:
    # The eligibility test of ATen's autocast (cached_cast/is_eligible): floating, not float64, on the
    # autocast device type.
    if (isinstance(value, Tensor) and value.is_floating_point() and value.device.type == device_type
            and value.dtype not in (torch.float32, torch.float64)):
        return value.to(torch.float32)  # type: ignore[return-value]
    return value
