"""Peak resident memory of a call, above what was resident before it (Linux, CPU tensors).

Writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark ``VmHWM`` to the current
``VmRSS``; after the call, ``VmHWM - VmRSS(before)`` is the peak the call added, counting every
allocation (torch's, Python's, a compiled kernel's). glibc keeps freed heap memory resident unless large
blocks are mmapped, so run measurements with ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment (the
benchmark command and the memory tests set it for the child process they measure in); otherwise
earlier frees inflate the baseline and the figure reads low.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from ..ops.cpu import native

#: The environment a process measured with :func:`peak_memory_above` starts with (glibc reads it at start).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1)) * 1024


def peak_memory_above(fn: Callable[[], object]) -> int:
    """Bytes of peak resident memory that ``fn()`` adds over what was resident when it started.

    The result of ``fn`` is dropped before returning, after the peak has been read.
    """
    if not _CLEAR.exists():
        raise RuntimeError("peak_memory_above needs Linux /proc/self/clear_refs")
    # An output buffer kept from an earlier call (losskit.ops.cpu.native.empty) would make this call's
    # new memory look free: release it, so that the peak counts every buffer the call needs.
    native.release_buffer_cache()
    _CLEAR.write_text("5")
    before = _kib("VmRSS")
    out = fn()
    peak = _kib("VmHWM") - before
    del out
    return peak


_MEASURE_CALLS = textwrap.dedent("""
    from losskit.testing import peak_memory_above
    for name, call in calls.items():
        call()  # first call: one-time allocations of torch's kernels, not the loss's
        print(name, peak_memory_above(call))
""")


def measure_peaks_in_child(source: str) -> dict[str, int]:
    """Peak bytes above what was resident of each call that ``source`` defines, in a fresh Python process
    started with :data:`MALLOC_ENV` and ``OMP_NUM_THREADS=1`` (the source may set other thread counts).

    ``source`` is Python code that defines ``calls``, a dict of name -> zero-argument callable, and the
    inputs they use (allocated before any measurement, so not counted). Each call runs once unmeasured,
    then once under :func:`peak_memory_above`. RuntimeError with the child's stderr if it fails.
    """
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(source) + _MEASURE_CALLS], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the memory probe exited with code {done.returncode}:\n{done.stderr}")
    return {name: int(peak) for name, peak in (line.rsplit(maxsplit=1) for line in done.stdout.splitlines() if line)}
