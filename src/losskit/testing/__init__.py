"""What tests and benchmarks share: the dtype-keyed tolerance table, float64 reference formulas and a
peak-memory probe.

Everything here is independent of losskit's fast paths: references are written in plain float64 torch
ops from the formula in each loss's docstring.
"""

from ._gradcheck import gradcheck
from ._memory import peak_memory_above
from ._tolerance import TOLERANCES, Tolerance, assert_close, assert_no_worse_than

__all__ = ["TOLERANCES", "Tolerance", "assert_close", "assert_no_worse_than", "gradcheck", "peak_memory_above"]
