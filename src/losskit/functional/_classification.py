"""Softmax classification losses: ``cross_entropy``, ``nll_loss`` and ``focal_loss``.

All three take ``input`` of shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (classes on dim 1, on
dim 0 for a single sample), validate their arguments and call the fused operation of
:mod:`losskit.ops.classification`, which computes the loss and its gradient in one pass; nothing the
size of the input but the gradient is allocated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, _learner
from .._autocast import float32_under_autocast
from .._types import Impl, Reduction
from ..ops import classification as ops
from ..ops.blocks import class_dim as _class_dim
from ..ops.blocks import index_shape as _index_shape

__all__ = ["cross_entropy", "focal_loss", "nll_loss"]


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

    ``impl`` chooses the implementation: ``"auto"`` the fastest for the device (the C kernel on CPU,
    Triton on CUDA, torch's own loss elsewhere), ``"compiled"`` the device's kernel or an error,
    ``"triton"`` the Triton kernel, ``"torch"`` the block-wise pure-torch reference; the rules are in
    :mod:`losskit.ops._dispatch`. All agree to the dtype's tolerance.

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
    return ops.softmax_xent(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                            label_smoothing=float(label_smoothing), gamma=0.0, probabilities=probabilities,
                            impl=impl)


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
    return ops.softmax_xent(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                            label_smoothing=0.0, gamma=float(gamma), probabilities=False, impl=impl)


def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None = None, *, ignore_index: int = -100,
             reduction: Reduction = "mean", impl: Impl = "auto") -> Tensor:
    r"""Negative log-likelihood of class indices; drop-in for ``torch.nn.functional.nll_loss``.

    ``input`` holds **log-probabilities** (e.g. the output of :func:`log_softmax`), shape ``(C,)``,
    ``(N, C)`` or ``(N, C, d1, ..., dk)``; ``target`` holds class indices (the input's shape without C).
    The unreduced loss is :math:`\ell = -w_y\, \mathrm{input}_y` (0 where ``y == ignore_index``) and
    "mean" divides the sum by :math:`\sum w_y` over non-ignored positions.

    The gradient is zero but for :math:`-w_y` times the reduction's factor at each target; its
    input-sized work is writing it: the kernels write each gradient entry once (the C kernel in
    cache-sized tiles on all intra-op threads); the reference is ``zeros`` + ``scatter_``. ``impl`` as in
    :func:`cross_entropy`.

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
    return ops.nll_loss(input, target, weight, ignore_index=ignore_index, reduction=reduction, impl=impl)
