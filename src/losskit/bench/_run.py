"""One benchmark run: for each (case, size, dtype), every implementation on the same inputs.

Order within a unit: build the inputs once; a warm-up round (each implementation once, untimed; losskit's
result is checked against the reference here); a memory round (each implementation once, peak memory
only); then the timed rounds, interleaved round-robin. The number of timed rounds is ``reps``, cut down
to what fits in ``budget`` seconds (judged from the memory round's duration) but never below one.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._cases import EAGER, LOSSKIT, Case, Impl, Inputs
from ._measure import call, copy_bandwidth, differentiated, disagreement, peak_bytes, reset, round_robin
from ._sizes import Size

COMPILED = "torch.compile"
ROOFLINE = "roofline"


@dataclass(frozen=True)
class Unit:
    case: Case
    size: Size
    dtype: torch.dtype


@dataclass
class Result:
    unit: Unit
    #: Median ms per implementation (the roofline included); empty when losskit is unavailable.
    ms: dict[str, float] = field(default_factory=dict)
    #: Peak bytes above inputs per implementation; None where it could not be measured.
    peak: dict[str, int | None] = field(default_factory=dict)
    grad_bytes: int = 0
    reps: int = 0
    #: "" when losskit agrees with the reference, else what differs.
    check: str = ""
    unavailable: str = ""


def memory_probe_error() -> str:
    """"" when ``peak_memory_above`` works here, else why not (non-Linux, or /proc not writable)."""
    path = Path("/proc/self/clear_refs")
    if not path.exists():
        return "no /proc/self/clear_refs (Linux only)"
    try:
        path.write_text("5")
    except OSError as error:
        return f"cannot reset the peak ({error})"
    return ""


def _impls(unit: Unit, compile_reference: bool) -> dict[str, Impl]:
    case = unit.case
    impls = {LOSSKIT: case.resolve(), EAGER: case.reference}
    if compile_reference:
        impls[COMPILED] = torch.compile(case.reference)
    impls.update(case.baselines)
    return impls


def _ideal_bytes(inputs: Inputs) -> int:
    """What a fused kernel must move: read every input once, write each gradient (and a non-scalar
    output, which has the shape of ``grad_output``) once."""
    written = [*differentiated(inputs), *([inputs["grad_output"]] if "grad_output" in inputs else [])]
    return sum(t.nbytes for t in inputs.values()) + sum(t.nbytes for t in written)


def _results(out_and_grads: tuple[object, list]) -> list[torch.Tensor]:
    out, grads = out_and_grads
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return [t.detach() for t in [*outs, *grads] if t is not None]


def run_unit(unit: Unit, *, reps: int, budget: float, compile_reference: bool, bandwidth: float,
             memory_error: str, phase: Callable[[str], None]) -> Result:
    result = Result(unit)
    try:
        impls = _impls(unit, compile_reference)
    except (ImportError, AttributeError) as error:
        result.unavailable = f"losskit.functional.{unit.case.function} not available ({type(error).__name__})"
        return result
    inputs = unit.case.make(unit.size, unit.dtype, torch.Generator().manual_seed(0))
    result.grad_bytes = sum(t.nbytes for t in differentiated(inputs))

    phase("warm-up")
    checked = {}
    for name, impl in impls.items():
        reset(inputs)
        out = call(impl, inputs)
        if name in (LOSSKIT, EAGER):
            checked[name] = _results(out)
        del out
    reset(inputs)
    result.check = disagreement(checked[LOSSKIT], checked[EAGER], unit.dtype)
    del checked

    phase("memory")
    start = time.perf_counter()
    for name, impl in impls.items():
        result.peak[name] = None if memory_error else peak_bytes(impl, inputs)
    round_seconds = time.perf_counter() - start

    result.reps = max(1, min(reps, int(budget // round_seconds))) if budget > 0 else reps
    phase(f"timing x{result.reps}")
    result.ms = {name: s * 1e3 for name, s in round_robin(impls, inputs, result.reps).items()}
    result.ms[ROOFLINE] = _ideal_bytes(inputs) / bandwidth * 1e3
    return result


def run(units: list[Unit], *, reps: int, budget: float, compile_reference: bool,
        progress: Callable[[Unit, str], None]) -> tuple[list[Result], float, str]:
    """Results of every unit, the copy bandwidth in bytes/s and why memory was not measured ("" if it was)."""
    # Everything allocated so far (torch's modules, ...) is moved out of the collector's reach, so the
    # collections between calls only walk what the benchmark itself creates.
    gc.freeze()
    bandwidth = copy_bandwidth()
    memory_error = memory_probe_error()
    results = []
    for unit in units:
        results.append(run_unit(unit, reps=reps, budget=budget, compile_reference=compile_reference,
                                bandwidth=bandwidth, memory_error=memory_error,
                                phase=lambda p, u=unit: progress(u, p)))
        progress(unit, "done")
    return results, bandwidth, memory_error
