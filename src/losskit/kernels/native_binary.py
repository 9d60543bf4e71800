"""Compiled CPU kernels of the binary losses (``impl="compiled"``): the C extension ``_native_binary``.

The vector log and log1p of the C kernels live in ``_native_log.h`` (its header comment states their
measured accuracy); :func:`log_` exposes them for the accuracy tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native

#: The extension module's name under ``losskit.kernels``.
EXTENSION = "_native_binary"


def log_(x: Tensor, *, plus1: bool = False) -> Tensor:
    """The kernels' vector log (``log1p`` if ``plus1``), in place, of a contiguous float32/float64 CPU tensor."""
    ext = native.module(EXTENSION)
    if x.device.type != "cpu" or not x.is_contiguous() or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be a contiguous float32/float64 CPU tensor, got {x.dtype} on {x.device}")
    ext.log(x.data_ptr(), x.numel(), x.dtype == torch.float64, plus1)
    return x
