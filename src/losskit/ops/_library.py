"""The kernels as torch custom ops (``torch.library``), so that torch.compile traces through them.

A kernel reads raw data pointers (the C extension) or launches a Triton grid: opaque to dynamo, a
graph break. Registered as custom ops, each is one node of the traced graph, with a fake
implementation for the compiler's shape propagation: ``torch.compile(fullgraph=True)`` of a loss with
``impl="compiled"`` or ``impl="triton"`` captures the whole loss, the kernel included.
:func:`losskit.ops._dispatch.kernel` hands these out instead of the plain functions while a trace runs;
eager calls skip them (a custom op's dispatch costs about 15 us a call).

Ops, one per (backend, operation), named ``losskit::<backend>_<operation>``:

* the row operations (``xent_rows``, ``nll_rows``, ``softmax_rows``, ``softmax_backward_rows``,
  ``entropy_rows``) take the backend function's arguments, tensors positional, and write their
  outputs in place (declared in ``mutates_args``: torch functionalises them). Their fake does nothing:
  the outputs exist already;
* the elementwise runners (``binary``, ``pointwise``) are functional: ``(loss, grad_input,
  grad_target)``, an empty tensor where a gradient is not wanted, the loss summed to one element
  when it is reduced. Their fake gives those shapes.

A data-dependent scale (a weighted mean's ``1 / sum w``) is a 0-dim tensor argument, never a Python
float read from the device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from .blocks import accumulation_dtype

_NAMESPACE = "losskit"


def _as_tensor(scale: Tensor | float, like: Tensor) -> Tensor:
    """A Python scale as a 0-dim tensor of ``like``'s accumulation dtype (float64 keeps its double)."""
    if isinstance(scale, Tensor):
        return scale
    return torch.tensor(float(scale), dtype=accumulation_dtype(like.dtype), device=like.device)


def _define(backend: str) -> dict[str, Callable]:
    """Register the custom ops of ``backend``; returns operation -> a function with the backend's signature."""
    ns = f"{_NAMESPACE}::{backend}_"

    @torch.library.custom_op(ns + "xent_rows", mutates_args=("grad3", "target_grad3", "loss"))
    def xent_rows(x3: Tensor, target: Tensor, grad3: Optional[Tensor], target_grad3: Optional[Tensor],
                  weight: Optional[Tensor], loss: Tensor, scale: Tensor, ignore_index: int, label_smoothing: float,
                  gamma: float) -> None:
        _dispatch.plain("xent_rows", backend)(x3, target, grad3, target_grad3, weight, loss, ignore_index=ignore_index,
                                   label_smoothing=label_smoothing, gamma=gamma, scale=scale)

    @torch.library.custom_op(ns + "nll_rows", mutates_args=("grad3", "loss"))
    def nll_rows(x3: Tensor, target: Tensor, grad3: Optional[Tensor], weight: Optional[Tensor], loss: Tensor,
                 scale: Tensor, ignore_index: int) -> None:
        _dispatch.plain("nll_rows", backend)(x3, target, grad3, weight, loss, ignore_index=ignore_index, scale=scale)

    @torch.library.custom_op(ns + "softmax_rows", mutates_args=("out3",))
    def softmax_rows(x3: Tensor, out3: Tensor, log: bool) -> None:
        _dispatch.plain("softmax_rows", backend)(x3, out3, log=log)

    @torch.library.custom_op(ns + "softmax_backward_rows", mutates_args=("out3",))
    def softmax_backward_rows(y3: Tensor, g3: Tensor, out3: Tensor, log: bool) -> None:
        _dispatch.plain("softmax_backward_rows", backend)(y3, g3, out3, log=log)

    @torch.library.custom_op(ns + "entropy_rows", mutates_args=("h", "grad3"))
    def entropy_rows(x3: Tensor, h: Tensor, grad3: Optional[Tensor], logits: bool) -> None:
        _dispatch.plain("entropy_rows", backend)(x3, h, grad3, logits=logits)

    def elementwise(op: str) -> Callable:
        @torch.library.custom_op(ns + op, mutates_args=())
        def run(kind: str, alpha: float, gamma: float, operands: list[Optional[Tensor]], want: list[bool],
                acc: torch.dtype, out_dtype: torch.dtype, keep: bool, grad_scale: Tensor, sum_last_dim: bool
                ) -> tuple[Tensor, Tensor, Tensor]:
            params = {"alpha": alpha, "gamma": gamma} if op == "binary" else {}
            rows = {"sum_last_dim": True} if sum_last_dim else {}  # (pointwise losses have no row sums)
            loss, grads = _dispatch.plain(op, backend)(_kind(op, kind), **params)(
                None, operands, want, acc=acc, out_dtype=out_dtype, keep=keep, grad_scale=grad_scale, **rows)
            if not keep:
                loss = loss.sum(0, keepdim=True)  # partial sums, however many the backend made: one
            x = operands[0]
            return loss, *(g if g is not None else x.new_empty(0) for g in grads[:2])

        @run.register_fake
        def _(kind, alpha, gamma, operands, want, acc, out_dtype, keep, grad_scale, sum_last_dim):
            x, y = operands[0], operands[1]
            if not keep:
                loss = x.new_empty(1, dtype=acc)
            elif sum_last_dim:
                loss = x.new_empty(x.shape[:-1], dtype=acc)
            else:
                loss = x.new_empty(x.shape, dtype=out_dtype)
            return (loss, *(t.new_empty(t.shape) if w else x.new_empty(0) for t, w in zip((x, y), want)))

        return run

    return {"xent_rows": xent_rows, "nll_rows": nll_rows, "softmax_rows": softmax_rows,
            "softmax_backward_rows": softmax_backward_rows, "entropy_rows": entropy_rows,
            "binary": elementwise("binary"), "pointwise": elementwise("pointwise")}


def _kind(op: str, kind: str) -> str | int:
    """Runner kinds travel as strings (a schema has one type per argument); pointwise's are ints."""
    return int(kind) if op == "pointwise" else kind


#: backend -> operation -> custom op, registered at import: a registration while dynamo traces would
#: break the graph.
_OPS = {backend: _define(backend) for backend in (_dispatch.CPU, _dispatch.TRITON)}


def _ops(backend: str) -> dict[str, Callable]:
    return _OPS[backend]


def custom_op(op: str, backend: str) -> Callable:
    """A function with the signature of backend ``backend``'s ``op`` that calls its custom op."""
    defined = _ops(backend)[op]
    if op in ("binary", "pointwise"):
        return functools.partial(_runner_factory, defined, op)
    if op == "xent_rows":
        def call(x3, target, grad3, target_grad3, weight, loss, *, ignore_index, label_smoothing, gamma, scale):
            defined(x3, target, grad3, target_grad3, weight, loss, _as_tensor(scale, x3), ignore_index,
                    label_smoothing, gamma)
        return call
    if op == "nll_rows":
        def call(x3, target, grad3, weight, loss, *, ignore_index, scale):
            defined(x3, target, grad3, weight, loss, _as_tensor(scale, x3), ignore_index)
        return call
    if op == "entropy_rows":
        return lambda x3, h, grad3, *, logits: defined(x3, h, grad3, logits)
    return lambda *tensors, log: defined(*tensors, log)  # softmax_rows, softmax_backward_rows


def _runner_factory(defined: Callable, op: str, kind: str | int, *, alpha: float = 0.0, gamma: float = 0.0
                    ) -> Callable:
    def runner(kernel: object, operands: Sequence[Tensor | None], want: Sequence[bool], *, acc: torch.dtype,
               out_dtype: torch.dtype, keep: bool, grad_scale: Tensor | float = 1.0, sum_last_dim: bool = False
               ) -> tuple[Tensor, list[Tensor | None]]:
        del kernel  # the reference expression; the backend's kernel computes the same
        want = [bool(w) for w in want]
        loss, gx, gy = defined(str(kind), float(alpha), float(gamma), list(operands), want, acc, out_dtype,
                               keep, _as_tensor(grad_scale, operands[0]), sum_last_dim)
        grads = [gx if want[0] else None, gy if len(want) > 1 and want[1] else None]
        return loss, grads + [None] * (len(operands) - 2)
    return runner
