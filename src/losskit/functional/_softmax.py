"""``softmax`` and ``log_softmax``: torch's single-pass ATen kernels behind losskit's validation.

torch already computes both in one fused, max-subtracted pass (and ``log_softmax`` as
``x - max - log(sum(exp(x - max)))``, never as the log of a softmax), so the pure-torch path calls them.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import _checks


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


def softmax(input: Tensor, dim: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    r"""``exp(x - max) / sum(exp(x - max))`` along ``dim``; drop-in for ``torch.nn.functional.softmax``.

    ``dtype``, when given, is the dtype the input is cast to before the operation (and of the output).

    Example:
        >>> import torch, losskit.functional as LF
        >>> LF.softmax(torch.tensor([1.0, 2.0, 1000.0]), dim=0)
        tensor([0., 0., 1.])
    """
    x = _checks.floating("input", input)
    return torch.softmax(x, _dim(x, dim, "softmax"), dtype=_dtype(dtype))


def log_softmax(input: Tensor, dim: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    r"""``x - max - log(sum(exp(x - max)))`` along ``dim``; drop-in for ``torch.nn.functional.log_softmax``.

    Stable for any finite input: the largest entry maps to ``-log(sum(exp(x - max))) >= -log(n)``.

    Example:
        >>> import torch, losskit.functional as LF
        >>> LF.log_softmax(torch.tensor([0.0, 1000.0]), dim=0)
        tensor([-1000.,     0.])
    """
    x = _checks.floating("input", input)
    return torch.log_softmax(x, _dim(x, dim, "log_softmax"), dtype=_dtype(dtype))
