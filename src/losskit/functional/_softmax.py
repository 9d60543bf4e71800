"""``softmax`` and ``log_softmax``: validated here, computed by :mod:`losskit.ops.softmax` (the row
kernels on CPU and CUDA, torch's own ``torch.softmax`` / ``torch.log_softmax`` as the reference)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import _checks
from .._types import Impl
from ..ops import softmax as ops


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


def softmax(input: Tensor, dim: int | None = None, dtype: torch.dtype | None = None, *,
            impl: Impl = "auto") -> Tensor:
    r"""``exp(x - max) / sum(exp(x - max))`` along ``dim``; drop-in for ``torch.nn.functional.softmax``.

    ``dtype``, when given, is the dtype the input is cast to before the operation (and of the output).
    The kernels' forward and backward each read every operand once and write once per element;
    ``impl="torch"`` is ``torch.softmax`` itself, the reference; ``impl`` as in
    :func:`losskit.functional.cross_entropy`.
    Gradients: :math:`y (g - \sum g y)`; double backward works (in torch ops).

    Example:
        >>> import torch, losskit.functional as LF
        >>> LF.softmax(torch.tensor([1.0, 2.0, 1000.0]), dim=0)
        tensor([0., 0., 1.])
    """
    x = _checks.floating("input", input)
    return ops.softmax(x, _dim(x, dim, "softmax"), _dtype(dtype), impl, log=False)


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
    return ops.softmax(x, _dim(x, dim, "log_softmax"), _dtype(dtype), impl, log=True)
