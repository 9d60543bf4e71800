"""Binary (per-element, independent-label) losses: ``binary_cross_entropy``,
``binary_cross_entropy_with_logits``, ``multilabel_soft_margin_loss`` and ``sigmoid_focal_loss``.

Each validates its arguments and calls its fused pass in :mod:`losskit.ops.elementwise`, whose
reference expressions are the torch functions of :mod:`losskit.ops.reference.losses`. Gradients follow
torch's backward formulas.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, _learner
from .._autocast import float32_under_autocast
from .._types import Impl, Reduction
from ..ops import elementwise as ops
from ._elementwise import check_constant, check_pair

__all__ = ["binary_cross_entropy", "binary_cross_entropy_with_logits", "multilabel_soft_margin_loss",
           "sigmoid_focal_loss"]

_Grads = tuple[Tensor | None, Tensor | None]

def binary_cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, *,
                         reduction: Reduction = "mean", impl: Impl = "auto") -> Tensor:
    r"""Binary cross-entropy between probabilities ``input`` and ``target``; drop-in for
    ``torch.nn.functional.binary_cross_entropy``.

    With weight ``w`` (broadcast to the input's shape; ones when None), the unreduced loss is

    .. math:: \ell = -w \left(y \max(\log x, -100) + (1 - y) \max(\log(1 - x), -100)\right)

    (torch clamps each log at -100, so ``x`` = 0 or 1 gives a finite loss), and "mean" divides the sum
    by the number of elements (not by the weights' sum). ``input`` and ``target`` have any equal shape and
    the same floating dtype, with every element in [0, 1] (ValueError otherwise; a NaN propagates to the
    loss, where torch's CPU kernel raises). The gradients are torch's: :math:`w (x - y) / \max((1 - x) x,
    10^{-12})` for the input and :math:`-w\,\mathrm{logit}(x)` for the target. Output: the input's dtype,
    shape ``()`` or the input's.

    ``impl``: see :func:`binary_cross_entropy_with_logits`; the compiled kernel checks the [0, 1] domain
    in its single pass over the data and raises the same error, with no result.

    Example:
        >>> import torch, losskit.functional as LF
        >>> LF.binary_cross_entropy(torch.tensor([0.9, 0.2, 0.6]), torch.tensor([1.0, 0.0, 1.0]))
        tensor(0.2798)
    """
    x, t = check_pair(input, target)
    # Autocast casts to float32 before torch's own dtype check. On CUDA and XPU torch refuses this loss under
    # autocast (unsafe in float16), a concern the float32 computation here does not have; MPS's autocast
    # has no rule for it and keeps the input's dtype.
    x, t, weight = float32_under_autocast(x.device.type, x, t, weight, except_on=("mps",))
    if t.dtype != x.dtype:
        raise TypeError(f"target must have the input's dtype {x.dtype}, got {t.dtype}")
    _checks.reduction(reduction)
    w = check_constant("weight", weight, x)
    return ops.binary_cross_entropy(x, t, w, reduction=reduction, impl=impl)


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Tensor | None = None, *,
                                     reduction: Reduction = "mean", pos_weight: Tensor | None = None,
                                     impl: Impl = "auto") -> Tensor:
    r"""Binary cross-entropy of ``sigmoid(input)`` and ``target``, computed stably from the logits;
    drop-in for ``torch.nn.functional.binary_cross_entropy_with_logits``.

    With weight ``w`` and positive-class weight ``p`` (both broadcast to the input's shape as torch does,
    so a ``(C,)`` ``pos_weight`` weighs the classes of the last dim; ones when None), the unreduced loss is

    .. math:: \ell = w \left((1 - y)\, x - (1 + (p - 1)\, y) \log \sigma(x)\right)
              = -w \left(p\, y \log \sigma(x) + (1 - y) \log(1 - \sigma(x))\right),

    and "mean" divides the sum by the number of elements. ``target`` has the input's shape, any floating
    dtype; the output has their promoted dtype, shape ``()`` or the input's. Gradients with respect to
    input and target are torch's.

    ``impl`` chooses the implementation: ``"auto"`` the fastest for the device (the C kernel on CPU,
    Triton on CUDA, torch's own loss elsewhere), ``"compiled"`` the device's kernel or an error,
    ``"triton"`` the Triton kernel, ``"torch"`` the block-wise pure-torch reference; the rules are in
    :mod:`losskit.ops._dispatch`. All agree to the dtype's tolerance.

    Example:
        >>> import torch, losskit.functional as LF
        >>> logits = torch.tensor([[1.5, -0.3], [0.2, -2.0]])
        >>> labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> LF.binary_cross_entropy_with_logits(logits, labels, pos_weight=torch.tensor([2.0, 1.0]))
        tensor(0.9706)
    """
    x, t = check_pair(input, target)
    _checks.reduction(reduction)
    w = check_constant("weight", weight, x)
    p = check_constant("pos_weight", pos_weight, x)
    _learner.check_binary_logits("binary_cross_entropy_with_logits", x)
    x, t, w, p = float32_under_autocast(x.device.type, x, t, w, p)
    return ops.binary_cross_entropy_with_logits(x, t, w, p, reduction=reduction, impl=impl)


def multilabel_soft_margin_loss(input: Tensor, target: Tensor, weight: Tensor | None = None, *,
                                reduction: Reduction = "mean", impl: Impl = "auto") -> Tensor:
    r"""Multi-label one-versus-all logistic loss; drop-in for ``torch.nn.functional.multilabel_soft_margin_loss``.

    ``input`` holds logits of shape ``(..., C)`` (classes on the last dim: ``(C,)``, ``(N, C)``, ...);
    ``target`` has the same shape, with labels in {0, 1} (floating or integer). With ``w`` the weight
    broadcast to the input's shape (a ``(C,)`` per-class weight, typically; ones when None), the loss of
    a row is

    .. math:: \ell = -\frac{1}{C} \sum_c w_c \left(y_c \log \sigma(x_c) + (1 - y_c) \log \sigma(-x_c)\right),

    "none" returns it with the input's shape minus the last dim, and "mean" divides the sum of rows by
    the number of rows. Output dtype: the promoted dtype of input, target and weight. ``impl``: see
    :func:`binary_cross_entropy_with_logits`.

    Example:
        >>> import torch, losskit.functional as LF
        >>> logits = torch.tensor([[1.5, -0.3, 0.8], [0.2, -2.0, 0.0]])
        >>> labels = torch.tensor([[1, 0, 1], [0, 0, 1]])
        >>> LF.multilabel_soft_margin_loss(logits, labels)
        tensor(0.4575)
    """
    x, t = check_pair(input, target, integer_target=True)
    if x.dim() == 0:
        raise ValueError("input must have a class dimension (the last one), got a 0-dim tensor")
    _checks.reduction(reduction)
    w = check_constant("weight", weight, x)
    _learner.check_binary_logits("multilabel_soft_margin_loss", x)
    # torch's is a composite whose final sum is float32 under autocast on CUDA, XPU and MPS, not on CPU.
    x, t, w = float32_under_autocast(x.device.type, x, t, w, except_on=("cpu",))
    out_dtype = torch.promote_types(x.dtype, t.dtype)
    if w is not None:
        out_dtype = torch.promote_types(out_dtype, w.dtype)
    return ops.multilabel_soft_margin_loss(x, t, w, reduction=reduction, out_dtype=out_dtype, impl=impl)


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: Reduction = "none", *, impl: Impl = "auto") -> Tensor:
    r"""Sigmoid focal loss (Lin et al., 2017) of logits ``inputs``; same definition, arguments and defaults
    as ``torchvision.ops.sigmoid_focal_loss`` (note its default ``reduction="none"``).

    With :math:`s = \sigma(x)`, :math:`p_t = s y + (1 - s)(1 - y)`, :math:`\alpha_t = \alpha y + (1 -
    \alpha)(1 - y)` (taken as 1 when ``alpha < 0``, which disables the weighting) and ``ce`` the
    unreduced :func:`binary_cross_entropy_with_logits`, the unreduced loss is

    .. math:: \ell = \alpha_t\, \mathrm{ce}(x, y)\, (1 - p_t)^{\gamma},

    and "mean" divides the sum by the number of elements; ``gamma = 0`` and ``alpha < 0`` give
    ``binary_cross_entropy_with_logits(inputs, targets, reduction=...)``. ``targets`` has the inputs'
    shape (floating); ``alpha <= 1``, ``gamma >= 0``. Gradients with respect to inputs and targets are
    computed in the forward pass; where :math:`1 - p_t` underflows to 0 (a saturated, correct logit) the
    input gradient is its limit 0, where torchvision's autograd gives NaN for ``gamma < 1``. Output: the
    promoted dtype of inputs and targets. ``impl`` (keyword only): see
    :func:`binary_cross_entropy_with_logits`.

    Example:
        >>> import torch, losskit.functional as LF
        >>> LF.sigmoid_focal_loss(torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0]))
        tensor([0.0005, 0.0170, 0.2831])
    """
    x, t = check_pair(inputs, targets, input_name="inputs", target_name="targets")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__} {alpha!r}")
    if not alpha <= 1:  # also rejects NaN, which would silently disable the weighting
        raise ValueError(f"alpha must be in [0, 1], or negative to disable the weighting, got {alpha!r}")
    gamma = _checks.number_in("gamma", gamma, 0.0)
    _checks.reduction(reduction)
    _learner.check_binary_logits("sigmoid_focal_loss", x)
    # Autocast: torchvision's is a composite; binary_cross_entropy_with_logits' rule (float32) applies.
    x, t = float32_under_autocast(x.device.type, x, t)
    return ops.sigmoid_focal_loss(x, t, alpha=float(alpha), gamma=gamma, reduction=reduction, impl=impl)
