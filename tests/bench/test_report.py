"""The acceptance verdicts of ``losskit bench``: each target judged from the measured medians."""

import statistics

import pytest
import torch

from losskit.bench import verdicts
from losskit.bench._cases import BY_NAME, EAGER, FAMILY_TARGETS, LOSSKIT
from losskit.bench._run import COMPILED, ROOFLINE, Result, Unit


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


def test_bfloat16_judged_per_element_against_float32():
    size = (1024, 8192)
    f32 = _result("mse_loss", size, torch.float32, **{LOSSKIT: 10.0, EAGER: 20.0})
    bf16 = _result("mse_loss", size, torch.bfloat16, **{LOSSKIT: 12.0, EAGER: 30.0})
    (line,) = verdicts([f32, bf16])
    assert "1.20x the float32 time per element (target <= 1x: NOT met)" in line
    assert not verdicts([bf16])  # nothing to compare with
