"""``torch.autograd.gradcheck`` for fused losses.

A fused loss refuses a second backward through one graph (its stored gradient is scaled in place by the
first), and gradcheck backpropagates several times through one output (once per output element, and
twice more to check that backward is reentrant). :func:`gradcheck` therefore wraps ``fn`` in a Function
whose every backward re-evaluates ``fn(*inputs)`` with a fresh graph and returns its fused gradient for
that ``grad_output``: what is compared with finite differences is exactly losskit's gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *inputs):  # type: ignore[override]
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        wants = ctx.needs_input_grad[1:]
        inputs = [x.detach().requires_grad_(w) for x, w in zip(ctx.saved_tensors, wants)]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        grads = iter(torch.autograd.grad(out, [x for x in inputs if x.requires_grad], grad_output))
        return (None, *(next(grads) if w else None for w in wants))


def gradcheck(fn: Callable[..., Tensor], inputs: Sequence[Tensor], **kwargs: object) -> bool:
    """``torch.autograd.gradcheck(fn, inputs, **kwargs)`` for a ``fn`` built on fused losses.

    ``inputs`` are float64 tensors (those that require grad are checked); other arguments of the loss
    go into ``fn`` (a lambda). Raises like torch's gradcheck on a mismatch.
    """
    return torch.autograd.gradcheck(lambda *xs: _Recompute.apply(fn, *xs), tuple(inputs), **kwargs)
