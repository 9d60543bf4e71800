"""Peak resident memory of a call, above what was resident before it (Linux, CPU tensors).

Writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark ``VmHWM`` to the current
``VmRSS``; after the call, ``VmHWM - VmRSS(before)`` is the peak the call added, counting every
allocation (torch's, Python's, a compiled kernel's). glibc keeps freed heap memory resident unless large
blocks are mmapped, so run measurements with ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment (the
benchmark command and the memory tests set it for the child process they measure in); otherwise
earlier frees inflate the baseline and the figure reads low.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

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
    _CLEAR.write_text("5")
    before = _kib("VmRSS")
    out = fn()
    peak = _kib("VmHWM") - before
    del out
    return peak
