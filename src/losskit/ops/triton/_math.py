"""float32 device functions that more than one family of the Triton kernels computes the same way."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def log1p(v):
    """log(1 + v) for v >= -1 to a few ulp, also where 1 + v rounds to 1: Kahan's ``log(u) * v / (u - 1)``
    with u = fl(1 + v). ``u - 1`` is exact (Sterbenz for u in [1/2, 2]; below 1/2, u = 1 + v exactly), so
    ``v / (u - 1)`` corrects u's rounding; where u rounds to 1, log1p(v) = v. NaN stays NaN; -1 gives -inf.
    ``triton.language`` has no log1p, and libdevice's does not run in the interpreter that the tests use."""
    u = 1.0 + v
    d = u - 1.0
    exact = d == 0.0
    return tl.where(exact, v, tl.log(u) * (v / tl.where(exact, 1.0, d)))


@triton.jit
def running_max(m, x):
    """One step of an online softmax over a (BLOCK_R, BLOCK_C) block ``x`` (-inf where masked): the rows'
    new max ``m'``, the ``shift`` the block's exponentials take (``m'``, or 0 while a row has only -inf, so
    that ``exp(-inf - -inf)`` never arises: its exps are 0) and ``exp(m - shift)``, the factor of the sums
    so far (0 at a row's first finite block, whose sums were 0; 1 while the max stays)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, shift, tl.exp(m - shift)
