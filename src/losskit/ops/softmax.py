"""Fused softmax, log_softmax and entropy, after validation.

softmax / log_softmax: torch computes both in one fused, max-subtracted pass (``log_softmax`` as
``x - max - log(sum(exp(x - max)))``, never the log of a softmax), so the reference and the composite are
``torch.softmax`` / ``torch.log_softmax`` themselves. A kernel backend (C on CPU, Triton on CUDA) runs the
``softmax_rows`` operation forward and ``softmax_backward_rows`` backward, each one read of every
operand and one write of every output element; the backward, from the saved output ``y``, is
``y * (g - sum(g * y))`` (softmax) and ``g - exp(y) * sum(g)`` (log_softmax).

entropy: the ``entropy_rows`` operation writes each distribution's entropy and, in the same pass, its
gradient, which :func:`losskit._autograd.attach` hands to autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._autograd import attach, needs_grad
from . import _dispatch, composite
from .blocks import accumulation_dtype
from .cpu.native import empty


def _rows_view(t: Tensor, d: int) -> Tensor:
    """``t`` as ``(N, C, L)`` with ``dim`` ``d`` in the middle: a view for contiguous tensors and most strides."""
    shape = t.shape if t.dim() else (1,)
    return t.reshape(math.prod(shape[:d]), shape[d], math.prod(shape[d + 1:]))


class _KernelSoftmax(torch.autograd.Function):
    """softmax / log_softmax of ``x`` along ``d`` by a kernel backend, forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, d: int, log: bool, backend: str) -> Tensor:  # type: ignore[override]
        y = empty(x.shape, x.dtype, x.device)
        _dispatch.kernel("softmax_rows", backend)(_rows_view(x, d), _rows_view(y, d), log=log)
        ctx.d, ctx.log, ctx.backend = d, log, backend
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the same formula in torch ops, differentiable again (through y, whose
            # own backward is this Function's).
            if ctx.log:
                return grad - y.exp() * grad.sum(ctx.d, keepdim=True), None, None, None
            return y * (grad - (grad * y).sum(ctx.d, keepdim=True)), None, None, None
        gin = empty(y.shape, y.dtype, y.device)
        _dispatch.kernel("softmax_backward_rows", ctx.backend)(_rows_view(y, ctx.d), _rows_view(grad, ctx.d),
                                                               _rows_view(gin, ctx.d), log=ctx.log)
        return gin, None, None, None


def softmax(x: Tensor, d: int, dtype: torch.dtype | None, impl: str, *, log: bool) -> Tensor:
    """softmax (log_softmax if ``log``) of ``x`` along dim ``d``, cast to ``dtype`` first when given."""
    # The kernels compute in the output's dtype: a dtype= cast decides which backend takes the call.
    backend = _dispatch.backend("softmax_rows", impl, x if dtype is None else x.new_empty(0, dtype=dtype))
    if backend in (_dispatch.REFERENCE, _dispatch.COMPOSITE):
        return composite.log_softmax(x, d, dtype) if log else composite.softmax(x, d, dtype)
    if dtype is not None:
        x = x.to(dtype)  # as torch: the cast first (differentiable), then the operation in that dtype
    return _KernelSoftmax.apply(x, d % max(1, x.dim()), log, backend)


def entropy(x: Tensor, d: int, logits: bool, impl: str) -> Tensor:
    """Entropy of the distributions of ``x`` along dim ``d`` (probabilities, or softmax of logits)."""
    backend = _dispatch.backend("entropy_rows", impl, x)
    if backend == _dispatch.COMPOSITE:
        return composite.entropy(x, d, logits=logits)
    (want,) = needs_grad(x)
    n, c, length = math.prod(x.shape[:d]), x.shape[d], math.prod(x.shape[d + 1:])
    with torch.no_grad():
        x3 = x.reshape(n, c, length)  # (N, C, L), a view unless the strides forbid it
        grad = empty(x.shape, x.dtype, x.device) if want else None
        h2 = torch.empty(n, length, dtype=accumulation_dtype(x.dtype), device=x.device)  # per distribution
        _dispatch.kernel("entropy_rows", backend)(x3, h2, None if grad is None else grad.view(n, c, length),
                                                  logits=logits)
        h = h2.view(x.shape[:d] + x.shape[d + 1:]).to(x.dtype)
    return attach(h, (x,), (grad,), expand_dim=d)
