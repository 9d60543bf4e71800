"""Exact normalisation in one process: gradient accumulation over micro-batches of uneven token counts.

The data-parallel half (several ranks, one all_reduce) is ``check_exact_normalisation`` in
``dist_rank_checks``, run on 2 and 3 processes by ``test_spawned_ranks``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import losskit.functional as LF
from losskit.distributed import global_mean, global_token_count
from losskit.testing import assert_close


def test_count_of_scored_tokens():
    a, b = torch.tensor([3, -100, 1]), torch.tensor([[0, 2], [-100, 7]])
    count = global_token_count([a, b])
    assert count.dtype == torch.float64 and count.dim() == 0
    assert count.item() == 5
    assert global_token_count(a).item() == 2


def test_count_with_ignore_index_and_weights():
    a, b = torch.tensor([3, 0, 1]), torch.tensor([[0, 2], [1, 0]])
    assert global_token_count([a, b], ignore_index=0).item() == 4
    weight = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])
    expected = sum(weight[t].sum() for t in (a, b)).item()
    assert global_token_count([a, b], weight=weight).item() == pytest.approx(expected, rel=1e-15)
    # The weighted count is torch's weighted-mean denominator:
    x = torch.randn(3, 5, dtype=torch.float64)
    assert_close(global_mean(F.cross_entropy(x, a, weight=weight.double(), reduction="sum"),
                             global_token_count(a, weight=weight)),
                 F.cross_entropy(x, a, weight=weight.double()))


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_any_split_gives_the_full_batch_loss_and_gradient(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(3, 5).double()
    xs = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in lengths]
    ts = [torch.randint(0, 5, (n,), generator=gen) for n in lengths]
    for t in ts:
        t[torch.rand(t.shape, generator=gen) < 0.4] = -100
    full = F.cross_entropy(model(torch.cat(xs)), torch.cat(ts))
    full_grads = torch.autograd.grad(full, list(model.parameters()))

    count = global_token_count(ts)
    total = torch.zeros((), dtype=torch.float64)
    model.zero_grad()
    for x, t in zip(xs, ts):
        loss = global_mean(LF.cross_entropy(model(x), t, reduction="sum"), count)
        loss.backward()
        total += loss.detach()
    assert_close(total, full.detach())  # every token ignored: NaN, and zero gradients, as torch
    for p, g in zip(model.parameters(), full_grads):
        assert_close(p.grad, g)


def test_averaging_micro_batch_means_is_wrong():
    # 3 scored tokens, then 1: the mean of means weighs the lone token like the other three together.
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0], [5.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0, 1, 0, 0, -100])
    pieces = [(x[:3], t[:3]), (x[3:], t[3:])]
    full = F.cross_entropy(x, t)
    naive = sum(F.cross_entropy(a, b) for a, b in pieces) / 2
    count = global_token_count([b for _, b in pieces])
    exact = sum(global_mean(LF.cross_entropy(a, b, reduction="sum"), count) for a, b in pieces)
    assert (naive - full).abs() > 0.5
    assert_close(exact, full)
    # A micro-batch with nothing to score makes the naive mean NaN; the exact one adds 0.
    assert torch.isnan(F.cross_entropy(x[4:], t[4:]))
    assert global_mean(LF.cross_entropy(x[4:], t[4:], reduction="sum"), count) == 0


def test_global_mean_keeps_the_dtype_and_divides_by_the_exact_count():
    loss = torch.tensor(1001.0, dtype=torch.bfloat16)  # bfloat16 rounds 1001 to 1000
    out = global_mean(loss, torch.tensor(1001.0, dtype=torch.float64))
    assert out.dtype == torch.bfloat16
    assert out.float().item() == pytest.approx(1.0, abs=1e-2)
    x = torch.randn(4, requires_grad=True)
    global_mean(x.sum(), torch.tensor(2.0, dtype=torch.float64)).backward()
    assert_close(x.grad, torch.full((4,), 0.5))


def test_bad_input():
    with pytest.raises(TypeError, match="target must be a tensor or a non-empty sequence of tensors"):
        global_token_count([])
    with pytest.raises(TypeError, match=r"target\[1\] must hold class indices"):
        global_token_count([torch.tensor([1]), torch.tensor([0.5])])
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        global_token_count([[1, 2]])
    with pytest.raises(ValueError, match="weight must be a 1-D tensor"):
        global_token_count(torch.tensor([1]), weight=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"target contains class index 3, outside \[0, 2\)"):
        global_token_count(torch.tensor([1, 3]), weight=torch.ones(2))
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        global_token_count(torch.tensor([1]), group=0)
    with pytest.raises(TypeError, match="loss_sum must have a floating-point dtype"):
        global_mean(torch.tensor(3), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"count must be a 0-dim tensor \(from global_token_count\), got shape \(2,\)"):
        global_mean(torch.tensor(3.0), torch.ones(2))


def test_nothing_scored_is_nan_with_a_zero_gradient_as_torch():
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    t = torch.tensor([-100, -100])
    ours = global_mean(LF.cross_entropy(x, t, reduction="sum"), global_token_count(t))
    ref = F.cross_entropy(x_ref, t)
    ours.backward()
    ref.backward()
    assert torch.isnan(ours) and torch.isnan(ref)
    assert_close(x.grad, x_ref.grad)
