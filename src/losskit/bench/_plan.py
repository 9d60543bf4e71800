"""Which units ``losskit bench`` measures: the selected cases at their sizes and dtypes, on one device.

On CPU every case runs (or those named), at the given sizes or its own, in the given dtypes (default
float32) less those it leaves out on CPU (``Case.dtypes``). On CUDA the cases with GPU sizes
(``Case.cuda``) run (or those named), at the given sizes or their GPU sizes, in the given dtypes or their
GPU dtypes; a case without GPU sizes runs only when named, at its CPU sizes, in float32 by default.
"""

from __future__ import annotations

import torch

from ._cases import CASES, Case, dtype_name
from ._run import Unit
from ._sizes import Size


def plan(device: str, cases: list[Case] | None = None, sizes: list[Size] | None = None,
         dtypes: list[torch.dtype] | None = None) -> tuple[list[Unit], list[str]]:
    """The units to measure on ``device`` ("cpu" or "cuda"), and what was left out and why. ``sizes`` apply
    to the cases with as many dimensions."""
    units, skipped = [], []
    for case in cases or [case for case in CASES if device == "cpu" or case.cuda]:
        on_gpu = case.cuda if device == "cuda" else None
        case_sizes = ([s for s in sizes if len(s) == len(case.dims)] if sizes
                      else list(on_gpu.sizes if on_gpu else case.sizes))
        if not case_sizes:
            skipped.append(f"{case.name}: no --sizes entry of the form {'x'.join(case.dims)}")
        wanted = dtypes or list(on_gpu.dtypes if on_gpu else [torch.float32])
        # Case.dtypes is what runs on CPU (linear_cross_entropy leaves out bfloat16 where torch emulates its GEMM).
        on_cpu = case.dtypes() if callable(case.dtypes) else case.dtypes
        runs = [d for d in wanted if device == "cuda" or on_cpu is None or d in on_cpu]
        skipped += [f"{case.name} {dtype_name(d)}: {case.dtypes_why}" for d in wanted if d not in runs]
        units += [Unit(case, size, dtype, device) for size in case_sizes for dtype in runs]
    return units, skipped
