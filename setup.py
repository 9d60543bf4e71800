"""The C extension of losskit (everything else is declared in pyproject.toml).

``losskit.kernels._native`` holds the compiled CPU row kernels. It is optional: if it cannot be built
(no C compiler, an unsupported one), the install still succeeds, losskit runs on its pure-torch path and
``impl="compiled"`` raises an ImportError that says how to get the kernels.
"""

import sys

from setuptools import Extension, setup

# -O3 vectorises the kernels' loops (-g0: no debug info in the installed binary); no -ffast-math: NaN
# and inf must propagate as in torch. The hot functions carry their own target_clones (x86-64-v3 and
# the baseline), so no -march here.
unix_flags = ["-O3", "-g0", "-std=gnu11", "-fno-math-errno", "-Wno-psabi", "-pthread"]
native = Extension(
    "losskit.kernels._native",
    sources=["src/losskit/kernels/_native.c"],
    depends=["src/losskit/kernels/_native_rows.h"],
    extra_compile_args=[] if sys.platform == "win32" else unix_flags,
    extra_link_args=[] if sys.platform == "win32" else ["-pthread"],
    optional=True,
)

setup(ext_modules=[native])
