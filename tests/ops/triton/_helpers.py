"""What the Triton kernels' tests share: dtypes, seeds, bounds and the refusals every wrapper makes."""

from __future__ import annotations

import contextlib

import pytest
import torch

#: The interpreter runs a tile's masked lanes in numpy too (-inf - -inf, log 0, 0 * inf), and the tests'
#: special values (NaN and infinities where torch has them) on purpose: its RuntimeWarnings are about
#: values that are never stored, or expected. Each test module sets ``pytestmark`` to this.
INTERPRETER_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning")
INF = float("inf")
#: The storage dtypes of the kernels. The interpreter runs bfloat16 and float16 as the GPU does (converted
#: to float32 on load), but rounds on store differently: float16 to nearest (numpy), bfloat16 by
#: truncation (its cast ignores the rounding mode), so a bfloat16 result can be up to one eps off where a
#: GPU's is half an eps.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOW = DTYPES[1:]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normwise(truth: torch.Tensor) -> float | None:
    """The floor that makes an eps bound normwise: the largest finite |entry| of ``truth``; None (a bound
    relative per element: exact where the truth is 0) if there is none but 0."""
    finite = truth[truth.isfinite()].abs()
    return (finite.max().item() or None) if finite.numel() else None


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    """The same dtype, shape and bits (NaN where NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def refuses_float64(name: str) -> contextlib.AbstractContextManager:
    """The ValueError of a float64 operand ``name`` (float64 runs on the C and torch backends)."""
    return pytest.raises(ValueError, match=rf"\b{name} is torch\.float64")


def refuses_block(value: int) -> contextlib.AbstractContextManager:
    """The ValueError of a BLOCK_C (``block``) that is not a power of two."""
    return pytest.raises(ValueError, match=rf"block must be a power of two, got {value}")
