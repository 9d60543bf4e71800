"""Timing, peak memory and copy bandwidth of forward+backward calls on fixed inputs.

Every call starts from ``.grad = None`` on the differentiated inputs, so each implementation writes
fresh gradients; a garbage collection and, on CPU, a read of a buffer twice the last-level cache the
process can use (``evict_caches``) run before each call, outside the timed region, so every timed call
finds its operands in memory, not in a cache (the roofline's assumption). Without the read, which
implementation ran just before decided how much of a 16-32 MiB input (the default sizes) was still in a
32 MiB L3: on this VM a float32 focal_loss took 4.0 ms in a float32 run and 5.7 ms as the float32 twin of
the bfloat16 run, where it mostly followed torch eager (part of that, found later, was torch's spinning
OpenMP workers: see _native_common.h).

On CUDA (inputs on the GPU) a call is timed by CUDA events (``_cuda_seconds``) and its peak memory read
from the caching allocator's statistics (``_cuda_peak_above``); nothing is evicted: the GPU sizes are
gigabytes against an L2 of 50 MiB.
"""

from __future__ import annotations

import gc
import glob
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from ..testing import TOLERANCES, assert_within_eps, peak_memory_above
from ._cases import Impl, Inputs


def differentiated(inputs: Inputs) -> list[Tensor]:
    return [t for t in inputs.values() if t.requires_grad]


def reset(inputs: Inputs) -> None:
    for t in differentiated(inputs):
        t.grad = None


def call(impl: Impl, inputs: Inputs) -> tuple[object, list[Tensor | None]]:
    """One forward+backward; returns the output and the gradients (what the memory probe counts)."""
    out = impl(inputs)
    if isinstance(out, Tensor) and out.requires_grad:
        out.backward(inputs.get("grad_output"))
    return out, [t.grad for t in differentiated(inputs)]


#: At most this much of a last-level cache is counted per CPU the process may run on, whatever sysfs says:
#: above the LLC per core of x86 parts (Zen 4 MiB, 12 with 3D V-Cache; Xeon 2-5 MiB). A VM's sysfs lists
#: only its own vCPUs as sharing the host package's L3: an Intel VM with 2 vCPUs reports 480 MiB, all
#: "shared" by those 2 (a 96-core package: 5 MiB a core).
LLC_BYTES_PER_CPU = 16 << 20
#: The eviction buffer is twice the cache, and never larger than this.
MAX_EVICT_BYTES = 512 << 20


def _cpu_list(text: str) -> set[int]:
    """``0-3,8`` (sysfs' shared_cpu_list) -> {0, 1, 2, 3, 8}."""
    cpus = set()
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _last_level_cache(cpu_cache: str) -> tuple[int, frozenset[int], int] | None:
    """``(level, CPUs sharing it, bytes)`` of the highest-level data or unified cache in ``cpu_cache``
    (sysfs' ``cpuN/cache``: ``index*/{level,type,shared_cpu_list,size}``, size like ``32768K``), or None."""
    found = []
    for index in glob.glob(f"{cpu_cache}/index*"):
        try:
            with open(f"{index}/type") as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(f"{index}/level") as f:
                level = int(f.read())
            with open(f"{index}/shared_cpu_list") as f:
                shared = frozenset(_cpu_list(f.read()))
            with open(f"{index}/size") as f:
                text = f.read().strip()
            found.append((level, shared, int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]]))
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return max(found, key=lambda cache: cache[0], default=None)


def last_level_cache_bytes(default: int = 32 << 20, root: str = "/sys/devices/system/cpu",
                           cpus: set[int] | None = None) -> int:
    """The bytes of last-level cache this process can count on filling, from sysfs (``root``), else
    ``default``; ``cpus``: the CPUs it may run on (default ``os.sched_getaffinity``).

    Each last-level cache that one of ``cpus`` uses counts in proportion to the CPUs sharing it that the
    process may run on (an L3 shared by 8 cores, 2 of them ours: a quarter); the total is at most
    :data:`LLC_BYTES_PER_CPU` per CPU of ``cpus``, as a VM's sysfs may list only the guest's vCPUs as
    sharing the whole host package's L3. Caches it cannot run on do not count (an EPYC's L3 serves one
    CCX of 8 cores). On an otherwise idle host its threads could hold more of a shared cache; the bench
    takes the rest as serving the other CPUs. (``os.sysconf`` reports 256 MiB of L3 on the AMD VM the
    benchmarks ran on, sysfs and lscpu 32 MiB.)"""
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    caches = {_last_level_cache(f"{root}/cpu{cpu}/cache") for cpu in cpus} - {None}
    if not caches:
        return default
    top = max(level for level, _, _ in caches)  # a CPU whose sysfs lacks its L3 does not make L2 the last
    share = sum(size * len(shared & cpus) // len(shared) for level, shared, size in caches
                if level == top and shared)
    return min(share, LLC_BYTES_PER_CPU * len(cpus)) or default


_evict_buffer: list = []


def evict_caches() -> None:
    """Read a buffer of twice the last-level cache this process can use (``last_level_cache_bytes``; made
    once, at most :data:`MAX_EVICT_BYTES`), so the caches hold it and none of the operands of the call
    that follows. The read is numpy's single-threaded max, not a torch op: after a parallel torch op its
    OpenMP workers spin for a while, which favours whatever runs next on those workers over threads of
    its own (before losskit's kernels ran on torch's team, its cross_entropy 4096x32768 took 4-6 ms
    longer right after a torch sum, and not with OMP_WAIT_POLICY=PASSIVE)."""
    if not _evict_buffer:
        import numpy  # the bench extra's matplotlib requires it

        nbytes = min(2 * last_level_cache_bytes(), MAX_EVICT_BYTES)
        _evict_buffer.append(numpy.ones(nbytes // 4, dtype=numpy.float32))
    _evict_buffer[0].max()


def steady(impl: Impl) -> Impl:
    """``impl`` marked to be called once untimed before each timed call (by ``seconds``), so that the timed
    call's outputs reuse the memory of the untimed one's, as a training loop's steps reuse the previous
    step's (losskit keeps freed output mappings of one size for the next call, ``native.empty``). For
    losskit and its float32 twin in a bfloat16 unit: called alternately, each one's outputs (of the other
    size) unmapped the other's kept mappings, so every call faulted in fresh memory; softmax 1024x8192
    bfloat16 then took 5-30 ms a call against 5-8 ms without the twin."""
    def marked(inputs: Inputs) -> object:
        return impl(inputs)
    marked.steady = True  # type: ignore[attr-defined]
    if hasattr(impl, "own_inputs"):
        marked.own_inputs = impl.own_inputs  # type: ignore[attr-defined]
    return marked


def on_cuda(inputs: Inputs) -> bool:
    """Whether a call on ``inputs`` runs on the GPU: its tensors are CUDA tensors (the copy, which ignores its
    inputs, is timed with the unit's)."""
    return any(t.is_cuda for t in inputs.values())


def _reset_all(impl: Impl, inputs: Inputs) -> None:
    reset(inputs)
    reset(getattr(impl, "own_inputs", {}))


def _wall_seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cuda_seconds(fn: Callable[[], object]) -> float:
    """CUDA events around ``fn()``, once the work queued before it has finished: the GPU time of every kernel
    it launches and the gaps between them, a host synchronisation inside ``fn`` included."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def seconds(impl: Impl, inputs: Inputs) -> float:
    """Time of one forward+backward, its operands in memory (see the module's docstring). An
    implementation that calls on inputs of its own (an ``own_inputs`` attribute) has their gradients
    freed outside the timing too; one marked ``steady`` is first called once untimed."""
    _reset_all(impl, inputs)
    if getattr(impl, "steady", False):
        call(impl, inputs)  # untimed: see ``steady``
        _reset_all(impl, inputs)
    gc.collect()
    if on_cuda(inputs):
        elapsed = _cuda_seconds(lambda: call(impl, inputs))
    else:
        evict_caches()
        elapsed = _wall_seconds(lambda: call(impl, inputs))
    _reset_all(impl, inputs)
    return elapsed


def _cuda_peak_above(fn: Callable[[], object]) -> int:
    """Bytes of tensors the CUDA caching allocator hands out at most during ``fn()`` above those allocated
    when it starts (``torch.cuda.max_memory_allocated``: tensors, not the blocks the allocator keeps cached).
    The result of ``fn`` is dropped after the peak has been read."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def peak_bytes(impl: Impl, inputs: Inputs) -> int:
    """Peak bytes one forward+backward adds above the (already allocated) inputs, the output and the
    gradients counted: resident memory on CPU, allocated CUDA memory on the GPU."""
    _reset_all(impl, inputs)
    gc.collect()
    peak = (_cuda_peak_above if on_cuda(inputs) else peak_memory_above)(lambda: call(impl, inputs))
    _reset_all(impl, inputs)
    return peak


#: The budget never cuts the repetitions below this many (fewer only if fewer are asked for): the median
#: of one or two is not a median.
MIN_REPS = 3
#: The extra calls of the fast implementations (see ``calls_per_round``) take at most this share of a
#: round's time on top of it, and one implementation is called at most MAX_CALLS_PER_ROUND times a round.
EXTRA_SHARE = 0.5
MAX_CALLS_PER_ROUND = 5


def calls_per_round(first: dict[str, float]) -> dict[str, int]:
    """How many times a round calls each implementation, from its first time: once, plus as many more as
    fit in its share (EXTRA_SHARE / the number of implementations) of the first round's time, up to
    MAX_CALLS_PER_ROUND. The slow baselines (torch eager, torch.compile) keep one call a round; the fast
    ones (losskit, its float32 twin, the roofline's copy), whose ratios to each other are the verdicts
    nearest their thresholds, get up to five samples a round, so their medians are not those of the three
    to five rounds a slow baseline allows in the budget. On this VM one call of cross_entropy 4096x32768
    varied by up to 1.5x between rounds (bfloat16 38-58 ms, its float32 twin 47-77 ms)."""
    share = EXTRA_SHARE * sum(first.values()) / len(first)
    return {name: min(MAX_CALLS_PER_ROUND, 1 + int(share // t)) if t > 0 else MAX_CALLS_PER_ROUND
            for name, t in first.items()}


def round_robin(impls: dict[str, Impl], inputs: Inputs, reps: int, budget: float) -> tuple[dict[str, list[float]], int]:
    """Seconds of every timed call per implementation, and the number of rounds. A round calls every
    implementation once, starting one further along the list each time so none is always first, then
    makes the extra calls of ``calls_per_round`` (set by the first round), in turns through the
    implementations that have calls left, so the fast ones stay interleaved with each other. After the
    first, ``reps`` (rounds) is cut to what fits in ``budget`` seconds (0: no limit), the extra and the
    untimed (``steady``) calls counted, but not below ``MIN_REPS``."""
    names = list(impls)
    times: dict[str, list[float]] = {name: [] for name in names}
    calls = dict.fromkeys(names, 1)
    rep = 0
    while rep < reps:
        shift = rep % len(names)
        order = names[shift:] + names[:shift]
        for turn in range(max(calls.values())):
            for name in order:
                if turn < calls[name]:
                    times[name].append(seconds(impls[name], inputs))
        if rep == 0:
            calls = calls_per_round({name: ts[0] for name, ts in times.items()})
            if budget > 0:  # a steady implementation's untimed calls take time too
                cost = {name: ts[0] * calls[name] * (2 if getattr(impls[name], "steady", False) else 1)
                        for name, ts in times.items()}
                fits = int(budget // sum(cost.values()))
                reps = min(reps, max(MIN_REPS, fits))
        rep += 1
    return times, reps


def copy_of(nbytes: int, device: str = "cpu") -> Impl:
    """``dst.copy_(src)`` of float32 buffers on ``device`` holding ``nbytes`` in all (read ``nbytes / 2``,
    write as many), as an implementation (its inputs ignored); the buffers are faulted in first."""
    src = torch.ones(max(1, nbytes // 8), device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults, not bandwidth

    def copy(inputs: Inputs) -> None:
        dst.copy_(src)
    copy.src, copy.dst = src, dst  # type: ignore[attr-defined]
    return copy


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5, device: str = "cpu") -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write counted, ``nbytes`` each) on buffers well
    beyond any cache: CPU memory, or the GPU's HBM."""
    copy = copy_of(2 * nbytes, device)
    timer = _cuda_seconds if device == "cuda" else _wall_seconds
    return 2 * nbytes / statistics.median(timer(lambda: copy({})) for _ in range(reps))


#: Dtypes whose results are judged against a float64 truth in the dtype's eps, not a fixed tolerance.
LOW_PRECISION = (torch.bfloat16, torch.float16)


#: Elements compared at a time: a gradient of 1G elements (cross_entropy 8192x128256 on the GPU) would
#: otherwise take float64 temporaries of several times 8 GiB.
_PIECE = 1 << 26


def _pieces(t: Tensor) -> tuple[Tensor, ...]:
    return t.reshape(-1).split(_PIECE)


def disagreement(ours: list[Tensor], reference: list[Tensor], dtype: torch.dtype,
                 truth: list[Tensor] | None = None) -> str:
    """"" when ``ours`` agrees with ``reference`` (the reference's output and gradients in the same dtype),
    else what differs. float32/float64: within losskit.testing.TOLERANCES[dtype]. Low precision: with
    ``truth`` (the reference run in float64 on the same values), every result is within 2 eps of the
    dtype of it, normwise (a result computed in float32 and rounded once, with a margin for the rounded
    grad_output; the tests bound each loss tighter). Compared in pieces of ``_PIECE`` elements."""
    tol = TOLERANCES[dtype]
    errors = []
    for i, (a, b) in enumerate(zip(ours, reference)):
        if a.shape != b.shape:
            return f"differs: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if truth is not None:
            floor = torch.linalg.vector_norm(truth[i], float("inf")).item()  # max |truth|, no temporary
            try:
                for a_piece, t_piece in zip(_pieces(a), _pieces(truth[i])):
                    assert_within_eps(a_piece, t_piece, 2, floor=floor)
            except AssertionError as error:
                return f"differs from float64:{str(error).strip()}"
            continue
        b = b.to(a.dtype)
        if not all(torch.allclose(x, y, rtol=tol.rtol, atol=tol.atol, equal_nan=True)
                   for x, y in zip(_pieces(a), _pieces(b))):
            scale = b.abs().max().float().clamp_min(torch.finfo(torch.float32).tiny)
            errors.append(((a.float() - b.float()).abs().max() / scale).item())  # NaN when NaNs differ
    return f"differs: {max(errors, key=lambda e: (e == e, e)):.1e} rel." if errors else ""
