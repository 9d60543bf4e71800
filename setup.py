"""The C extension of losskit (everything else is declared in pyproject.toml).

``losskit.ops.cpu._native*`` hold the compiled CPU kernels. Each is optional: if one cannot be built
(no C compiler, an unsupported one), the install still succeeds, losskit runs on its pure-torch path and
``impl="compiled"`` raises an ImportError that says how to get the kernels.
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -O3 vectorises the kernels' loops (-g0: no debug info in the installed binary); no -ffast-math: NaN
# and inf must propagate as in torch. The hot functions carry their own target_clones (x86-64-v3 and
# the baseline, x86-64-v4 too for some), so no -march here.
unix_flags = ["-O3", "-g0", "-std=gnu11", "-fno-math-errno", "-Wno-psabi", "-pthread"]
unix_link = ["-pthread"]
# LOSSKIT_SANITIZE=1 (.ci/sanitize): AddressSanitizer and UndefinedBehaviorSanitizer, stopping at the first
# report. These come after -O3 -g0 (CFLAGS would come before them, and lose): -g1 for the reports' line
# numbers; -O1 as a sanitized -O3 -g build took 8.5 minutes here and -O2 2 CPU-minutes, -O1 under one;
# -fexpensive-optimizations so that a * b + c still contracts to an FMA, as the kernels' accuracy expects.
if os.environ.get("LOSSKIT_SANITIZE") == "1":
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    unix_flags += [*sanitize, "-O1", "-fexpensive-optimizations", "-g1"]
    unix_link += sanitize
# One extension module per C file: losskit/ops/cpu/_native*.c -> losskit.ops.cpu._native*; the headers
# (_native_*.h) are shared and included by each.
kernels = Path("src/losskit/ops/cpu")
headers = sorted(str(h) for h in kernels.glob("_native*.h"))
extensions = [
    Extension(
        f"losskit.ops.cpu.{source.stem}",
        sources=[str(source)],
        depends=headers,
        extra_compile_args=[] if sys.platform == "win32" else unix_flags,
        extra_link_args=[] if sys.platform == "win32" else unix_link,
        optional=True,
    )
    for source in sorted(kernels.glob("_native*.c"))
]



class ParallelBuildExt(build_ext):
    """build_ext compiling the four modules side by side, one per CPU the build may use (``-j N``, or
    ``build_ext --parallel``, still wins): each module compiles its hot functions two or three times, and
    one after another they took about 100 s of a `pip install` on the 2-core VM."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


setup(ext_modules=extensions, cmdclass={"build_ext": ParallelBuildExt})
