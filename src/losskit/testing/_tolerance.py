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
#: terms. Accuracy against a float64 truth is judged in the dtype's own eps: see :func:`assert_within_eps`.
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


def eps_error(actual: Tensor, truth: Tensor, *, floor: float | None = None) -> float:
    """The largest error of ``actual`` against a float64 ``truth``, in epsilons of ``actual``'s dtype and
    relative to ``max(|truth|, floor)`` per element (see :func:`assert_within_eps`); NaN where the two
    disagree on which elements are NaN or on an infinity."""
    a, t = actual.double(), truth.double().expand_as(actual)
    finite = t.isfinite()
    if not torch.equal(a.isnan(), t.isnan()) or not torch.equal(a[~finite & ~t.isnan()], t[~finite & ~t.isnan()]):
        return float("nan")
    if not finite.any():
        return 0.0
    info = torch.finfo(actual.dtype)
    scale = t[finite].abs().clamp_min(info.tiny if floor is None else floor)
    return ((a[finite] - t[finite]).abs() / scale).max().item() / info.eps


def assert_within_eps(actual: Tensor, truth: Tensor, n: float, *, floor: float | None = None, msg: str = "") -> None:
    """Every element of ``actual`` is within ``n`` epsilons of its own dtype of a float64 ``truth``:
    ``|actual - truth| <= n * eps * max(|truth|, floor)``.

    ``floor`` defaults to the dtype's smallest normal number, which makes the bound relative per element;
    ``floor=1`` bounds log-probabilities as "n eps times max(1, |value|)"; ``floor=truth.abs().max()``
    makes it normwise. NaN and infinities must sit where the truth has them. The bound depends on the
    dtype and the formula, never on another library's error on the CPU at hand.
    """
    err = eps_error(actual, truth, floor=floor)
    if not err <= n:
        raise AssertionError(f"{msg} error {err:.3g} eps of {actual.dtype} > {n} eps"
                             + (" (NaN or infinity where the truth has none, or the reverse)" if err != err else ""))
