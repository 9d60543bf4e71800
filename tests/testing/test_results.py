"""The shared test helpers of losskit.testing: a loss's results for one backward, their comparison,
and peak memory measured in a child process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losskit.testing import assert_matches_reference, assert_same_results, loss_and_grads, measure_peaks_in_child


def test_loss_and_grads_on_fresh_leaves_with_a_random_grad_output():
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    loss, dx, dt = loss_and_grads(F.mse_loss, x, t, reduction="none")
    assert x.grad is None and not x.requires_grad  # the caller's tensors are untouched
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(loss, (x - t) ** 2)
    torch.testing.assert_close(dx, 2 * (x - t) * g)
    torch.testing.assert_close(dt, -2 * (x - t) * g)
    assert loss_and_grads(F.mse_loss, x, t, target_requires_grad=False)[2] is None
    index = torch.tensor([0, 3, 1])
    assert loss_and_grads(F.cross_entropy, x, index, grad_output=torch.tensor(1.0, dtype=torch.float64))[2] is None


def test_assert_same_results_checks_none_dtype_shape_and_values():
    a = torch.ones(2, dtype=torch.float64)
    assert_same_results((a, None), (a.clone(), None))
    for other, message in (((None, None), "loss: a tensor, expected None"), ((a.float(), None), "loss: torch.float64"),
                           ((a[:1], None), "loss"), ((a + 1, None), "loss"), ((a, a), "d/dinput: None")):
        with pytest.raises(AssertionError, match=message):
            assert_same_results((a, None), other)


def test_assert_matches_reference_catches_a_wrong_gradient():
    x, t = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    assert_matches_reference(F.mse_loss, lambda a, b: ((a - b) ** 2).mean(), x, t)
    with pytest.raises(AssertionError, match="d/dinput"):
        assert_matches_reference(F.mse_loss, lambda a, b: ((a - b) ** 2).mean().detach() + 0 * a.sum(), x, t)


def test_measure_peaks_in_child():
    peaks = measure_peaks_in_child("""
        import torch
        calls = {"none": lambda: None, "16 MiB": lambda: torch.ones(1 << 22)}
    """)
    assert set(peaks) == {"none", "16 MiB"}
    assert peaks["16 MiB"] >= 4 << 22 > peaks["none"]
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        measure_peaks_in_child("calls = {'x': lambda: 1 / 0}")
