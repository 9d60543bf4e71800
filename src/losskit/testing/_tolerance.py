"""The one tolerance table. A test that needs another tolerance says why in a comment."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Tolerance(NamedTuple):
    rtol: float
    atol: float


#: Keyed by the dtype of the result being judged. float64 results of a different but exact algorithm
#: agree to a few ulp of the largest terms summed; float32 to a few ulp after sums over up to ~1e5
#: terms. Low-precision dtypes are not judged by a fixed tolerance: see :func:`assert_no_worse_than`.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-10, atol=1e-12),
    torch.float32: Tolerance(rtol=2e-5, atol=2e-6),
    torch.bfloat16: Tolerance(rtol=1.6e-2, atol=1e-3),
    torch.float16: Tolerance(rtol=2e-3, atol=1e-4),
}


def assert_close(actual: Tensor, expected: Tensor, *, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: ``actual``'s)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol.rtol, atol=tol.atol,
                               equal_nan=True, msg=(lambda m: f"{msg}\n{m}") if msg else None)


def assert_no_worse_than(actual: Tensor, baseline: Tensor, truth: Tensor, *, factor: float = 2.0,
                         msg: str = "") -> None:
    """Low precision: the error of ``actual`` against a float64 ``truth`` is at most ``factor`` times the
    error of ``baseline`` (torch's own result in the same dtype), plus one ulp of the dtype at the
    result's scale so that an exact baseline does not demand exactness."""
    truth = truth.double()
    err = (actual.double() - truth).abs().max().item()
    base = (baseline.double() - truth).abs().max().item()
    ulp = torch.finfo(actual.dtype).eps * max(1.0, truth.abs().max().item())
    if not err <= factor * base + ulp:
        raise AssertionError(f"{msg} error {err:.3g} > {factor} x torch's error {base:.3g} + ulp {ulp:.3g}")
