"""The argument checks every elementwise loss shares (their fused drivers: :mod:`losskit.ops.elementwise`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks


def check_pair(input: object, target: object, *, integer_target: bool = False,
               input_name: str = "input", target_name: str = "target") -> tuple[Tensor, Tensor]:
    """Floating ``input``; ``target`` of the same shape and device, floating (or integer if allowed)."""
    x = _checks.floating(input_name, input)
    t = _checks.tensor(target_name, target)
    integer = not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
    if not (t.is_floating_point() or (integer_target and integer)):
        kind = "a floating-point or integer" if integer_target else "a floating-point"
        raise TypeError(f"{target_name} must have {kind} dtype, got {t.dtype}")
    _checks.same_device(target_name, t, input_name, x)
    _checks.same_shape(target_name, t, input_name, x)
    return x, t


def check_constant(name: str, value: object, input: Tensor, *, exact_shape: bool = False) -> Tensor | None:
    """An optional floating tensor (``weight``, ``pos_weight``) broadcastable to ``input``'s shape (of
    exactly that shape if ``exact_shape``), on its device, not requiring grad."""
    if value is None:
        return None
    w = _checks.floating(name, value)
    _checks.same_device(name, w, "input", input)
    if exact_shape:
        _checks.same_shape(name, w, "input", input)
    else:
        _checks.broadcastable(name, w, input.shape, "input")
    _checks.no_grad_required(name, w)
    return w
