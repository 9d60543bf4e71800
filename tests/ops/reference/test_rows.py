"""The reference row kernel itself: ``xent_rows_``'s loss and in-place gradient against autograd of the
expression in its docstring, in float64, for every combination of its options (the functionals reach
only some: focal_loss never smooths, cross_entropy has no focal term)."""

from __future__ import annotations

import itertools

import pytest
import torch

from losskit.ops.reference.rows import RowSpec, xent_rows_
from losskit.testing import assert_close


def _expression(x, y, w, ignore_index, ls, gamma, z_loss):
    """The docstring's per-row loss: (1 - ls) w_y (-logp_y) (focal: w_y q^gamma (-logp_y)) + ls / C *
    sum_c w_c (-logp_c) + z_loss * lse^2, 0 for ignored rows."""
    keep = y != ignore_index
    safe = y.masked_fill(~keep, 0)
    logp = x.log_softmax(1)
    logp_y = logp.gather(1, safe[:, None])[:, 0]
    w_y = w[safe] * keep
    main = -w_y * (-torch.expm1(logp_y)) ** gamma * logp_y if gamma else -(1 - ls) * w_y * logp_y
    smooth = (ls / x.shape[1]) * -(logp * w).sum(1) * keep
    return main + smooth + z_loss * torch.logsumexp(x, 1) ** 2 * keep


@pytest.mark.parametrize("ls, gamma, z_loss", list(itertools.product((0.0, 0.1), (0.0, 2.0), (0.0, 1e-3))))
def test_row_gradient_is_the_expressions(ls, gamma, z_loss):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 11, dtype=torch.float64, generator=g) * 3
    y = torch.randint(0, 11, (7,), generator=g)
    y[3] = -100
    w = torch.rand(11, dtype=torch.float64, generator=g) + 0.5
    scale = 0.25
    xr = x.clone().requires_grad_()
    truth = _expression(xr, y, w, -100, ls, gamma, z_loss)
    (truth.sum() * scale).backward()
    work = x.clone()
    res = xent_rows_(work, y, RowSpec(weight=w, label_smoothing=ls, gamma=gamma, z_loss=z_loss), scale, True)
    assert_close(res.loss, truth.detach())
    assert_close(work, xr.grad)
