"""Binary (per-element, independent-label) losses: ``binary_cross_entropy``,
``binary_cross_entropy_with_logits``, ``multilabel_soft_margin_loss`` and ``sigmoid_focal_loss``.

Each is one fused pass: ``impl="torch"`` runs the ``_*_kernel`` functions below piece by piece
(:mod:`losskit.ops.reference.elementwise`); they give the loss of a piece and its gradients with respect to
input and target (for a grad_output of ones, before the reduction's factor), in the accumulation dtype,
and are the reference expressions of the C kernels that ``impl="compiled"`` runs
(:mod:`losskit.ops.cpu.native_binary`). Gradients follow torch's backward formulas.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _learner
from .._autocast import float32_under_autocast
from .._types import Impl, Reduction
from ..ops.cpu import native_binary
from ..ops.reference import elementwise
from ._elementwise import check_constant, check_pair, elementwise_loss

__all__ = ["binary_cross_entropy", "binary_cross_entropy_with_logits", "multilabel_soft_margin_loss",
           "sigmoid_focal_loss"]

_Grads = tuple[Tensor | None, Tensor | None]

#: Floor of ``(1 - x) x`` in torch's BCE backward: ATen's ``EPSILON = 1e-12f``, a float32 constant,
#: 9.99999996e-13, used for every dtype (float64 included).
_BCE_EPSILON = float(torch.tensor(1e-12, dtype=torch.float32))


def _weighted(t: Tensor | None, w: Tensor | None) -> Tensor | None:
    """``t * w`` (in place; ``t`` is a fresh temporary) or ``t`` when either is None."""
    return t if t is None or w is None else t.mul_(w)


def _bce_kernel(ops: Sequence[Tensor | None], want: Sequence[bool]) -> tuple[Tensor, _Grads]:
    """torch's CPU kernel and backward (ATen ``binary_cross_entropy``, ``EPSILON = float32(1e-12)``)::

        loss = w * ((y - 1) * max(log1p(-x), -100) - y * max(log(x), -100))
        dx   = w * (x - y) / max((1 - x) * x, 1e-12)
        dy   = w * -logit(x)
    """
    x, y, w = ops
    loss = (y - 1) * torch.log1p(-x).clamp_min_(-100) - y * torch.log(x).clamp_min_(-100)
    dx = (x - y).div_(((1 - x) * x).clamp_min_(_BCE_EPSILON)) if want[0] else None
    dy = torch.logit(x).neg_() if want[1] else None
    return _weighted(loss, w), (_weighted(dx, w), _weighted(dy, w))


def _bce_logits_kernel(ops: Sequence[Tensor | None], want: Sequence[bool]) -> tuple[Tensor, _Grads]:
    """torch's formulas (ATen ``binary_cross_entropy_with_logits`` and its backward), ``p`` = pos_weight::

        loss = w * ((1 - y) * x - (1 + (p - 1) * y) * logsigmoid(x))
        dx   = w * ((p * y + 1 - y) * sigmoid(x) - p * y)        (w * (sigmoid(x) - y) without p)
        dy   = w * (logsigmoid(-x) - p * logsigmoid(x))           (w * -x without p)
    """
    x, y, w, p = ops
    log_s = F.logsigmoid(x)
    weighted_log_s = log_s if p is None else log_s * ((p - 1) * y + 1)
    loss = (1 - y) * x - weighted_log_s
    dx = dy = None
    if want[0]:
        if p is None:
            dx = torch.sigmoid(x) - y
        else:
            py = p * y
            dx = (py + 1 - y).mul_(torch.sigmoid(x)).sub_(py)
    if want[1]:
        dy = -x if p is None else F.logsigmoid(-x).sub_(log_s.mul_(p))
    return _weighted(loss, w), (_weighted(dx, w), _weighted(dy, w))


def _soft_margin_kernel(ops: Sequence[Tensor | None], want: Sequence[bool]) -> tuple[Tensor, _Grads]:
    """Per entry, before the mean over the last dim (torch's Python definition and its autograd)::

        loss = -w * (y * logsigmoid(x) + (1 - y) * logsigmoid(-x))
        dx   = w * (sigmoid(x) - y)
        dy   = w * (logsigmoid(-x) - logsigmoid(x))
    """
    x, y, w = ops
    log_s, log_sn = F.logsigmoid(x), F.logsigmoid(-x)
    loss = (y * log_s).add_((1 - y) * log_sn).neg_()
    dx = torch.sigmoid(x).sub_(y) if want[0] else None
    dy = log_sn - log_s if want[1] else None
    return _weighted(loss, w), (_weighted(dx, w), _weighted(dy, w))


def _focal_kernel(ops: Sequence[Tensor | None], want: Sequence[bool], *, alpha: float, gamma: float
                  ) -> tuple[Tensor, _Grads]:
    """torchvision's ``sigmoid_focal_loss``, with ``s = sigmoid(x)``, ``ce`` torch's BCE-with-logits::

        q = 1 - p_t = s (1 - y) + (1 - s) y                   (no cancellation, unlike 1 - p_t)
        a = alpha y + (1 - alpha)(1 - y)                     (1 when alpha < 0)
        loss = a * ce * q**gamma
        dx = a * q**gamma * ((s - y) + gamma * (ce / q) * s (1 - s) (1 - 2y))
        dy = a' * ce * q**gamma + a * q**gamma * (-x + gamma * (ce / q) * (1 - 2s)),  a' = 2 alpha - 1 (0)

    ``ce / q`` tends to 1 where ``q`` underflows to 0 (``ce`` ~ ``q`` for a confidently right logit), so
    it is taken as 1 there: the gradient is 0 instead of torchvision's ``0 * inf = NaN`` for gamma < 1.
    """
    x, y = ops
    s, sn = torch.sigmoid(x), torch.sigmoid(-x)
    ny = 1 - y
    ce = torch.mul(ny, x).sub_(F.logsigmoid(x))  # torch's BCE-with-logits
    q = torch.mul(s, ny).addcmul_(sn, y)
    q_g = q.pow(gamma)
    loss = ce * q_g
    a = ny.mul_(1 - alpha).add_(y, alpha=alpha) if alpha >= 0 else None  # reuses the 1 - y piece
    # gamma * ce / q (1 where q == 0), written over ce: few live pieces, the focal kernel has the most.
    ratio = ce.div_(q).masked_fill_(q == 0, 1).mul_(gamma) if gamma and (want[0] or want[1]) else None
    dx = dy = None
    if want[1]:
        dy = torch.neg(x)
        if ratio is not None:
            dy.addcmul_(ratio, sn - s)
        dy = _weighted(dy.mul_(q_g), a)
        if a is not None:
            dy.add_(loss, alpha=2 * alpha - 1)
    if want[0]:
        dx = s - y
        if ratio is not None:
            r = ratio.mul_(s).mul_(sn)  # gamma (ce / q) s (1 - s), ratio is not used after this
            dx.add_(r).sub_(r.mul_(y).mul_(2))  # + r (1 - 2y)
        dx = _weighted(dx.mul_(q_g), a)
    return _weighted(loss, a), (dx, dy)


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
    runner = native_binary.runner(impl, "bce", x, t, w)
    if runner is None:
        # Whole tensors, before any piece is computed: one sync each, not one per piece.
        _checks.in_unit_interval("input", x)
        _checks.in_unit_interval("target", t)
    return elementwise_loss(_bce_kernel, (x, t, w), reduction, x.dtype, runner=runner or elementwise.run)


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

    ``impl`` chooses the implementation: ``"compiled"`` losskit's C kernel (CPU tensors, see
    :mod:`losskit.ops.cpu.native_binary`), ``"torch"`` the pure-torch path (any device; the reference),
    ``"auto"`` the compiled kernel for CPU tensors when it is built, else torch. Both agree to the dtype's
    tolerance.

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
    runner = native_binary.runner(impl, "logits", x, t, w, p) or elementwise.run
    return elementwise_loss(_bce_logits_kernel, (x, t, w, p), reduction, torch.promote_types(x.dtype, t.dtype),
                            runner=runner)


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
    runner = native_binary.runner(impl, "soft_margin", x, t, w) or elementwise.run
    return elementwise_loss(_soft_margin_kernel, (x, t, w), reduction, out_dtype, row_length=x.shape[-1],
                            runner=runner)


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
    kernel = partial(_focal_kernel, alpha=float(alpha), gamma=gamma)
    runner = native_binary.runner(impl, "focal", x, t, alpha=float(alpha), gamma=gamma) or elementwise.run
    return elementwise_loss(kernel, (x, t), reduction, torch.promote_types(x.dtype, t.dtype), runner=runner)
