"""The acceptance verdicts of ``losskit bench``: each target judged from the measured medians."""

import statistics

import pytest
import torch

from losskit.bench import verdicts
from losskit.bench._cases import BY_NAME, EAGER, FAMILY_TARGETS, LOSSKIT
from losskit.bench._run import COMPILED, LOSSKIT_FLOAT32, ROOFLINE, Result, Unit, run_unit


def _result(name, size, dtype, **ms):
    return Result(Unit(BY_NAME[name], size, dtype), ms=ms, peak={}, grad_bytes=1)


@pytest.mark.parametrize("ours, met", [(100.0, True), (200.0, False)])
def test_cross_entropy_target_judges_eager_compile_and_roofline(ours, met):
    # target: >= 6x eager, >= 3x torch.compile, <= 1.5x the roofline
    r = _result("cross_entropy", (4096, 32768), torch.float32,
                **{LOSSKIT: ours, EAGER: 650.0, COMPILED: 450.0, ROOFLINE: 70.0})
    (line,) = verdicts([r])
    verdict = "met" if met else "NOT met"
    assert f"{650 / ours:.2f}x faster than torch eager (target >= 6x: {verdict})" in line
    assert f"{450 / ours:.2f}x faster than torch.compile (target >= 3x: {verdict})" in line
    assert f"{ours / 70:.2f}x the roofline (target <= 1.5x: {verdict})" in line


def test_compile_part_only_when_measured():
    r = _result("cross_entropy", (4096, 32768), torch.float32, **{LOSSKIT: 100.0, EAGER: 650.0, ROOFLINE: 70.0})
    (line,) = verdicts([r])
    assert "torch.compile" not in line and "roofline" in line


@pytest.mark.parametrize("speedups", [[1.5, 3.0, 2.0, 4.0, 1.2, 0.9], [2.5, 3.0, 2.0, 4.0, 1.8, 1.9]])
def test_family_geometric_mean_over_all_its_cases(speedups):
    family = FAMILY_TARGETS[0]
    results = [_result(name, family.size, family.dtype, **{LOSSKIT: 10.0, EAGER: 10.0 * s})
               for name, s in zip(family.cases, speedups)]
    (line,) = [x for x in verdicts(results) if "family" in x]
    geomean = statistics.geometric_mean(speedups)
    expected = "met" if geomean >= family.min_geomean else "NOT met"
    assert f"geometric mean {geomean:.2f}x faster than torch eager (target >= 2x: {expected})" in line
    assert not [x for x in verdicts(results[1:]) if "family" in x]  # a case missing: no verdict


@pytest.mark.parametrize("twin_ms, met", [(10.0, False), (15.0, True)])
def test_bfloat16_judged_per_element_against_its_interleaved_float32_twin(twin_ms, met):
    # the ratio comes from the bfloat16 unit's own float32 twin (timed interleaved), not from the float32
    # unit of the same case, which ran at another time (its 5 ms would say met)
    size = (1024, 8192)
    f32 = _result("mse_loss", size, torch.float32, **{LOSSKIT: 5.0, EAGER: 20.0})
    bf16 = _result("mse_loss", size, torch.bfloat16, **{LOSSKIT: 12.0, EAGER: 30.0, LOSSKIT_FLOAT32: twin_ms})
    (line,) = verdicts([f32, bf16])
    assert f"{12 / twin_ms:.2f}x the float32 time per element (target <= 1x: {'met' if met else 'NOT met'})" in line
    assert verdicts([bf16]) == [line]  # the float32 unit is not needed
    assert not verdicts([_result("mse_loss", size, torch.bfloat16, **{LOSSKIT: 12.0, EAGER: 30.0})])


def test_a_bfloat16_unit_times_its_float32_twin():
    # run_unit adds losskit on float32 inputs of the same case and size to a bfloat16 unit's timed rounds
    unit = Unit(BY_NAME["mse_loss"], (8, 16), torch.bfloat16)
    r = run_unit(unit, reps=3, budget=0, compile_reference=False, bandwidth=1e10, probe=None, phase=lambda p: None)
    assert LOSSKIT_FLOAT32 in r.ms and r.ms[LOSSKIT_FLOAT32] > 0 and r.reps == 3
    r32 = run_unit(Unit(BY_NAME["mse_loss"], (8, 16), torch.float32), reps=3, budget=0, compile_reference=False,
                   bandwidth=1e10, probe=None, phase=lambda p: None)
    assert LOSSKIT_FLOAT32 not in r32.ms
