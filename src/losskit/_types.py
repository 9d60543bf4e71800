"""Type aliases shared by the functional and module APIs."""

from __future__ import annotations

from typing import Literal

#: How a per-element loss is reduced; torch's three values.
Reduction = Literal["none", "mean", "sum"]
#: ``kl_div`` also accepts torch's ``"batchmean"`` (sum divided by the batch size).
KLReduction = Literal["none", "mean", "sum", "batchmean"]

REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")
#: Which implementation computes a loss: ``"compiled"`` losskit's C kernels (CPU tensors), ``"torch"`` the
#: pure-torch path (any device; the reference), ``"auto"`` the compiled one where it is built and applies.
Impl = Literal["auto", "torch", "compiled"]
IMPLS: tuple[str, ...] = ("auto", "torch", "compiled")
