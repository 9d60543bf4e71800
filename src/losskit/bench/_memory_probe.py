"""Peak memory measured in a child process that runs with ``MALLOC_MMAP_THRESHOLD_=65536``.

VmHWM only means "peak above inputs" when glibc hands freed blocks back to the system; with its default
dynamic threshold, blocks up to 32 MiB stay resident after ``free`` and a later call reuses them
unseen. That setting also makes every mid-size temporary cost page faults, which would slow down
chunked kernels in a way no real training process sees, so timing runs in the parent with the default
allocator and only memory is measured here.

Protocol: one JSON request per line on stdin ``{"case", "size", "dtype", "impls", "compile"}``, one JSON
reply per line ``{"peak": {impl: bytes}}`` or ``{"error": message}``. Each implementation is warmed up
once on small inputs of the same case (one-time initialisation: thread pools, native modules), or on the
full inputs when it is compiled (compilation is shape-specific), before its measured call.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import torch

from ..testing import MALLOC_ENV

_WARMUP_EXTENT = 64  # each extent of the warm-up size is clipped to this


def _measure(request: dict) -> dict:
    from ._cases import BY_NAME
    from ._measure import call, peak_bytes, reset
    from ._run import COMPILED, Unit, impls_of

    unit = Unit(BY_NAME[request["case"]], tuple(request["size"]), getattr(torch, request["dtype"]))
    impls = {name: impl for name, impl in impls_of(unit, request["compile"]).items() if name in request["impls"]}
    small_size = tuple(min(e, _WARMUP_EXTENT) for e in unit.size)
    small = unit.case.make(small_size, unit.dtype, torch.Generator().manual_seed(0))
    inputs = unit.case.make(unit.size, unit.dtype, torch.Generator().manual_seed(0))
    peak = {}
    for name, impl in impls.items():
        warm = inputs if name == COMPILED else small
        call(impl, warm)
        reset(warm)
        peak[name] = peak_bytes(impl, inputs)
    return {"peak": peak}


def serve() -> None:
    # Replies go to a private copy of stdout; fd 1 itself is pointed at stderr so that anything a
    # library prints cannot corrupt the protocol.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    gc.freeze()
    for line in sys.stdin:
        try:
            reply = _measure(json.loads(line))
        except Exception as error:  # the parent reports it and carries on with the next unit
            reply = {"error": f"{type(error).__name__}: {error}"}
        gc.collect()
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


class MemoryProbe:
    """The parent's end: starts the child on first use, asks it for one unit at a time."""

    def __init__(self) -> None:
        self._child: subprocess.Popen | None = None
        #: Set when the child died: no further unit is measured.
        self.dead = ""

    def start(self) -> None:
        """Start the child now (its imports then overlap the parent's untimed warm-up)."""
        if self._child is None:
            # Started with -c, not -m: the package imports this module, so running it as __main__ would
            # execute it twice (and runpy warns about it).
            self._child = subprocess.Popen([sys.executable, "-c", f"from {__name__} import serve; serve()"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                           env={**os.environ, **MALLOC_ENV})

    def measure(self, request: dict) -> tuple[dict[str, int], str]:
        """Peak bytes per implementation and "", or {} and why not."""
        if self.dead:
            return {}, self.dead
        self.start()
        self._child.stdin.write(json.dumps(request) + "\n")
        self._child.stdin.flush()
        line = self._child.stdout.readline()
        if not line:
            self.dead = f"memory probe process exited with code {self._child.wait()} (out of memory?)"
            self._child = None
            return {}, self.dead
        reply = json.loads(line)
        if "error" in reply:
            return {}, f"memory probe: {reply['error']}"
        return {name: int(peak) for name, peak in reply["peak"].items()}, ""

    def close(self) -> None:
        if self._child is not None:
            self._child.stdin.close()
            self._child.wait(timeout=60)
            self._child = None
