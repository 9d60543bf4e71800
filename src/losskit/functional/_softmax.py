"""``softmax`` and ``log_softmax``: losskit's compiled row kernel on CPU, torch's ATen kernels elsewhere.

torch computes both in one fused, max-subtracted pass (and ``log_softmax`` as
``x - max - log(sum(exp(x - max)))``, never as the log of a softmax), so the pure-torch path
(``impl="torch"``, the reference) calls them. ``impl="compiled"`` runs
:mod:`losskit.ops.cpu.native_softmax`: forward and backward each read every element once and write every
output element once, on all intra-op threads; its backward, from the saved output ``y``, is
``y * (g - sum(g * y))`` (softmax) and ``g - exp(y) * sum(g)`` (log_softmax).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .. import _checks
from .._types import Impl
from ..ops.cpu import native, native_softmax


def _dim(input: Tensor, dim: int | None, name: str) -> int:
    if dim is None:
        # torch's legacy implicit choice, with its deprecation warning.
        warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call to include dim=X "
                      "as an argument.", stacklevel=3)
        return 0 if input.dim() in (0, 1, 3) else 1
    _checks.integer("dim", dim)
    if not -max(1, input.dim()) <= dim < max(1, input.dim()):
        raise ValueError(f"dim must be in [{-max(1, input.dim())}, {max(1, input.dim()) - 1}] for input of "
                         f"shape {tuple(input.shape)}, got {dim}")
    return dim


def _dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return dtype


def _rows_view(t: Tensor, d: int) -> Tensor:
    """``t`` as ``(N, C, L)`` with ``dim`` ``d`` in the middle: a view for contiguous tensors and most strides."""
    shape = t.shape if t.dim() else (1,)
    return t.reshape(math.prod(shape[:d]), shape[d], math.prod(shape[d + 1:]))


class _CompiledSoftmax(torch.autograd.Function):
    """softmax / log_softmax of ``x`` along ``d`` by the C kernel, forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, d: int, log: bool) -> Tensor:  # type: ignore[override]
        y = native.empty(x.shape, x.dtype, x.device)
        native_softmax.softmax_rows(_rows_view(x, d), _rows_view(y, d), log=log)
        ctx.d, ctx.log = d, log
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the same formula in torch ops, differentiable again (through y, whose
            # own backward is this Function's).
            if ctx.log:
                return grad - y.exp() * grad.sum(ctx.d, keepdim=True), None, None
            return y * (grad - (grad * y).sum(ctx.d, keepdim=True)), None, None
        gin = native.empty(y.shape, y.dtype, y.device)
        native_softmax.softmax_backward_rows(_rows_view(y, ctx.d), _rows_view(grad, ctx.d), _rows_view(gin, ctx.d),
                                             log=ctx.log)
        return gin, None, None


def _softmax(x: Tensor, d: int, dtype: torch.dtype | None, impl: Impl, log: bool) -> Tensor:
    if not native.use_compiled(impl, x, extension=native_softmax.EXTENSION):
        return (torch.log_softmax if log else torch.softmax)(x, d, dtype=dtype)
    if dtype is not None:
        x = x.to(dtype)  # as torch: the cast first (differentiable), then the operation in that dtype
    return _CompiledSoftmax.apply(x, d % max(1, x.dim()), log)


def softmax(input: Tensor, dim: int | None = None, dtype: torch.dtype | None = None, *,
            impl: Impl = "auto") -> Tensor:
    r"""``exp(x - max) / sum(exp(x - max))`` along ``dim``; drop-in for ``torch.nn.functional.softmax``.

    ``dtype``, when given, is the dtype the input is cast to before the operation (and of the output).
    ``impl``: ``"compiled"`` losskit's C row kernel (CPU tensors; forward and backward each one read and
    one write per element, see :mod:`losskit.ops.cpu.native_softmax`), ``"torch"`` ``torch.softmax``
    (any device; the reference), ``"auto"`` the compiled kernel for CPU tensors when it is built.
    Gradients: :math:`y (g - \sum g y)`; double backward works (in torch ops).

    Example:
        >>> import torch, losskit.functional as LF
        >>> LF.softmax(torch.tensor([1.0, 2.0, 1000.0]), dim=0)
        tensor([0., 0., 1.])
    """
    x = _checks.floating("input", input)
    return _softmax(x, _dim(x, dim, "softmax"), _dtype(dtype), impl, log=False)


def log_softmax(input: Tensor, dim: int | None = None, dtype: torch.dtype | None = None, *,
                impl: Impl = "auto") -> Tensor:
    r"""``x - max - log(sum(exp(x - max)))`` along ``dim``; drop-in for ``torch.nn.functional.log_softmax``.

    Stable for any finite input: the largest entry maps to ``-log(sum(exp(x - max))) >= -log(n)``.
    ``dtype`` and ``impl`` as in :func:`softmax`; gradient :math:`g - e^{y} \sum g`.

    Example:
        >>> import torch, losskit.functional as LF
        >>> LF.log_softmax(torch.tensor([0.0, 1000.0]), dim=0)
        tensor([-1000.,     0.])
    """
    x = _checks.floating("input", input)
    return _softmax(x, _dim(x, dim, "log_softmax"), _dtype(dtype), impl, log=True)
