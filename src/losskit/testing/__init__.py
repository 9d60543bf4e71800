"""What tests and benchmarks share: the dtype-keyed tolerance table, float64 reference formulas, a loss's
value and gradients compared with a reference's, and a peak-memory probe.

Everything here is independent of losskit's fast paths: references are written in plain float64 torch
ops from the formula in each loss's docstring.
"""

from ._gradcheck import gradcheck
from ._memory import MALLOC_ENV, measure_peaks_in_child, peak_memory_above
from ._results import assert_matches_reference, assert_same_results, loss_and_grads
from ._tolerance import TOLERANCES, Tolerance, assert_close, assert_within_eps, eps_error

__all__ = ["MALLOC_ENV", "TOLERANCES", "Tolerance", "assert_close", "assert_matches_reference",
           "assert_same_results", "assert_within_eps", "eps_error", "gradcheck", "loss_and_grads",
           "measure_peaks_in_child", "peak_memory_above"]
