"""Validation helpers.

Each raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong value or shape) with a
message that names the argument and shows what it got. They run before any computation. The only
checks that read tensor values (and so synchronise a device) are the ones that keep indexing safe:
target classes in range, and the documented [0, 1] domain of ``binary_cross_entropy``. Inside
:func:`no_sync` those two are skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ._types import REDUCTIONS


def tensor(name: str, value: object) -> Tensor:
    """``value`` must be a dense (strided) tensor: the kernels index storage, which a sparse tensor lacks."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {value.layout}; convert it with .to_dense()")
    return value


def floating(name: str, value: object) -> Tensor:
    """``value`` must be a floating-point tensor."""
    t = tensor(name, value)
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    return t


def optional_floating(name: str, value: object) -> Tensor | None:
    return None if value is None else floating(name, value)


def reduction(value: object, allowed: Sequence[str] = REDUCTIONS) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def number_in(name: str, value: object, low: float, high: float | None = None) -> float:
    """A real number with ``low <= value`` (and ``value <= high`` when given)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not (v >= low and (high is None or v <= high)):  # also rejects NaN
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return v


def integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def same_shape(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(
            f"{name} must have the same shape as {ref_name} {tuple(ref.shape)}, got {tuple(value.shape)}"
        )


def same_device(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")


def no_grad_required(name: str, value: Tensor | None) -> None:
    """Class weights are constants of the fused losses; refuse a weight that asks for a gradient."""
    if value is not None and value.requires_grad:
        raise ValueError(
            f"{name} requires grad, but losskit treats {name} as a constant and computes no gradient "
            f"for it; pass {name}.detach(), or use torch.nn.functional if you need d(loss)/d({name})"
        )


def class_weight(weight: object, n_classes: int, input: Tensor, name: str = "weight") -> Tensor | None:
    """A 1-D floating tensor of ``n_classes`` on ``input``'s device, or None."""
    if weight is None:
        return None
    w = floating(name, weight)
    if w.dim() != 1 or w.numel() != n_classes:
        raise ValueError(
            f"{name} must be a 1-D tensor with one entry per class ({n_classes}), got shape {tuple(w.shape)}"
        )
    same_device(name, w, "input", input)
    no_grad_required(name, w)
    return w


def broadcastable(name: str, value: Tensor, shape: torch.Size, ref_name: str) -> None:
    try:
        out = torch.broadcast_shapes(value.shape, shape)
    except RuntimeError:
        out = None
    if out != shape:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} must broadcast to {ref_name}'s shape {tuple(shape)}"
        )


#: Whether the checks that read tensor values run (see :func:`no_sync`); a one-element list, read at call time.
_VALUE_CHECKS = [True]


@contextlib.contextmanager
def no_sync() -> Iterator[None]:
    """Run losses without a host synchronisation: skip the two checks that read tensor values.

    A loss then only launches work on the tensors' device, so a CUDA graph can capture it and
    torch.compile(fullgraph=True) traces it whole. The checks skipped are the class-index range of
    ``cross_entropy``, ``focal_loss``, ``nll_loss`` and ``linear_cross_entropy`` (and the
    vocab-parallel losses) and the [0, 1] domain of ``binary_cross_entropy``. Memory stays safe: no
    kernel uses a target as an address before checking it. What changes is the error: an
    out-of-range target then gives a NaN loss and gradient for its position (the Triton kernels), the
    same ValueError (the C kernels, which check every target themselves), or torch's device-side assert
    (the composite and reference paths on CUDA); a BCE input outside [0, 1] gives NaN or, in the C
    kernel, the same ValueError. The setting holds for the whole process while the block runs, other
    threads' losses included.

    Example:
        >>> import torch, losskit, losskit.functional as LF
        >>> with losskit.no_sync():
        ...     LF.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 2]))
        tensor(1.0986)
    """
    previous = _VALUE_CHECKS[0]
    _VALUE_CHECKS[0] = False
    try:
        yield
    finally:
        _VALUE_CHECKS[0] = previous


def in_unit_interval(name: str, value: Tensor) -> None:
    """Every element in [0, 1] (NaN passes through, as torch propagates it).

    One reduction and one sync, no input-sized temporary: min and max in [0, 1] settle it. A NaN makes
    both NaN, and only then (or on failure) an elementwise mask finds the out-of-range value, if any.
    Skipped inside :func:`no_sync`.
    """
    if value.numel() == 0 or not _VALUE_CHECKS[0]:
        return
    low, high = torch.aminmax(value)
    if bool((low >= 0) & (high <= 1)):
        return
    bad = value[(value < 0) | (value > 1)]
    if bad.numel():
        raise ValueError(f"{name} must have all elements in [0, 1], found {bad[0].item()!r}")


def class_targets(target: Tensor, n_classes: int, ignore_index: int, name: str = "target") -> None:
    """Integer class indices in [0, n_classes) except where equal to ``ignore_index``.

    Reads the targets (one pass over N integers): the gather that follows must never index out of range.
    Skipped inside :func:`no_sync`.
    """
    if target.numel() == 0 or not _VALUE_CHECKS[0]:
        return
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise ValueError(
            f"{name} contains class index {value}, outside [0, {n_classes}) for input with {n_classes} "
            f"classes (ignore_index={ignore_index})"
        )
