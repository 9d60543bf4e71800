"""Fused softmax classification losses: cross_entropy / focal_loss and nll_loss, after validation.

Each driver asks :mod:`losskit.ops._dispatch` for a backend, then either calls the composite (torch's own
loss, where no kernel runs) or computes the per-position loss and the gradient in one call of a row
operation (``xent_rows``, ``nll_rows``: the C kernel, the Triton kernel or the block-wise reference, all
with the same arguments), reduces, and attaches the gradient (:func:`losskit._autograd.attach`).
Nothing the size of the input is allocated but the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _reduction
from .._autograd import attach, needs_grad
from . import _dispatch, composite
from .blocks import accumulation_dtype, as_3d, class_dim, index_shape, positions_2d
from .cpu.native import empty


def softmax_xent(input: Tensor, target: Tensor, weight: Tensor | None, *, ignore_index: int, reduction: str,
                 label_smoothing: float, gamma: float, probabilities: bool, impl: str) -> Tensor:
    """cross_entropy (``gamma == 0``) and focal_loss, arguments validated."""
    backend = _dispatch.backend("xent_rows", impl, input, target, weight)
    if backend == _dispatch.COMPOSITE:
        if gamma:
            return composite.focal_loss(input, target, weight, gamma=gamma, ignore_index=ignore_index,
                                        reduction=reduction)
        return composite.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                                       label_smoothing=label_smoothing)
    want_x, want_t = needs_grad(input, target if probabilities else None)
    with torch.no_grad():
        loss, grad, tgrad = _softmax_xent(input, target, weight, ignore_index, reduction, label_smoothing, gamma,
                                          probabilities, want_x, want_t, backend)
    return attach(loss, (input, target), (grad, tgrad), expand_dim=class_dim(input))


def _softmax_xent(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
                  label_smoothing: float, gamma: float, probabilities: bool, want_x: bool, want_t: bool,
                  backend: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
    acc = accumulation_dtype(input.dtype)
    w = None if weight is None else weight.to(acc).contiguous()
    x3 = as_3d(input)  # (N, C, L)
    n, _, length = x3.shape

    if probabilities:
        tgt = as_3d(target)  # (N, C, L)
        denominator: Tensor | float = float(n * length)  # torch: mean over positions, weights or not
    else:
        t2 = positions_2d(target, n).long()  # (N, L)
        valid = t2 != ignore_index
        denominator = valid.sum().to(acc) if w is None else (w[t2.masked_fill(~valid, 0)] * valid).sum()
        tgt = t2.reshape(-1).contiguous()  # (N*L,)
    # A tensor for a weighted or ignoring mean: no host synchronisation before the kernel.
    scale = _reduction.scale(reduction, denominator, n * length)

    # Gradients are allocated contiguous so that as_3d() is a view of them.
    grad = empty(input.shape, input.dtype, input.device) if want_x else None
    tgrad = empty(target.shape, target.dtype, target.device) if want_t else None
    loss2 = torch.empty(n, length, dtype=acc, device=input.device)  # per-position loss
    _dispatch.kernel("xent_rows", backend)(
        x3, tgt, None if grad is None else as_3d(grad), None if tgrad is None else as_3d(tgrad), w, loss2,
        ignore_index=ignore_index, label_smoothing=label_smoothing, gamma=gamma, scale=scale)
    loss = _reduction.reduce(loss2.view(index_shape(input)), reduction, denominator).to(input.dtype)
    return loss, grad, tgrad


def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None, *, ignore_index: int, reduction: str,
             impl: str) -> Tensor:
    """nll_loss, arguments validated: the loss is ``-w[y] * input[y]``, the gradient zeros but ``-w[y]``
    times the reduction's factor at each target (its input-sized work is writing it)."""
    backend = _dispatch.backend("nll_rows", impl, input, target, weight)
    if backend == _dispatch.COMPOSITE:
        return composite.nll_loss(input, target, weight, ignore_index=ignore_index, reduction=reduction)
    (want_x,) = needs_grad(input)
    acc = accumulation_dtype(input.dtype)
    w = None if weight is None else weight.to(acc).contiguous()
    x3 = as_3d(input)  # (N, C, L), any strides
    n, _, length = x3.shape
    with torch.no_grad():
        t2 = positions_2d(target, n).long()  # (N, L)
        valid = t2 != ignore_index
        denominator = valid.sum().to(acc) if w is None else (w[t2.masked_fill(~valid, 0)] * valid).sum()
        scale = _reduction.scale(reduction, denominator, n * length)
        grad = empty(input.shape, input.dtype, input.device) if want_x else None
        per = torch.empty(n, length, dtype=acc, device=input.device)  # loss per position
        _dispatch.kernel("nll_rows", backend)(x3, t2.reshape(-1).contiguous(), None if grad is None else as_3d(grad),
                                              w, per, ignore_index=ignore_index, scale=scale)
        loss = _reduction.reduce(per.view(index_shape(input)), reduction, denominator).to(input.dtype)
    return attach(loss, (input,), (grad,), expand_dim=class_dim(input))
