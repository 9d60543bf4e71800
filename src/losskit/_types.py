"""Type aliases shared by the functional and module APIs."""

from __future__ import annotations

from typing import Literal

#: How a per-element loss is reduced; torch's three values.
Reduction = Literal["none", "mean", "sum"]
#: ``kl_div`` also accepts torch's ``"batchmean"`` (sum divided by the batch size).
KLReduction = Literal["none", "mean", "sum", "batchmean"]

REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")
#: Which implementation computes a loss (the rules: :mod:`losskit.ops._dispatch`): ``"auto"`` the fastest for
#: the tensors' device; ``"compiled"`` the C kernels on CPU, Triton on CUDA; ``"triton"`` Triton explicitly;
#: ``"torch"`` the pure-torch reference.
Impl = Literal["auto", "compiled", "triton", "torch"]
IMPLS: tuple[str, ...] = ("auto", "compiled", "triton", "torch")
