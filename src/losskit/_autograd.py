"""Gradients computed in the forward pass, handed to autograd by one Function.

Every fused loss computes ``loss`` and ``d(loss)/d(x)`` for each ``x`` that requires grad in a single
pass over the data, under ``torch.no_grad()``. :func:`attach` then returns ``loss`` wired into the graph
so that backward only multiplies the stored gradients by ``grad_output``, in place: backward allocates
nothing the size of the input, and nothing but the gradients is kept between forward and backward.

Consequences, each raised as a clear error rather than a wrong number:

* double backward (``create_graph=True``) is not supported: the stored gradient is a constant, so it is
  refused when backward is called, rather than silently giving a zero second derivative (which
  ``once_differentiable`` would do here: its error only fires when ``grad_output`` requires grad);
* a second backward through the same graph (``retain_graph=True``) is refused, because the first one
  scaled the stored gradient in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .ops.cpu import native_pointwise


def _scale_(grad: Tensor, grad_output: Tensor, expand_dim: int | None) -> Tensor:
    """``grad *= grad_output`` in place (out of place while torch.compile traces), broadcasting
    ``grad_output`` (the loss's shape) onto ``grad``.

    A "none" reduction loses one dimension of the input (the class dimension, say); ``expand_dim`` is
    that dimension of ``grad``, where ``grad_output`` gets a size-1 axis.
    """
    if torch.compiler.is_compiling():
        # Traced graphs are functional: out of place, so that the compiler sees no mutation of a saved
        # tensor (which AOTAutograd cannot partition when the gradient is a view) and plans the buffer
        # itself. No data-dependent shortcut either: it would break the graph.
        return grad * _broadcastable(grad_output, grad, expand_dim)
    if grad_output.device.type == "cpu" and all(stride == 0 for stride in grad_output.stride()):
        # The common case is loss.backward() on a scalar (or on a sum of a per-row loss: a broadcast
        # scalar): grad_output is exactly 1 and the pass over the gradient can be skipped. Reading the
        # value synchronises an accelerator, so only on CPU.
        if grad_output.numel() > 0 and bool(grad_output[(0,) * grad_output.dim()] == 1):
            return grad
    go = _broadcastable(grad_output, grad, expand_dim)
    if native_pointwise.scale_(grad, go):  # CPU: one C pass, bit for bit mul_'s
        return grad
    return grad.mul_(go)


def _broadcastable(grad_output: Tensor, grad: Tensor, expand_dim: int | None) -> Tensor:
    if expand_dim is not None and 0 < grad_output.dim() < grad.dim():
        return grad_output.unsqueeze(expand_dim)
    return grad_output


class _PrecomputedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expand_dim, loss, *inputs_then_grads):  # type: ignore[override]
        n = len(inputs_then_grads) // 2
        grads = inputs_then_grads[n:]
        ctx.expand_dim = expand_dim
        ctx.slots = tuple(g is not None for g in grads)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if torch.is_grad_enabled():  # the engine enables grad mode in backward exactly for create_graph=True
            raise RuntimeError(
                "losskit: double backward (create_graph=True) is not supported: the fused losses store their "
                "gradient as a constant, so its derivative would silently be zero; use torch.nn.functional for "
                "higher-order gradients"
            )
        if ctx.used:
            raise RuntimeError(
                "losskit: backward through the same fused loss twice is not supported (the first backward "
                "scaled the precomputed gradient in place); compute the loss again instead of retain_graph=True"
            )
        ctx.used = True
        saved = iter(ctx.saved_tensors)
        grads = [_scale_(next(saved), grad_output, ctx.expand_dim) if has else None for has in ctx.slots]
        return (None, None, *grads, *([None] * len(grads)))


def attach(loss: Tensor, inputs: Sequence[Tensor], grads: Sequence[Tensor | None], *,
           expand_dim: int | None = None) -> Tensor:
    """Return ``loss`` with ``grads[i]`` as its gradient with respect to ``inputs[i]``.

    ``grads[i]`` is the gradient for a ``grad_output`` of ones; None where ``inputs[i]`` needs none.
    ``loss`` is returned unchanged when no gradient is attached.
    """
    if all(g is None for g in grads):
        return loss
    return _PrecomputedGrad.apply(expand_dim, loss, *inputs, *grads)


def needs_grad(*tensors: Tensor | None) -> tuple[bool, ...]:
    """Which of ``tensors`` will receive a gradient from this call."""
    enabled = torch.is_grad_enabled()
    return tuple(enabled and t is not None and t.requires_grad for t in tensors)
