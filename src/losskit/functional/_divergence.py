"""Divergence losses: ``kl_div`` (drop-in for ``torch.nn.functional.kl_div``) and ``entropy``.

Both compute the loss and every gradient that is needed in one pass over the input under
``torch.no_grad()`` (``kl_div`` in elementwise pieces, :mod:`losskit.ops.reference.elementwise`, or in the C
kernel of :mod:`losskit.ops.cpu.native_pointwise`; ``entropy`` in row blocks, :mod:`losskit.ops.blocks`,
or in :mod:`losskit.ops.cpu.native_softmax`) and hand the gradients to autograd with
:func:`losskit._autograd.attach`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import get_args

import torch
from torch import Tensor

from .. import _checks, _learner, _reduction
from .._autocast import float32_under_autocast
from .._autograd import attach, needs_grad
from .._types import Impl, KLReduction
from ..ops import blocks as _blocks
from ..ops.cpu import native, native_pointwise, native_softmax
from ..ops.reference import elementwise

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

    ``impl``: ``"compiled"`` losskit's C kernel (CPU tensors: one read of each operand and one write of
    each gradient per element, see :mod:`losskit.ops.cpu.native_pointwise`), ``"torch"`` the piece-wise
    torch path (any device; the reference), ``"auto"`` the compiled kernel for CPU tensors when built.

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
    kind = native_pointwise.KL_LOG if log_target else native_pointwise.KL_PROB
    runner = native_pointwise.runner(impl, kind, x, t) or elementwise.run
    want_x, want_t = needs_grad(x, t)
    with torch.no_grad():
        loss, grad_x, grad_t = _kl_div(x, t, shape, reduction, log_target, want_x, want_t, runner)
    return attach(loss, (x, t), (grad_x, grad_t))


def _kl_div(x: Tensor, t: Tensor, shape: torch.Size, reduction: str, log_target: bool, want_x: bool,
            want_t: bool, runner: native_pointwise.Runner) -> tuple[Tensor, Tensor | None, Tensor | None]:
    out_dtype = torch.promote_types(x.dtype, t.dtype)
    numel = math.prod(shape)
    if reduction == "batchmean":
        reduction, denominator = "mean", (x.shape[0] if x.dim() else 1)
    else:
        denominator = numel
    # Both operands are walked as views of the broadcast shape; a broadcast operand's gradient is
    # produced in that shape too (the only case with a gradient larger than its operand).
    operands = (x.expand(shape), t.expand(shape))
    kernel = _kl_log_target if log_target else _kl_prob_target
    loss, (grad_x, grad_t) = runner(
        kernel, operands, (want_x, want_t), acc=_blocks.accumulation_dtype(out_dtype), out_dtype=out_dtype,
        keep=reduction == "none", grad_scale=_reduction.scale(reduction, denominator, numel))
    if reduction == "none":
        # grad_output has the broadcast shape; autograd sums the gradient back to each operand's shape.
        return loss, grad_x, grad_t
    loss = _reduction.reduce(loss, reduction, denominator).to(out_dtype)
    return loss, _sum_to(grad_x, x.shape), _sum_to(grad_t, t.shape)


def _kl_prob_target(ops: Sequence[Tensor | None], want: Sequence[bool]) -> tuple[Tensor, list[Tensor | None]]:
    """``xlogy(t, t) - t x``; d/dx = -t, d/dt = log t + 1 - x (NaN at t == 0 and t == inf, as torch's
    autograd, whose ``t / t`` term is NaN there)."""
    x, t = ops
    loss = torch.xlogy(t, t).sub_(t * x)
    grad_x = -t if want[0] else None
    grad_t = t.log().add_(1).sub_(x).masked_fill_((t == 0) | (t == math.inf), math.nan) if want[1] else None
    return loss, [grad_x, grad_t]


def _kl_log_target(ops: Sequence[Tensor | None], want: Sequence[bool]) -> tuple[Tensor, list[Tensor | None]]:
    """``exp(tau) (tau - x)``; d/dx = -exp(tau), d/dtau = exp(tau) (tau - x + 1)."""
    x, tau = ops
    e = tau.exp()
    loss = e * (tau - x)
    grad_t = loss + e if want[1] else None
    grad_x = e.neg_() if want[0] else None
    return loss, [grad_x, grad_t]


def _sum_to(grad: Tensor | None, shape: torch.Size) -> Tensor | None:
    """A gradient computed in the broadcast shape, summed back to its operand's ``shape``."""
    if grad is None or grad.shape == shape:
        return grad
    return grad.sum_to_size(shape).contiguous()


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

    ``impl``: ``"compiled"`` losskit's C row kernel (CPU tensors: one read of the input and one write of
    the gradient per element, see :mod:`losskit.ops.cpu.native_softmax`), ``"torch"`` the block-wise
    torch path (any device; the reference), ``"auto"`` the compiled kernel for CPU tensors when built.

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
    compiled = native.use_compiled(impl, x, extension=native_softmax.EXTENSION)
    (want,) = needs_grad(x)
    with torch.no_grad():
        h, grad = _entropy(x, d, logits, want, compiled)
    return attach(h, (x,), (grad,), expand_dim=d)


def _entropy(x: Tensor, d: int, logits: bool, want: bool, compiled: bool) -> tuple[Tensor, Tensor | None]:
    n, c, length = math.prod(x.shape[:d]), x.shape[d], math.prod(x.shape[d + 1:])
    acc = _blocks.accumulation_dtype(x.dtype)
    x3 = x.reshape(n, c, length)  # (N, C, L), a view unless the strides forbid it
    grad = native.empty(x.shape, x.dtype, x.device) if want else None
    g3 = grad.view(n, c, length) if grad is not None else None
    h2 = torch.empty(n, length, dtype=acc, device=x.device)  # entropy per distribution
    if compiled:
        native_softmax.entropy_rows(x3, h2, g3, logits=logits)
        return h2.view(x.shape[:d] + x.shape[d + 1:]).to(x.dtype), grad
    # work: (rows, C) accumulation dtype, BLOCK_BYTES; the kernel adds about three more of its size.
    rows = _blocks.block_rows(c, torch.finfo(acc).bits // 8)
    buf = _blocks.work_buffer(min(rows, n * length), c, acc, x.device)
    for blk in _blocks.blocks(n, length, rows):
        nb, nl = blk.b1 - blk.b0, blk.l1 - blk.l0
        work = buf[:blk.rows]
        work.view(nb, nl, c).copy_(blk.of(x3))
        h2[blk.b0:blk.b1, blk.l0:blk.l1] = _entropy_rows_(work, logits, want).view(nb, nl)
        if g3 is not None:
            blk.of(g3).copy_(work.view(nb, nl, c))
    return h2.view(x.shape[:d] + x.shape[d + 1:]).to(x.dtype), grad


def _entropy_rows_(work: Tensor, logits: bool, want: bool) -> Tensor:
    """Entropy of each row of ``work`` (rows, C); if ``want``, ``work`` becomes ``dH/dwork``.

    Reference expression: ``-torch.xlogy(p, p).sum(-1)`` for probabilities ``p = work``, and
    ``-torch.xlogy(q, q).sum(-1)`` with ``q = work.softmax(-1)`` for logits.
    """
    if not logits:
        h = -torch.xlogy(work, work).sum(1)
        if want:
            absent = work == 0
            work.log_().add_(1).neg_().masked_fill_(absent, 0.0)  # -(log p + 1); 0 where p == 0
        return h
    work.sub_(work.amax(1, keepdim=True))  # z = x - max <= 0 (NaN for a row of -inf)
    e = work.exp()  # (rows, C)
    absent = e == 0  # -inf logits (or exp underflow): p z -> 0
    s = e.sum(1)
    mean_z = (e * work).masked_fill_(absent, 0.0).sum(1) / s  # sum_c p_c z_c <= 0
    h = s.log() - mean_z
    if want:
        # p_c (mean_z - z_c) = e_c (mean_z - z_c) / s
        work.neg_().add_(mean_z.unsqueeze(1)).mul_(e).masked_fill_(absent, 0.0).div_(s.unsqueeze(1))
    return h
