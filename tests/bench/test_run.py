"""The benchmark's unit of work in-process, on doctored cases: how it reports what goes wrong."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from losskit.bench import BY_NAME, Unit, table
from losskit.bench import _measure
from losskit.bench._measure import MIN_REPS, last_level_cache_bytes, round_robin
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
    assert result.grad_bytes == 8 * 16 * 4


@pytest.mark.parametrize("reps, budget, expected", [
    (5, 0, 5),  # no budget: every repetition asked for
    (5, 1e-12, MIN_REPS),  # a budget no round fits in cuts down to the floor, not below
    (2, 1e-12, 2),  # fewer than the floor when fewer are asked for
    (5, 1e12, 5),  # a budget never adds repetitions
])
def test_the_budget_cuts_repetitions_down_to_a_floor(reps, budget, expected):
    calls = []
    medians, done = round_robin({"a": lambda inputs: calls.append("a"), "b": lambda inputs: calls.append("b")},
                                {}, reps, budget)
    assert done == expected and len(calls) == 2 * expected and set(medians) == {"a", "b"}


def test_the_roofline_uses_the_bandwidth_of_a_copy_timed_in_the_same_rounds(monkeypatch):
    asked, timed = [], []

    def fake_copy(nbytes):
        asked.append(nbytes)
        return "the copy"

    def fake_round_robin(impls, inputs, reps, budget):
        timed.append(impls[ROOFLINE])
        return {**{name: 0.001 for name in impls}, ROOFLINE: 0.04}, reps
    monkeypatch.setattr(_run, "_copy_of", fake_copy)
    monkeypatch.setattr(_run, "round_robin", fake_round_robin)
    result = measure()
    assert asked == [2 * _run.COPY_BYTES] and timed == ["the copy"]
    # read the (8, 16) float32 input and the 8 int64 targets, write the (8, 16) float32 gradient, at
    # 2 * COPY_BYTES per 0.04 s (not at the 1 GB/s passed in as the start's bandwidth)
    moved = 8 * 16 * 4 + 8 * 8 + 8 * 16 * 4
    assert result.ms[ROOFLINE] == pytest.approx(moved / (2 * _run.COPY_BYTES / 0.04) * 1e3)


def test_without_memory_for_the_copy_the_roofline_uses_the_start_bandwidth(monkeypatch):
    def no_memory(nbytes):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(_run, "_copy_of", no_memory)
    assert measure().ms[ROOFLINE] == pytest.approx((8 * 16 * 4 * 2 + 8 * 8) / 1e9 * 1e3)


def test_the_copy_reads_half_the_bytes_and_writes_the_other_half():
    copy = _run._copy_of(4096)
    copy.dst.zero_()
    copy({})
    assert copy.src.nbytes == copy.dst.nbytes == 2048 and torch.equal(copy.dst, copy.src)


def test_every_timed_call_follows_a_cache_eviction(monkeypatch):
    events = []
    monkeypatch.setattr(_measure, "evict_caches", lambda: events.append("evict"))
    round_robin({"a": lambda inputs: events.append("a"), "b": lambda inputs: events.append("b")}, {}, 2, 0)
    assert events == ["evict", "a", "evict", "b", "evict", "b", "evict", "a"]


def test_the_eviction_buffer_is_sized_from_the_largest_cache_sysfs_reports(tmp_path):
    for index, size in (("index0", "32K"), ("index2", "512K"), ("index3", "32768K"), ("index4", "garbled")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert last_level_cache_bytes(root=str(tmp_path)) == 32 << 20
    assert last_level_cache_bytes(default=123, root=str(tmp_path / "missing")) == 123


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
    assert "no worse than torch vs float64" in table([measure(torch.bfloat16)])
    # 5% off is far beyond bfloat16's own error of a cross-entropy of 16 classes
    off = measure(torch.bfloat16, losskit=lambda module: lambda i: F.cross_entropy(i["input"], i["target"]) * 1.05)
    assert off.check.startswith("differs from float64")
