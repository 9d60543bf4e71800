"""The suite's one global setting: the Triton kernels run through Triton's interpreter, on CPU tensors.

``TRITON_INTERPRET=1`` must be set before a kernel is defined (``triton.jit`` picks the interpreter when
the function is created), so it is set here, in the root conftest, which pytest loads before it
collects anything (the doctests of ``src/losskit`` import ``losskit.ops.triton`` too). The tests of
tests/ops/triton are skipped only when triton itself is not installed (it is in the test extra).
"""

import importlib.util
import os

os.environ["TRITON_INTERPRET"] = "1"

# Without triton (a test run outside the test extra), the doctest collection of src/losskit would fail
# importing the Triton backend; tests/ops/triton skips itself with importorskip.
if importlib.util.find_spec("triton") is None:  # found, not imported: most steps never load it
    collect_ignore = ["src/losskit/ops/triton"]
