"""What every elementwise loss shares: argument checks and the fused driver over
:mod:`losskit.ops.reference.elementwise` (validate -> loss and gradients piece by piece -> reduce -> attach)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _checks, _reduction
from .._autograd import attach, needs_grad
from ..ops.blocks import accumulation_dtype
from ..ops.reference.elementwise import Kernel, run
from ..ops.cpu.native_elementwise import Runner


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


def forward(kernel: Kernel, operands: Sequence[Tensor | None], want: Sequence[bool], reduction: str,
            out_dtype: torch.dtype, denominator: Tensor | float | None = None,
            row_length: int | None = None, *, runner: Runner = run) -> tuple[Tensor, list[Tensor | None]]:
    """The loss (``out_dtype`` for "none", a 0-dim accumulation-dtype tensor otherwise) and the gradients
    of ``operands`` (input first) where ``want``; call under ``torch.no_grad()``.

    "mean" divides by ``denominator`` (default: the element count). With ``row_length = C`` the loss of
    a row is the sum of its entries over the last dim divided by C, and "mean" averages the rows.
    ``runner`` computes the loss and gradients: the torch driver, or a compiled one (``kernel`` is then
    its reference expression).
    """
    acc = accumulation_dtype(out_dtype)
    count = operands[0].numel()
    keep = reduction == "none"
    if row_length is None:
        scale = _reduction.scale(reduction, denominator, count)
        loss, grads = runner(kernel, operands, want, acc=acc, out_dtype=out_dtype, keep=keep, grad_scale=scale)
        return _reduction.reduce(loss, reduction, count if denominator is None else denominator), grads
    rows = operands[0].shape[:-1].numel()
    scale = _reduction.scale(reduction, rows, rows) / row_length if count else 0.0
    loss, grads = runner(kernel, operands, want, acc=acc, out_dtype=out_dtype, keep=keep, grad_scale=scale,
                         sum_last_dim=True)
    # Row sums (or the total of the partial sums, standing for the sum of rows) divided by C: as in torch,
    # a row of C = 0 entries is 0 / 0 = NaN, and there is no term at all when there are no rows.
    if keep:
        per_row = loss / row_length
    else:
        per_row = loss.sum(0, keepdim=True) / row_length if rows else loss.new_zeros(0)
    return _reduction.reduce(per_row, reduction, rows).to(out_dtype), grads


def elementwise_loss(kernel: Kernel, operands: Sequence[Tensor | None], reduction: str, out_dtype: torch.dtype,
                     denominator: Tensor | float | None = None, row_length: int | None = None, *,
                     runner: Runner = run) -> Tensor:
    """Fused loss of ``operands = (input, target, *constants)``: gradients for input and target when they
    require grad, computed in the same pass as the loss, then attached."""
    want = (*needs_grad(operands[0], operands[1]), *([False] * (len(operands) - 2)))
    with torch.no_grad():
        loss, grads = forward(kernel, operands, want, reduction, out_dtype, denominator, row_length, runner=runner)
    return attach(loss.to(out_dtype), operands[:2], grads[:2], expand_dim=None if row_length is None else -1)
