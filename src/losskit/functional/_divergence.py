"""Divergence losses: ``kl_div`` (drop-in for ``torch.nn.functional.kl_div``) and ``entropy``.

Both compute the loss and every gradient that is needed in one pass over the input under
``torch.no_grad()`` (``kl_div`` in elementwise pieces, :mod:`losskit.ops.reference.elementwise`, or in the C
kernel of :mod:`losskit.ops.cpu.native_pointwise`; ``entropy`` in row blocks, :mod:`losskit.ops.blocks`,
or in :mod:`losskit.ops.cpu.native_softmax`) and hand the gradients to autograd with
:func:`losskit._autograd.attach`.
"""

from __future__ import annotations

import warnings
from typing import get_args

import torch
from torch import Tensor

from .. import _checks, _learner
from .._autocast import float32_under_autocast
from .._types import Impl, KLReduction
from ..ops import elementwise as ops
from ..ops import softmax as ops_softmax

__all__ = ["entropy", "kl_div"]

_KL_REDUCTIONS: tuple[str, ...] = get_args(KLReduction)

# torch's warning for reduction="mean", word for word (including its missing spaces).
_MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def kl_div(input: Tensor, target: Tensor, *, reduction: KLReduction = "mean", log_target: bool = False,
           impl: Impl = "auto") -> Tensor:
    r"""Kullback-Leibler divergence loss; drop-in for ``torch.nn.functional.kl_div``.

    ``input`` holds **log-probabilities** :math:`x`; ``target`` holds probabilities :math:`t`, or
    log-probabilities :math:`\tau` when ``log_target=True``. The unreduced, elementwise loss is

    .. math:: \ell = t \log t - t\,x \quad (0 \log 0 = 0,\ \text{as } \mathrm{xlogy}), \qquad
              \ell = e^{\tau} (\tau - x) \quad (\texttt{log\_target=True}),

    and the reduction is "none" (elementwise), "sum", "mean" (the sum divided by the number of elements;
    torch's ``UserWarning`` that this is not the KL divergence is raised) or "batchmean" (the sum divided
    by ``input.shape[0]``, the KL divergence per sample; the plain sum for a 0-dim input). An empty input
    gives NaN for "mean"/"batchmean", 0 for "sum".

    Gradients, computed in the forward pass: :math:`\partial\ell/\partial x = -t` (or :math:`-e^{\tau}`),
    :math:`\partial\ell/\partial t = \log t + 1 - x`, NaN where :math:`t = 0` (and :math:`t = \infty`)
    exactly as torch's autograd gives, and :math:`\partial\ell/\partial\tau = e^{\tau}(\tau - x + 1)`
    (NaN, like the loss, at :math:`\tau = -\infty`, as in torch).

    Shapes: ``input`` and ``target`` broadcast together, as in torch (the output has the broadcast shape
    for "none", ``()`` otherwise; a broadcast operand's gradient is summed back to its shape). Any
    floating dtypes; the output has their promoted dtype, computed in float32 (float64 for float64).

    The kernels read each operand once and write each gradient once per element. ``impl`` as in
    :func:`losskit.functional.cross_entropy`.

    Example:
        >>> import torch, losskit.functional as LF
        >>> logq = torch.tensor([[0.25, 0.75], [0.5, 0.5]]).log()
        >>> p = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
        >>> LF.kl_div(logq, p, reduction="batchmean")
        tensor(0.4185)
    """
    x = _checks.floating("input", input)
    t = _checks.floating("target", target)
    _checks.reduction(reduction, _KL_REDUCTIONS)
    _flag("log_target", log_target)
    _checks.same_device("target", t, "input", x)
    try:
        shape = torch.broadcast_shapes(x.shape, t.shape)
    except RuntimeError:
        raise ValueError(
            f"input of shape {tuple(x.shape)} and target of shape {tuple(t.shape)} do not broadcast together"
        ) from None
    if reduction == "mean":
        warnings.warn(_MEAN_WARNING, stacklevel=2)
    _learner.check_kl_div(x, t, log_target)
    x, t = float32_under_autocast(x.device.type, x, t)
    return ops.kl_div(x, t, shape, reduction=reduction, log_target=log_target, impl=impl)


def entropy(input: Tensor, dim: int = -1, *, logits: bool = False, impl: Impl = "auto") -> Tensor:
    r"""Shannon entropy (in nats) of the distributions along ``dim``.

    With probabilities ``p = input`` (``logits=False``):

    .. math:: H = -\sum_c p_c \log p_c, \qquad 0 \log 0 = 0 \text{ exactly (no epsilon)}.

    With ``logits=True``, the entropy of ``p = softmax(input, dim)``, computed stably from the logits:
    with :math:`z = x - \max x` and :math:`s = \sum_c e^{z_c}`,

    .. math:: H = \operatorname{logsumexp}(x) - \sum_c p_c x_c = \log s - \sum_c p_c z_c,

    a sum of two non-negative terms (no cancellation, no overflow); a ``-inf`` logit is a class of
    probability 0 and contributes nothing. A row of all ``-inf`` (or with ``+inf``) gives NaN, as softmax.

    Gradients, computed in the forward pass: :math:`\partial H/\partial x_c = p_c (\sum_k p_k z_k - z_c)`
    for logits (0 for a ``-inf`` logit); :math:`\partial H/\partial p_c = -(\log p_c + 1)` for
    probabilities, which is :math:`+\infty` at :math:`p_c = 0`. There losskit returns **0**: the term
    :math:`0 \log 0` is taken as the constant 0 (torch's convention for the gradient of ``xlogy`` with
    respect to its first argument). The gradient stays finite, and is exact after the chain rule through
    anything whose derivative vanishes where :math:`p_c = 0` (softmax, sigmoid, a normalised square):
    ``entropy(softmax(x))`` then has the gradient of ``entropy(x, logits=True)`` even when a probability
    underflows to 0, where an infinite gradient would turn the whole row into NaN. The inputs are not
    checked to sum to 1 (the formula is applied as written; negative entries give NaN).

    Shapes: ``input`` of any shape with at least one dimension and a non-empty ``dim``; the output has
    ``input``'s shape without ``dim`` and ``input``'s dtype (computed in float32, float64 for float64).
    There is no reduction: reduce the result yourself (``.mean()``).

    The kernels read the input and write the gradient once per element (Triton: the input twice when
    a row is longer than one block). ``impl`` as in :func:`losskit.functional.cross_entropy`.

    Example:
        >>> import torch, losskit.functional as LF
        >>> LF.entropy(torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]))
        tensor([0.6931, 1.0297])
        >>> LF.entropy(torch.tensor([0.0, 0.0, -float("inf")]), logits=True)
        tensor(0.6931)
    """
    x = _checks.floating("input", input)
    _checks.integer("dim", dim)
    if x.dim() == 0:
        raise ValueError("input must have at least one dimension (the distributions' dim), got shape ()")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for input of shape {tuple(x.shape)}, got {dim}")
    d = dim % x.dim()
    if x.shape[d] == 0:
        raise ValueError(f"input must have at least one entry along dim={dim}, got shape {tuple(x.shape)}")
    _flag("logits", logits)
    # Autocast: no torch counterpart; cross_entropy's rule (float32), the entropy being a cross-entropy.
    (x,) = float32_under_autocast(x.device.type, x)
    return ops_softmax.entropy(x, d, logits, impl)
