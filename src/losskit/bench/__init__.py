"""The benchmark behind ``losskit bench``: every loss of the catalogue against its torch reference.

``CASES`` is the catalogue (:mod:`._cases`), ``plan`` picks the units (case, size, dtype, device) of a
run on CPU or CUDA, ``run`` measures them; ``records``/``write_csv``/``read_csv`` and ``plot`` turn
results into tidy CSV rows and a PNG.
"""

from ._cases import BY_NAME, CASES, Case, Target
from ._plan import plan
from ._plot import plot
from ._report import read_csv, records, table, verdicts, write_csv
from ._run import Result, Unit, run
from ._sizes import format_size, parse_size, parse_sizes

__all__ = ["BY_NAME", "CASES", "Case", "Result", "Target", "Unit", "format_size", "parse_size", "parse_sizes",
           "plan", "plot", "read_csv", "records", "run", "table", "verdicts", "write_csv"]
