"""The benchmark's unit of work in-process, on doctored cases: how it reports what goes wrong."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from losskit.bench import BY_NAME, Unit, table
from losskit.bench import _measure
from losskit.bench._measure import MAX_CALLS_PER_ROUND, MIN_REPS, calls_per_round, last_level_cache_bytes, round_robin
from losskit.bench import _run
from losskit.bench._run import ROOFLINE, run_unit


def measure(dtype=torch.float32, **changes):
    case = dataclasses.replace(BY_NAME["cross_entropy"], **changes)
    return run_unit(Unit(case, (8, 16), dtype), reps=2, budget=0, compile_reference=False, bandwidth=1e9,
                    probe=None, phase=lambda phase: None)


def test_measures_every_implementation_and_the_roofline():
    result = measure()
    assert set(result.ms) == {"losskit", "torch eager", ROOFLINE}
    assert result.reps == 2 and result.check == "" and result.error == ""
    assert set(result.calls) == set(result.ms) and all(2 <= n <= 2 * MAX_CALLS_PER_ROUND for n in result.calls.values())
    assert result.grad_bytes == 8 * 16 * 4


@pytest.mark.parametrize("reps, budget, expected", [
    (5, 0, 5),  # no budget: every repetition asked for
    (5, 1e-12, MIN_REPS),  # a budget no round fits in cuts down to the floor, not below
    (2, 1e-12, 2),  # fewer than the floor when fewer are asked for
    (5, 1e12, 5),  # a budget never adds repetitions
])
def test_the_budget_cuts_repetitions_down_to_a_floor(reps, budget, expected, monkeypatch):
    monkeypatch.setattr(_measure, "calls_per_round", lambda first: dict.fromkeys(first, 1))
    calls = []
    times, done = round_robin({"a": lambda inputs: calls.append("a"), "b": lambda inputs: calls.append("b")},
                              {}, reps, budget)
    assert done == expected and len(calls) == 2 * expected and {k: len(v) for k, v in times.items()} == {
        "a": expected, "b": expected}


def test_the_budget_counts_the_extra_calls(monkeypatch):
    # every call "takes" 1 s; with 3 calls of a and 1 of b a round takes 4 s: 9 s fit 2 rounds, not 4
    monkeypatch.setattr(_measure, "seconds", lambda impl, inputs: 1.0)
    monkeypatch.setattr(_measure, "calls_per_round", lambda first: {"a": 3, "b": 1})
    monkeypatch.setattr(_measure, "MIN_REPS", 1)
    times, done = round_robin({"a": None, "b": None}, {}, 10, 9)
    assert done == 2 and len(times["a"]) == 1 + 3 and len(times["b"]) == 2
    # b steady: its untimed call before each timed one counts too (3 + 2 = 5 s a round: 9 s fit 1, floor 1)
    times, done = round_robin({"a": None, "b": _measure.steady(None)}, {}, 10, 9)
    assert done == 1 and len(times["b"]) == 1


@pytest.mark.parametrize("first, expected", [
    # shares of half the round's 1.4 s over 4: 0.175 s each; 0.175 // 0.05 = 3 more calls for a 50 ms call
    ({"eager": 0.7, "compile": 0.5, "losskit": 0.05, "copy": 0.15}, {"eager": 1, "compile": 1, "losskit": 4, "copy": 2}),
    # never more than MAX_CALLS_PER_ROUND, even for a call too fast to time
    ({"slow": 1.0, "fast": 1e-6, "instant": 0.0}, {"slow": 1, "fast": MAX_CALLS_PER_ROUND,
                                                    "instant": MAX_CALLS_PER_ROUND}),
    # equal times: half a round's worth of extras spread over all is less than one more call each
    ({"a": 1.0, "b": 1.0}, {"a": 1, "b": 1}),
])
def test_fast_implementations_get_more_calls_a_round(first, expected):
    assert calls_per_round(first) == expected


def test_extra_calls_take_turns_after_the_round(monkeypatch):
    monkeypatch.setattr(_measure, "calls_per_round", lambda first: {"slow": 1, "f1": 3, "f2": 2})
    events = []
    impls = {name: (lambda inputs, name=name: events.append(name)) for name in ("slow", "f1", "f2")}
    round_robin(impls, {}, 2, 0)
    # round 1 calls each once (then learns the counts); round 2 starts one further along, then the
    # extra calls go round the implementations that have calls left
    assert events == ["slow", "f1", "f2", "f1", "f2", "slow", "f1", "f2", "f1"]


def test_the_roofline_uses_the_bandwidth_of_a_copy_timed_in_the_same_rounds(monkeypatch):
    asked, timed = [], []

    def fake_copy(nbytes, device):
        asked.append((nbytes, device))
        return "the copy"

    def fake_round_robin(impls, inputs, reps, budget):
        timed.append(impls[ROOFLINE])
        return {**{name: [0.001] * reps for name in impls}, ROOFLINE: [0.05, 0.04, 0.01]}, reps
    monkeypatch.setattr(_run, "copy_of", fake_copy)
    monkeypatch.setattr(_run, "round_robin", fake_round_robin)
    result = measure()
    assert asked == [(2 * _run.COPY_BYTES, "cpu")] and timed == ["the copy"]
    # read the (8, 16) float32 input and the 8 int64 targets, write the (8, 16) float32 gradient, at
    # 2 * COPY_BYTES per 0.04 s, the copy's median (not at the 1 GB/s passed in as the start's bandwidth)
    moved = 8 * 16 * 4 + 8 * 8 + 8 * 16 * 4
    assert result.ms[ROOFLINE] == pytest.approx(moved / (2 * _run.COPY_BYTES / 0.04) * 1e3)


def test_without_memory_for_the_copy_the_roofline_uses_the_start_bandwidth(monkeypatch):
    def no_memory(nbytes, device):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(_run, "copy_of", no_memory)
    assert measure().ms[ROOFLINE] == pytest.approx((8 * 16 * 4 * 2 + 8 * 8) / 1e9 * 1e3)


def test_the_copy_reads_half_the_bytes_and_writes_the_other_half():
    copy = _run.copy_of(4096)
    copy.dst.zero_()
    copy({})
    assert copy.src.nbytes == copy.dst.nbytes == 2048 and torch.equal(copy.dst, copy.src)


def test_every_timed_call_follows_a_cache_eviction(monkeypatch):
    events = []
    monkeypatch.setattr(_measure, "evict_caches", lambda: events.append("evict"))
    monkeypatch.setattr(_measure, "calls_per_round", lambda first: dict.fromkeys(first, 1))
    round_robin({"a": lambda inputs: events.append("a"), "b": lambda inputs: events.append("b")}, {}, 2, 0)
    assert events == ["evict", "a", "evict", "b", "evict", "b", "evict", "a"]


def test_a_steady_implementation_is_called_untimed_first(monkeypatch):
    # losskit and its float32 twin alternate in a bfloat16 unit: each timed call follows an untimed call
    # of the same implementation, whose freed outputs it reuses
    events = []
    monkeypatch.setattr(_measure, "evict_caches", lambda: events.append("evict"))
    monkeypatch.setattr(_measure, "calls_per_round", lambda first: dict.fromkeys(first, 1))
    impls = {"a": _measure.steady(lambda inputs: events.append("a")), "b": lambda inputs: events.append("b")}
    round_robin(impls, {}, 2, 0)
    assert events == ["a", "evict", "a", "evict", "b", "evict", "b", "a", "evict", "a"]


def test_a_bfloat16_unit_times_losskit_and_its_twin_steady(monkeypatch):
    timed = []

    def fake_round_robin(impls, inputs, reps, budget):
        timed.append({name: getattr(impl, "steady", False) for name, impl in impls.items()})
        return {name: [0.001] * reps for name in impls}, reps
    monkeypatch.setattr(_run, "round_robin", fake_round_robin)
    measure(torch.bfloat16)
    measure(torch.float32)
    assert timed == [{"losskit": True, "torch eager": False, _run.LOSSKIT_FLOAT32: True, ROOFLINE: False},
                     {"losskit": False, "torch eager": False, ROOFLINE: False}]


def _fake_sysfs(root, caches):
    """cpuN/cache/indexI/{level,type,size,shared_cpu_list} under ``root``, from ``{cpu: [(level, type, size,
    shared_cpu_list), ...]}``."""
    for cpu, indexes in caches.items():
        for i, fields in enumerate(indexes):
            index = root / f"cpu{cpu}" / "cache" / f"index{i}"
            index.mkdir(parents=True)
            for name, value in zip(("level", "type", "size", "shared_cpu_list"), fields):
                (index / name).write_text(f"{value}\n")
    return str(root)


def _epyc_cores(cpus, l3_shared):
    """Zen cores: private 32K L1d/L1i and 1 MiB L2, a 32 MiB L3 shared by ``l3_shared``."""
    return {cpu: [(1, "Data", "32K", cpu), (1, "Instruction", "32K", cpu), (2, "Unified", "1024K", cpu),
                  (3, "Unified", "32768K", l3_shared)] for cpu in cpus}


def test_the_eviction_counts_the_last_level_cache_the_process_can_use(tmp_path):
    mib = 1 << 20
    # The VM the benchmarks ran on: 2 vCPUs sharing a 32 MiB L3 (an L1i larger than it would not count)
    vm = _fake_sysfs(tmp_path / "vm", _epyc_cores((0, 1), "0-1"))
    assert last_level_cache_bytes(root=vm, cpus={0, 1}) == 32 * mib
    assert last_level_cache_bytes(root=vm, cpus={1}) == 16 * mib  # one of the two CPUs sharing it
    # Two CCXs of 4 cores: each L3 counts for the CPUs of it the process may run on (3 and 1 of 4)
    ccx = _fake_sysfs(tmp_path / "ccx", {**_epyc_cores(range(4), "0-3"), **_epyc_cores(range(4, 8), "4-7")})
    assert last_level_cache_bytes(root=ccx, cpus={1, 2, 3, 6}) == 24 * mib + 8 * mib
    assert last_level_cache_bytes(root=ccx, cpus={4}) == 8 * mib
    # An Intel VM: its 2 vCPUs "share" the host package's 480 MiB L3; at most 16 MiB a CPU counts
    intel = _fake_sysfs(tmp_path / "intel", {cpu: [(1, "Data", "48K", cpu), (2, "Unified", "2048K", cpu),
                                                   (3, "Unified", "491520K", "0-1")] for cpu in (0, 1)})
    assert last_level_cache_bytes(root=intel, cpus={0, 1}) == 2 * _measure.LLC_BYTES_PER_CPU == 32 * mib
    # Unreadable sizes are skipped; nothing readable, or no sysfs at all: the default
    garbled = _fake_sysfs(tmp_path / "garbled", {0: [(2, "Unified", "1024K", "0"), (3, "Unified", "lots", "0")]})
    assert last_level_cache_bytes(root=garbled, cpus={0}) == 1 * mib
    assert last_level_cache_bytes(default=123, root=str(tmp_path / "missing"), cpus={0, 1}) == 123


def test_the_eviction_buffer_is_twice_the_cache_up_to_a_cap(monkeypatch):
    for cache, expected in ((3 << 20, 6 << 20), (5 << 20, 8 << 20)):
        monkeypatch.setattr(_measure, "_evict_buffer", [])
        monkeypatch.setattr(_measure, "MAX_EVICT_BYTES", 8 << 20)
        monkeypatch.setattr(_measure, "last_level_cache_bytes", lambda: cache)
        _measure.evict_caches()
        assert _measure._evict_buffer[0].nbytes == expected
        buffer = _measure._evict_buffer[0]
        _measure.evict_caches()  # made once
        assert _measure._evict_buffer == [buffer]


def test_a_raising_baseline_is_reported_and_left_out():
    result = measure(baselines={"broken": lambda inputs: 1 / 0})
    assert result.failed == {"broken": "ZeroDivisionError: division by zero"}
    assert "broken" not in result.ms
    assert "raised ZeroDivisionError" in table([result])


@pytest.mark.parametrize("changes, message", [
    ({"function": "no_such_loss"}, "unavailable: losskit.functional.no_such_loss"),
    ({"losskit": lambda module: lambda inputs: 1 / 0}, "losskit raised ZeroDivisionError"),
])
def test_a_unit_that_cannot_run_says_why(changes, message):
    result = measure(**changes)
    assert result.error.startswith(message) and not result.ms
    assert message in table([result])


def test_a_wrong_losskit_result_is_flagged():
    result = measure(losskit=lambda module: lambda i: F.cross_entropy(i["input"], i["target"]) * 1.01)
    assert result.check.startswith("differs")
    assert "differs" in table([result])


def test_low_precision_is_judged_against_float64():
    assert measure(torch.bfloat16).check == ""
    assert "within 2 eps of float64" in table([measure(torch.bfloat16)])
    # 5% off is far beyond bfloat16's own error of a cross-entropy of 16 classes
    off = measure(torch.bfloat16, losskit=lambda module: lambda i: F.cross_entropy(i["input"], i["target"]) * 1.05)
    assert off.check.startswith("differs from float64")
