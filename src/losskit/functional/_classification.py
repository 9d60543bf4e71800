"""Softmax classification losses: ``cross_entropy``, ``nll_loss`` and ``focal_loss``.

All three take ``input`` of shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (classes on dim 1, on
dim 0 for a single sample) and compute the loss and its gradient block by block in one pass
(:mod:`losskit.ops.reference.rows`); nothing the size of the input but the gradient is allocated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, _learner, _reduction
from .._autocast import float32_under_autocast
from .._autograd import attach, needs_grad
from .._types import Impl, Reduction
from ..ops.cpu import native, native_softmax
from ..ops.blocks import accumulation_dtype, as_3d, block_rows, blocks, positions_2d, work_buffer
from ..ops.reference.rows import RowSpec, xent_rows_

__all__ = ["cross_entropy", "focal_loss", "nll_loss"]


def _class_dim(input: Tensor) -> int:
    return 0 if input.dim() == 1 else 1


def check_class_input(input: object, target: object, *, probabilities_allowed: bool) -> bool:
    """Validate ``input`` (floating, classes on dim 1) against ``target``; True for probability targets.

    Probability targets have the input's shape and a floating dtype; class-index targets have the
    input's shape without the class dimension and an integer dtype.
    """
    x = _checks.floating("input", input)
    t = _checks.tensor("target", target)
    if x.dim() == 0:
        raise ValueError("input must have a class dimension: shape (C,), (N, C) or (N, C, d1, ...), got ()")
    if x.shape[_class_dim(x)] == 0:
        raise ValueError(f"input must have at least one class, got shape {tuple(x.shape)}")
    _checks.same_device("target", t, "input", x)
    if probabilities_allowed and t.shape == x.shape:
        if not t.is_floating_point():
            raise TypeError(
                f"target has the input's shape {tuple(x.shape)}, so it is read as class probabilities and must "
                f"be floating point, got {t.dtype} (pass class indices of shape {_index_shape(x)} instead, or "
                f"convert one-hot targets with .float())"
            )
        return True
    expected = _index_shape(x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        hint = f" or probabilities of shape {tuple(x.shape)}" if probabilities_allowed else ""
        raise TypeError(
            f"target must hold class indices with an integer dtype{hint}; got {t.dtype} of shape {tuple(t.shape)}"
        )
    if t.shape != expected:
        hint = f" (or {tuple(x.shape)} for probabilities)" if probabilities_allowed else ""
        raise ValueError(
            f"target must have shape {expected}{hint} for input of shape {tuple(x.shape)}, got {tuple(t.shape)}"
        )
    return False


def _index_shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape[:_class_dim(x)] + x.shape[_class_dim(x) + 1:])


def softmax_xent(input: Tensor, target: Tensor, weight: Tensor | None, *, ignore_index: int, reduction: str,
                 label_smoothing: float, gamma: float, probabilities: bool, impl: Impl) -> Tensor:
    """Shared driver of cross_entropy and focal_loss; arguments already validated except ``impl``."""
    compiled = native.use_compiled(impl, input, target)
    want_x, want_t = needs_grad(input, target if probabilities else None)
    with torch.no_grad():
        loss, grad, tgrad = _softmax_xent(input, target, weight, ignore_index, reduction, label_smoothing, gamma,
                                          probabilities, want_x, want_t, compiled)
    return attach(loss, (input, target), (grad, tgrad), expand_dim=_class_dim(input))


def _softmax_xent(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
                  label_smoothing: float, gamma: float, probabilities: bool, want_x: bool, want_t: bool,
                  compiled: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    n_classes = input.shape[_class_dim(input)]
    acc = accumulation_dtype(input.dtype)
    spec = RowSpec(weight=None if weight is None else weight.to(acc), ignore_index=ignore_index,
                   label_smoothing=label_smoothing, gamma=gamma)
    x3 = as_3d(input)  # (N, C, L)
    n, _, length = x3.shape

    if probabilities:
        tgt = as_3d(target)  # (N, C, L)
        denominator: Tensor | float = float(n * length)  # torch: mean over positions, weights or not
    else:
        t2 = tgt = positions_2d(target, n).long()  # (N, L)
        valid = t2 != ignore_index
        if spec.weight is None:
            denominator = valid.sum().to(acc)
        else:
            denominator = (spec.weight[t2.masked_fill(~valid, 0)] * valid).sum()
    scale = _reduction.scale(reduction, denominator, n * length)

    # Gradients are allocated contiguous so that as_3d() is a view of them.
    grad = native.empty(input.shape, input.dtype, input.device) if want_x else None
    tgrad = native.empty(target.shape, target.dtype, target.device) if want_t else None
    g3 = as_3d(grad) if grad is not None else None
    tg3 = as_3d(tgrad) if tgrad is not None else None
    loss2 = torch.empty(n, length, dtype=acc, device=input.device)  # per-position loss
    if compiled:
        native.xent_rows(x3, tgt if probabilities else tgt.reshape(-1).contiguous(), g3, tg3,
                         None if spec.weight is None else spec.weight.contiguous(), loss2, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, gamma=gamma, scale=float(scale))
    else:
        _xent_blocks(x3, tgt, g3, tg3, spec, scale, loss2, probabilities)
    loss = _reduction.reduce(loss2.view(_index_shape(input)), reduction, denominator).to(input.dtype)
    return loss, grad, tgrad


def _xent_blocks(x3: Tensor, tgt: Tensor, g3: Tensor | None, tg3: Tensor | None, spec: RowSpec,
                 scale: Tensor | float, loss2: Tensor, probabilities: bool) -> None:
    """The pure-torch path: :func:`xent_rows_` over cache-sized blocks of ``x3`` (N, C, L); fills ``loss2``
    (N, L) and the gradients ``g3``/``tg3`` (N, C, L) when given."""
    n, n_classes, length = x3.shape
    acc, want_x = loss2.dtype, g3 is not None
    # work: (rows, C) acc dtype, BLOCK_BYTES; with a float32/64 (N, C) input the gradient rows are
    # used as the work buffer directly and no copy-back is needed.
    rows = block_rows(n_classes, torch.finfo(acc).bits // 8)
    in_place = g3 is not None and x3.dtype == acc and length == 1
    buf = None if in_place else work_buffer(min(rows, n * length), n_classes, acc, x3.device)
    tbuf = work_buffer(min(rows, n * length), n_classes, acc, x3.device) if tg3 is not None else None
    for blk in blocks(n, length, rows):
        nb, nl = blk.b1 - blk.b0, blk.l1 - blk.l0
        work = g3[blk.b0:blk.b1, :, 0] if in_place else buf[:blk.rows]
        work.view(nb, nl, n_classes).copy_(blk.of(x3))
        tb = blk.of(tgt).reshape(-1, n_classes).to(acc) if probabilities else blk.positions(tgt)
        tgb = tbuf[:blk.rows] if tbuf is not None else None
        res = xent_rows_(work, tb, spec, scale, want_x, tgb)
        loss2[blk.b0:blk.b1, blk.l0:blk.l1] = res.loss.view(nb, nl)
        if want_x and not in_place:
            blk.of(g3).copy_(work.view(nb, nl, n_classes))
        if tgb is not None:
            blk.of(tg3).copy_(tgb.view(nb, nl, n_classes))


def _check_common(weight: object, input: Tensor, reduction: object, ignore_index: object) -> Tensor | None:
    _checks.reduction(reduction)
    _checks.integer("ignore_index", ignore_index)
    return _checks.class_weight(weight, input.shape[_class_dim(input)], input)


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, *, ignore_index: int = -100,
                  reduction: Reduction = "mean", label_smoothing: float = 0.0, impl: Impl = "auto") -> Tensor:
    r"""Cross-entropy between softmax(``input``) and ``target``; drop-in for ``torch.nn.functional.cross_entropy``.

    ``input`` holds raw, unnormalised logits of shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
    ``target`` is either class indices (integer dtype, the input's shape without ``C``; entries equal
    to ``ignore_index`` are skipped) or class probabilities (floating, the input's shape).

    With ``p = log_softmax(input, dim=class)``, smoothing ``s = label_smoothing`` and class weights ``w``
    (ones when None), the unreduced loss of a position with index target ``y`` is

    .. math:: \ell = (1 - s)\, w_y (-p_y) + \frac{s}{C} \sum_c w_c (-p_c), \qquad 0 \text{ if } y = \text{ignore\_index},

    and ``reduction="mean"`` divides the sum by :math:`\sum w_{y}` over non-ignored positions (NaN when
    every target is ignored). With probability targets ``t`` (smoothed to ``(1 - s) t + s / C``) the loss
    is :math:`\sum_c w_c t_c (-p_c)` and "mean" divides by the number of positions.

    The output has the input's dtype (accumulation is in float32, float64 for float64 input); shape
    ``()`` for "mean"/"sum", the target positions' shape for "none". The gradient with respect to
    ``input`` (and to probability targets) is computed in the forward pass.

    ``impl`` chooses the implementation: ``"compiled"`` losskit's C kernel (CPU tensors, see
    :mod:`losskit.ops.cpu.native`), ``"torch"`` the pure-torch path (any device; the reference), ``"auto"``
    the compiled kernel for CPU tensors when it is built, else torch. Both agree to the dtype's tolerance.

    Example:
        >>> import torch, losskit.functional as LF
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
        >>> LF.cross_entropy(logits, torch.tensor([0, 2]))
        tensor(0.1755)
    """
    probabilities = check_class_input(input, target, probabilities_allowed=True)
    weight = _check_common(weight, input, reduction, ignore_index)
    _checks.number_in("label_smoothing", label_smoothing, 0.0, 1.0)
    if probabilities and ignore_index != -100:
        raise ValueError(f"ignore_index={ignore_index} is not supported with probability targets (target has the "
                         f"input's shape {tuple(input.shape)}); give ignored positions an all-zero target row instead")
    if not probabilities:
        _checks.class_targets(target, input.shape[_class_dim(input)], ignore_index)
    _learner.check_logits("cross_entropy", input, _class_dim(input))
    input, target, weight = float32_under_autocast(input.device.type, input, target, weight)
    return softmax_xent(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=float(label_smoothing), gamma=0.0, probabilities=probabilities, impl=impl)


def focal_loss(input: Tensor, target: Tensor, weight: Tensor | None = None, *, gamma: float = 2.0,
               ignore_index: int = -100, reduction: Reduction = "mean", impl: Impl = "auto") -> Tensor:
    r"""Multi-class softmax focal loss (Lin et al., 2017) over logits.

    With ``p_y = softmax(input)[y]`` and class weights ``w`` (ones when None), the unreduced loss is

    .. math:: \ell = -w_y (1 - p_y)^{\gamma} \log p_y, \qquad 0 \text{ if } y = \text{ignore\_index},

    and ``reduction="mean"`` divides the sum by :math:`\sum w_y` over non-ignored positions, so
    ``gamma=0`` equals ``cross_entropy(input, target, weight)``. Shapes as :func:`cross_entropy` with
    class-index targets; ``gamma >= 0``; ``impl`` as in :func:`cross_entropy`.

    Example:
        >>> import torch, losskit.functional as LF
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
        >>> LF.focal_loss(logits, torch.tensor([0, 2]), gamma=2.0)
        tensor(0.0061)
    """
    check_class_input(input, target, probabilities_allowed=False)
    weight = _check_common(weight, input, reduction, ignore_index)
    _checks.number_in("gamma", gamma, 0.0)
    _checks.class_targets(target, input.shape[_class_dim(input)], ignore_index)
    _learner.check_logits("focal_loss", input, _class_dim(input))
    # Autocast: no torch counterpart; cross_entropy's rule (float32), as its gamma=0 case is cross_entropy.
    input, weight = float32_under_autocast(input.device.type, input, weight)
    return softmax_xent(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=0.0, gamma=float(gamma), probabilities=False, impl=impl)


def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None = None, *, ignore_index: int = -100,
             reduction: Reduction = "mean", impl: Impl = "auto") -> Tensor:
    r"""Negative log-likelihood of class indices; drop-in for ``torch.nn.functional.nll_loss``.

    ``input`` holds **log-probabilities** (e.g. the output of :func:`log_softmax`), shape ``(C,)``,
    ``(N, C)`` or ``(N, C, d1, ..., dk)``; ``target`` holds class indices (the input's shape without C).
    The unreduced loss is :math:`\ell = -w_y\, \mathrm{input}_y` (0 where ``y == ignore_index``) and
    "mean" divides the sum by :math:`\sum w_y` over non-ignored positions.

    The gradient is zero but for :math:`-w_y` times the reduction's factor at each target; its
    input-sized work is writing it. ``impl="compiled"`` (``"auto"`` on CPU) writes each gradient entry
    once, in cache-sized tiles on all intra-op threads, with the C kernel of
    :mod:`losskit.ops.cpu.native_softmax`; ``"torch"`` is ``zeros`` + ``scatter_`` (the reference).

    Example:
        >>> import torch, losskit.functional as LF
        >>> logp = torch.tensor([[-0.2, -1.8], [-2.3, -0.1]])
        >>> LF.nll_loss(logp, torch.tensor([0, 1]))
        tensor(0.1500)
    """
    check_class_input(input, target, probabilities_allowed=False)
    weight = _check_common(weight, input, reduction, ignore_index)
    n_classes = input.shape[_class_dim(input)]
    _checks.class_targets(target, n_classes, ignore_index)
    _learner.check_log_probabilities("nll_loss", input, _class_dim(input))
    input, weight = float32_under_autocast(input.device.type, input, weight)
    compiled = native.use_compiled(impl, input, target, extension=native_softmax.EXTENSION)
    (want_x,) = needs_grad(input)
    acc = accumulation_dtype(input.dtype)
    cd = _class_dim(input)
    # Shapes: target -> (..., 1) index along the class dim; nothing the size of the input but the gradient.
    valid = target != ignore_index
    safe = target.long().masked_fill(~valid, 0).unsqueeze(cd)
    w_y = (weight.to(acc)[safe] if weight is not None else torch.ones(safe.shape, dtype=acc,
                                                                         device=input.device))
    w_y = w_y * valid.unsqueeze(cd)
    with torch.no_grad():
        denominator = w_y.sum()
        scale = _reduction.scale(reduction, denominator, target.numel())
        if compiled:
            x3 = as_3d(input)  # (N, C, L), any strides
            grad = native.empty(input.shape, input.dtype, input.device) if want_x else None
            per = torch.empty(_index_shape(input), dtype=acc, device=input.device)  # loss per position
            native_softmax.nll_rows(x3, target.long().reshape(-1).contiguous(), as_3d(grad) if want_x else None,
                                    None if weight is None else weight.to(acc).contiguous(), per,
                                    ignore_index=ignore_index, scale=float(scale))
        else:
            # ignored: 0, not 0 * -inf
            per = -(input.gather(cd, safe).to(acc) * w_y).squeeze(cd).masked_fill(~valid, 0.0)
            grad = None
            if want_x:
                grad = torch.zeros(input.shape, dtype=input.dtype, device=input.device)
                grad.scatter_(cd, safe, (-w_y * scale).to(input.dtype))
        loss = _reduction.reduce(per, reduction, denominator).to(input.dtype)
    return attach(loss, (input,), (grad,), expand_dim=cd)
