"""A loss's value and gradients for one backward, and their comparison with a reference's."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._tolerance import assert_close

#: What the three results of :func:`loss_and_grads` are, for failure messages.
RESULT_NAMES = ("loss", "d/dinput", "d/dtarget")


def loss_and_grads(fn: Callable[..., Tensor], input: Tensor, target: Tensor, *args: object,
                   grad_output: Tensor | None = None, grad_output_seed: int = 0, target_requires_grad: bool = True,
                   **kwargs: object) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(loss, d/dinput, d/dtarget)`` of ``fn(input, target, *args, **kwargs)`` on fresh leaf copies.

    The backward is of ``grad_output`` (default: standard normal of the loss's shape drawn in float64 from
    ``grad_output_seed``, then cast to the loss's dtype: neither ones nor uniform, so a gradient that
    ignores grad_output is caught). The target requires grad when it is floating and
    ``target_requires_grad``; otherwise its gradient is None.
    """
    x = input.detach().clone().requires_grad_()
    floating = target.is_floating_point()
    t = target.detach().clone().requires_grad_(target_requires_grad) if floating else target
    loss = fn(x, t, *args, **kwargs)
    if grad_output is None:
        gen = torch.Generator().manual_seed(grad_output_seed)
        grad_output = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype)
    loss.backward(grad_output)
    return loss.detach(), x.grad, t.grad if floating else None


def assert_same_results(actual: Sequence[Tensor | None], expected: Sequence[Tensor | None], *,
                        dtype: torch.dtype | None = None, names: Sequence[str] = RESULT_NAMES) -> None:
    """Pairwise: None where the expected is None, else the same dtype and shape and :func:`assert_close`
    (the tolerance of ``dtype``, default the actual's). For the results of :func:`loss_and_grads`."""
    for name, a, b in zip(names, actual, expected):
        if a is None or b is None:
            if a is not b:
                raise AssertionError(f"{name}: {'None' if a is None else 'a tensor'}, expected "
                                     f"{'None' if b is None else 'a tensor'}")
            continue
        if a.dtype != b.dtype or a.shape != b.shape:
            raise AssertionError(f"{name}: {a.dtype} {tuple(a.shape)}, expected {b.dtype} {tuple(b.shape)}")
        assert_close(a, b, dtype=dtype, msg=name)


def assert_matches_reference(fn: Callable[..., Tensor], reference: Callable[..., Tensor], input: Tensor,
                             target: Tensor, *args: object, dtype: torch.dtype | None = None,
                             **kwargs: object) -> None:
    """:func:`assert_same_results` of :func:`loss_and_grads` of ``fn`` and of ``reference``, both called
    with the same arguments (and the same grad_output)."""
    assert_same_results(loss_and_grads(fn, input, target, *args, **kwargs),
                        loss_and_grads(reference, input, target, *args, **kwargs), dtype=dtype)
