"""The Triton kernels run here through Triton's interpreter, on CPU tensors.

``TRITON_INTERPRET=1`` must be set before a kernel is defined (``triton.jit`` picks the interpreter when
the function is created), so it is set here, before any test module imports ``losskit.ops.triton``.
Tests in this folder are skipped only when triton itself is not installed (it is in the test extra).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
