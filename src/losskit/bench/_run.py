"""One benchmark run: for each (case, size, dtype), every implementation on the same inputs.

Order within a unit: build the inputs once; a warm-up round (each implementation once, untimed; losskit's
result is checked against the reference here); peak memory, measured by a child process on its own copy
of the inputs (:mod:`._memory_probe`), or on CUDA in this process by the caching allocator's statistics;
then the timed rounds, interleaved round-robin, the fast implementations called up to five times a round
(``_measure.calls_per_round``). The number of rounds is ``reps``, cut down after the first to what fits
in ``budget`` seconds, never below three (``_measure.MIN_REPS``).

A unit on ``cuda`` builds its inputs on the GPU, adds the baselines of the optional GPU libraries that
import (``libraries_of``; the others are listed as not installed) and has no float32 twin: its float32
units are a few seconds away in the same run, on a device whose speed does not drift with other
processes' load as the shared CPU's does.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._cases import COMPILED, EAGER, LOSSKIT, ROOFLINE, Case, Impl, Inputs, dtype_name
from ._measure import (LOW_PRECISION, call, copy_bandwidth, copy_of, differentiated, disagreement, peak_bytes,
                       reset, round_robin, steady)
from ._memory_probe import MemoryProbe
from ._sizes import Size

#: A bfloat16 unit also times losskit on float32 copies of its inputs, interleaved with the others, so
#: that its bfloat16-against-float32 ratio per element comes from one run, as the other ratios do (units
#: run one after another, while the machine's load and memory state drift). Both are timed ``steady``
#: (an untimed call first), so neither pays for fresh output memory because the other ran last.
LOSSKIT_FLOAT32 = "losskit float32"


@dataclass(frozen=True)
class Unit:
    case: Case
    size: Size
    dtype: torch.dtype
    #: "cpu" or "cuda".
    device: str = "cpu"


@dataclass
class Result:
    unit: Unit
    #: Median ms per implementation (the roofline included); empty when the unit was not measured.
    ms: dict[str, float] = field(default_factory=dict)
    #: Peak bytes above inputs per implementation; empty when memory was not measured.
    peak: dict[str, int] = field(default_factory=dict)
    grad_bytes: int = 0
    #: Rounds timed, and timed calls per implementation (the fast ones are called several times a round).
    reps: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    #: "" when losskit agrees with the reference, else what differs.
    check: str = ""
    #: Why the unit was not measured: losskit lacks the function, or losskit or the reference raised.
    error: str = ""
    #: Why peak memory is missing ("" when measured).
    memory_error: str = ""
    #: Further baselines that raised in the warm-up (and were left out), name -> the error.
    failed: dict[str, str] = field(default_factory=dict)
    #: Library baselines whose package does not import, name -> "not installed (why)".
    absent: dict[str, str] = field(default_factory=dict)


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


def impls_of(unit: Unit, compile_reference: bool) -> dict[str, Impl]:
    """losskit, the reference, torch.compile(reference) if asked, the case's further baselines.
    ImportError/AttributeError when losskit lacks the case's function."""
    case = unit.case
    impls = {LOSSKIT: case.resolve(), EAGER: case.reference}
    if compile_reference:
        # Cases share reference code objects (one lambda factory), and dynamo caches by code object: past
        # its recompile limit it would silently run eager. Each unit starts from an empty cache instead.
        torch._dynamo.reset()
        impls[COMPILED] = torch.compile(case.reference)
    impls.update(case.baselines)
    return impls


def _on_own_inputs(impl: Impl, own: Inputs) -> Impl:
    """``impl`` called on ``own`` whatever inputs it is given, as one more implementation of a unit
    (``own_inputs``: ``seconds`` and ``peak_bytes`` free their gradients untimed)."""
    def on_own(_inputs: Inputs) -> None:
        call(impl, own)

    on_own.own_inputs = own  # type: ignore[attr-defined]
    return on_own


def _float32_twin(losskit: Impl, unit: Unit) -> Impl:
    """losskit on float32 inputs of the unit's case and size (the float32 unit's values), timed as one
    more implementation of a bfloat16 unit."""
    return _on_own_inputs(losskit, unit.case.make(unit.size, torch.float32, torch.Generator().manual_seed(0)))


def libraries_of(unit: Unit, inputs: Inputs) -> tuple[dict[str, Impl], dict[str, str]]:
    """The baselines of a cuda unit from optional GPU libraries (``OnCuda.libraries``) whose package
    imports, one that writes into its inputs on a copy of ``inputs`` of its own; and name -> why not for
    the others. A CPU unit has none: the libraries are Triton kernels for CUDA tensors."""
    libraries = unit.case.cuda.libraries if unit.device == "cuda" and unit.case.cuda else {}
    loaded, absent = {}, {}
    for name, library in libraries.items():
        try:
            impl = library.load()
        except ImportError as error:  # the package, or one it needs (triton), is missing
            absent[name] = f"not installed ({_error(error)})"
            continue
        except Exception as error:  # installed but broken (a version mismatch): the other columns still run
            absent[name] = f"does not import ({_error(error)})"
            continue
        if library.overwrites_inputs:
            impl = _on_own_inputs(impl, {k: v.detach().clone().requires_grad_(v.requires_grad)
                                         for k, v in inputs.items()})
        loaded[name] = impl
    return loaded, absent


def _ideal_bytes(inputs: Inputs) -> int:
    """What a fused kernel must move: read every input once, write each gradient (and a non-scalar
    output, which has the shape of ``grad_output``) once."""
    written = [*differentiated(inputs), *([inputs["grad_output"]] if "grad_output" in inputs else [])]
    return sum(t.nbytes for t in inputs.values()) + sum(t.nbytes for t in written)


#: The copy timed in every unit's rounds (``copy_of``): read this many bytes and write as many, as
#: ``copy_bandwidth`` does at the start (beyond any cache, large enough that the copy runs at its steady
#: rate). Timed beside the implementations, it gives the copy bandwidth of the unit's own rounds, so the
#: roofline ratio comes from one run like the other ratios: the bandwidth measured once at the start moved
#: from 23 to 34 GB/s between runs on this VM, independently of the kernels' times.
COPY_BYTES = 256 << 20


def _results(out_and_grads: tuple[object, list]) -> list[torch.Tensor]:
    out, grads = out_and_grads
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return [t.detach() for t in [*outs, *grads] if t is not None]


def _error(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _warm_up(result: Result, impls: dict[str, Impl], inputs: Inputs) -> None:
    """Each implementation once; checks losskit against the reference; drops (and records) a further
    baseline that raises, or sets ``result.error`` when losskit or the reference raises."""
    checked = {}
    for name, impl in list(impls.items()):
        reset(inputs)
        try:
            out = call(impl, inputs)
        except Exception as error:  # reported in the table; the other cases still run
            if name in (LOSSKIT, EAGER):
                result.error = f"{name} raised {_error(error)}"
                return
            result.failed[name] = _error(error)
            del impls[name]
            continue
        if name in (LOSSKIT, EAGER):
            checked[name] = _results(out)
        del out
    reset(inputs)
    truth = None
    if result.unit.dtype in LOW_PRECISION:
        inputs64 = {k: v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v
                    for k, v in inputs.items()}
        truth = _results(call(impls[EAGER], inputs64))
    result.check = disagreement(checked[LOSSKIT], checked[EAGER], result.unit.dtype, truth)


def run_unit(unit: Unit, *, reps: int, budget: float, compile_reference: bool, bandwidth: float,
             probe: MemoryProbe | None, phase: Callable[[str], None]) -> Result:
    result = Result(unit)
    try:
        impls = impls_of(unit, compile_reference)
    except (ImportError, AttributeError) as error:
        result.error = f"unavailable: losskit.functional.{unit.case.function} ({type(error).__name__})"
        return result
    inputs = unit.case.make(unit.size, unit.dtype, torch.Generator(unit.device).manual_seed(0))
    result.grad_bytes = sum(t.nbytes for t in differentiated(inputs))
    libraries, result.absent = libraries_of(unit, inputs)
    impls.update(libraries)
    if unit.dtype == torch.bfloat16 and unit.device == "cpu":
        impls[LOSSKIT_FLOAT32] = steady(_float32_twin(impls[LOSSKIT], unit))
        impls[LOSSKIT] = steady(impls[LOSSKIT])

    phase("warm-up")
    _warm_up(result, impls, inputs)
    if result.error:
        return result

    if unit.device == "cuda":
        phase("memory")
        result.peak = {name: peak_bytes(impl, inputs) for name, impl in impls.items()}
    elif probe is not None:
        phase("memory")
        # The parent's inputs stay allocated meanwhile: the child builds its own.
        result.peak, result.memory_error = probe.measure({
            "case": unit.case.name, "size": list(unit.size), "dtype": dtype_name(unit.dtype),
            "impls": [name for name in impls if name != LOSSKIT_FLOAT32], "compile": compile_reference})

    phase("timing")
    # The roofline: the bytes the kernel must move at the copy bandwidth of these rounds (a copy timed
    # among the implementations); `bandwidth`, measured once at the start, where the copy cannot be made.
    try:
        impls[ROOFLINE] = copy_of(2 * COPY_BYTES, unit.device)
    except RuntimeError:  # out of memory for the copy's two buffers
        pass
    times, result.reps = round_robin(impls, inputs, reps, budget)
    result.ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    result.calls = {name: len(ts) for name, ts in times.items()}
    if ROOFLINE in times:
        bandwidth = 2 * COPY_BYTES / statistics.median(times[ROOFLINE])
    result.ms[ROOFLINE] = _ideal_bytes(inputs) / bandwidth * 1e3
    return result


def run(units: list[Unit], *, reps: int, budget: float, compile_reference: bool,
        progress: Callable[[Unit, str], None]) -> tuple[list[Result], float, str]:
    """Results of every unit, the copy bandwidth in bytes/s of their device (that of the first unit: a run
    is on one device) and why memory is not measured ("" if it is)."""
    # Everything allocated so far (torch's modules, ...) is moved out of the collector's reach, so the
    # collections between calls only walk what the benchmark itself creates.
    gc.freeze()
    device = units[0].device if units else "cpu"
    bandwidth = copy_bandwidth(device=device)
    # On CUDA peak memory comes from the caching allocator, in this process.
    memory_error = memory_probe_error() if device == "cpu" else ""
    probe = None if memory_error or device != "cpu" else MemoryProbe()
    results = []
    try:
        if probe is not None:
            probe.start()
        for unit in units:
            results.append(run_unit(unit, reps=reps, budget=budget, compile_reference=compile_reference,
                                    bandwidth=bandwidth, probe=probe, phase=lambda p, u=unit: progress(u, p)))
            if device == "cuda":
                # The unit's tensors are gone: hand their cached blocks back, so that the next unit's
                # differently sized ones are not fitted into fragments of them.
                torch.cuda.empty_cache()
            progress(unit, "done")
    finally:
        if probe is not None:
            probe.close()
    return results, bandwidth, memory_error
