"""Vocab-parallel losses in one process (no process group: the whole vocabulary is this rank's shard).

The same kernels run here as on many ranks, minus the collectives, so the math is tested in-process
against torch for every option (with hypothesis over shapes); ``test_spawned_ranks`` runs it on 2 and 3
gloo processes, and measures there that no rank holds the logits.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from losskit.distributed import _cross_entropy, vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from losskit.ops import blocks as kblocks
from losskit.testing import assert_close, assert_within_eps, gradcheck

REDUCTIONS = ("mean", "sum", "none")


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Several blocks per call, so that the block loops are exercised."""
    monkeypatch.setattr(kblocks, "BLOCK_BYTES", 256)
    monkeypatch.setattr(_cross_entropy, "LINEAR_BLOCK_BYTES", 256)


def _targets(shape, n_classes, ignore_index, gen):
    t = torch.randint(0, n_classes, shape, generator=gen)
    t[torch.rand(shape, generator=gen) < 0.3] = ignore_index
    return t


def _compare(ours_fn, ref_fn, xs, gen):
    """Values, then gradients of every tensor in ``xs`` for one random grad_output."""
    mine = [x.detach().clone().requires_grad_(x.requires_grad) for x in xs]
    ref = [x.detach().clone().requires_grad_(x.requires_grad) for x in xs]
    out, expected = ours_fn(*mine), ref_fn(*ref)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert_close(out, expected.detach())
    go = torch.randn(expected.shape, generator=gen, dtype=expected.dtype)
    out.backward(go)
    expected.backward(go)
    for a, b in zip(mine, ref):
        if a.requires_grad:
            assert_close(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(7, 5), (5,), (2, 5, 3, 2)])
def test_cross_entropy_matches_torch(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    n_classes = 5
    tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    for weighted, ls, reduction, ignore_index in itertools.product((False, True), (0.0, 0.3), REDUCTIONS, (-100, 2)):
        x = torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True)
        t = _targets(tshape, n_classes, ignore_index, gen) if tshape else torch.tensor(1)
        kw = dict(weight=torch.rand(n_classes, generator=gen, dtype=dtype) + 0.5 if weighted else None,
                  ignore_index=ignore_index, reduction=reduction, label_smoothing=ls)
        _compare(lambda x: vocab_parallel_cross_entropy(x, t, **kw), lambda x: F.cross_entropy(x, t, **kw), [x], gen)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 6), c=st.integers(1, 9), ls=st.sampled_from([0.0, 0.1, 1.0]),
       reduction=st.sampled_from(REDUCTIONS), weighted=st.booleans(), seed=st.integers(0, 2**16))
def test_cross_entropy_property(n, c, ls, reduction, weighted, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=gen, dtype=torch.float64) * 5).requires_grad_()
    t = _targets((n,), c, -100, gen)
    kw = dict(weight=torch.rand(c, generator=gen, dtype=torch.float64) if weighted else None, reduction=reduction,
              label_smoothing=ls)
    _compare(lambda x: vocab_parallel_cross_entropy(x, t, **kw), lambda x: F.cross_entropy(x, t, **kw), [x], gen)


def test_block_size_does_not_change_the_result(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 7, 3, generator=gen, dtype=torch.float64)
    t = _targets((9, 3), 7, -100, gen)
    results = []
    for budget in (8, 100, 1 << 20):  # one row per block, a few, everything in one block
        monkeypatch.setattr(kblocks, "BLOCK_BYTES", budget)
        xi = x.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(xi, t, label_smoothing=0.1)
        loss.backward()
        results.append((loss.detach(), xi.grad))
    for loss, grad in results[1:]:
        assert_close(loss, results[0][0])
        assert_close(grad, results[0][1])


def test_gradcheck():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    h = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 4, -100, 2])
    weight = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    assert gradcheck(lambda x: vocab_parallel_cross_entropy(x, t, weight=weight, label_smoothing=0.2), [x])
    for reduction in ("mean", "none"):  # precomputed gradients, and the recomputing backward
        assert gradcheck(lambda h, w, b: vocab_parallel_linear_cross_entropy(
            h, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.2), [h, w, b])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_eps_of_float64(dtype):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 40, generator=gen, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    t = _targets((16,), 40, -100, gen)
    truth_x = x.detach().double().requires_grad_()
    truth = F.cross_entropy(truth_x, t)
    truth.backward()
    ours = vocab_parallel_cross_entropy(x, t)
    ours.backward()
    assert ours.dtype == dtype
    # loss: a float32 mean of 16 rows' losses rounded once to dtype, 0.5 eps, bound 1. Gradient: p - y
    # over the rows counted, rounded once (grad_output is 1), 0.5 eps, bound 1; normwise, as p - y cancels.
    assert_within_eps(ours, truth, 1, msg="loss")
    assert_within_eps(x.grad, truth_x.grad, 1, floor=truth_x.grad.abs().max().item(), msg="d/dinput")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_matches_torch(dtype):
    gen = torch.Generator().manual_seed(4)
    for biased, weighted, ls, reduction in itertools.product((False, True), (False, True), (0.0, 0.2), ("mean", "sum")):
        h = torch.randn(2, 3, 4, generator=gen, dtype=dtype, requires_grad=True)
        w = torch.randn(6, 4, generator=gen, dtype=dtype, requires_grad=True)
        b = torch.randn(6, generator=gen, dtype=dtype, requires_grad=True)
        t = _targets((2, 3), 6, -100, gen)
        kw = dict(weight=torch.rand(6, generator=gen, dtype=dtype) + 0.5 if weighted else None, reduction=reduction,
                  label_smoothing=ls)
        if biased:
            _compare(lambda h, w, b: vocab_parallel_linear_cross_entropy(h, w, t, linear_bias=b, **kw),
                     lambda h, w, b: F.cross_entropy(F.linear(h, w, b).flatten(0, 1), t.flatten(), **kw),
                     [h, w, b], gen)
        else:
            _compare(lambda h, w: vocab_parallel_linear_cross_entropy(h, w, t, **kw),
                     lambda h, w: F.cross_entropy(F.linear(h, w).flatten(0, 1), t.flatten(), **kw), [h, w], gen)


def test_linear_none_reduction():
    # The input gradient is precomputed; with linear_weight/linear_bias requiring grad, backward recomputes.
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    t = _targets((2, 3), 6, -100, gen)
    kw = dict(reduction="none", label_smoothing=0.1, weight=torch.rand(6, generator=gen, dtype=torch.float64))
    _compare(lambda h: vocab_parallel_linear_cross_entropy(h, w.detach(), t, **kw),
             lambda h: F.cross_entropy((h @ w.detach().t()).permute(0, 2, 1), t, **kw), [h], gen)
    _compare(lambda h, w, b: vocab_parallel_linear_cross_entropy(h, w, t, linear_bias=b, **kw),
             lambda h, w, b: F.cross_entropy(F.linear(h, w, b).permute(0, 2, 1), t, **kw), [h, w, b], gen)
    _compare(lambda w: vocab_parallel_linear_cross_entropy(h.detach(), w, t, **kw),
             lambda w: F.cross_entropy((h.detach() @ w.t()).permute(0, 2, 1), t, **kw), [w], gen)
    # The recomputing backward can run twice (retain_graph) and gives the same gradient.
    loss = vocab_parallel_linear_cross_entropy(h.detach(), w, t, **kw).sum()
    first = torch.autograd.grad(loss, w, retain_graph=True)[0]
    assert_close(torch.autograd.grad(loss, w)[0], first)


def test_identities():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    t = _targets((8,), 5, -100, gen)
    # sum == none.sum(); all-ones weights == no weights; ignored rows == dropped rows
    assert_close(vocab_parallel_cross_entropy(x, t, reduction="sum"),
                 vocab_parallel_cross_entropy(x, t, reduction="none").sum())
    assert_close(vocab_parallel_cross_entropy(x, t, weight=torch.ones(5, dtype=torch.float64)),
                 vocab_parallel_cross_entropy(x, t))
    kept = t != -100
    assert_close(vocab_parallel_cross_entropy(x, t), vocab_parallel_cross_entropy(x[kept], t[kept]))
    # the fused head equals the loss of its logits
    h, w = torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    assert_close(vocab_parallel_linear_cross_entropy(h, w, t), vocab_parallel_cross_entropy(h @ w.t(), t))


def test_masked_rows_and_large_logits():
    x = torch.tensor([[1000.0, -torch.inf, 999.0], [-torch.inf, -torch.inf, 3.0]], requires_grad=True)
    t = torch.tensor([0, 2])
    x_ref = x.detach().clone().requires_grad_()
    ours, ref = vocab_parallel_cross_entropy(x, t), F.cross_entropy(x_ref, t)
    ours.backward()
    ref.backward()
    assert_close(ours, ref.detach())
    assert_close(x.grad, x_ref.grad)


def test_input_is_never_modified():
    x = torch.randn(5, 4).t()  # non-contiguous (4, 5)
    x.requires_grad_()
    before = x.detach().clone()
    vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 2, 3]), label_smoothing=0.5).backward()
    assert torch.equal(x.detach(), before)


def test_without_process_group_no_collective_runs(monkeypatch):
    assert not dist.is_initialized()

    def refuse(*args, **kwargs):
        raise AssertionError("a collective ran in a single process")
    for name in ("all_reduce", "all_gather", "all_gather_object"):
        monkeypatch.setattr(dist, name, refuse)
    x, t = torch.randn(3, 4), torch.tensor([1, 0, 3])
    assert_close(vocab_parallel_cross_entropy(x, t), F.cross_entropy(x, t))
    w = torch.randn(5, 4)
    assert_close(vocab_parallel_linear_cross_entropy(x, w, t), F.cross_entropy(x @ w.t(), t))


def test_bad_input():
    x, t = torch.randn(3, 4), torch.tensor([1, 0, 3])
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup or None, got str"):
        vocab_parallel_cross_entropy(x, t, group="world")
    with pytest.raises(ValueError, match=r"vocab_size is 5 but the vocabulary shards hold 4 classes"):
        vocab_parallel_cross_entropy(x, t, vocab_size=5)
    with pytest.raises(ValueError, match=r"vocab_size must be a positive number of classes, got 0"):
        vocab_parallel_cross_entropy(x, t, vocab_size=0)
    with pytest.raises(ValueError, match=r"target contains class index 4, outside \[0, 4\)"):
        vocab_parallel_cross_entropy(x, torch.tensor([1, 4, 0]))
    with pytest.raises(ValueError, match=r"target contains class index -1"):
        vocab_parallel_cross_entropy(x, torch.tensor([1, -1, 0]))
    with pytest.raises(TypeError, match="target must hold class indices"):
        vocab_parallel_cross_entropy(x, torch.rand(3, 4))  # probability targets are not supported
    with pytest.raises(ValueError, match=r"weight has 3 entries, one per class of the whole vocabulary, but the "
                                         r"vocabulary shards hold 4 classes"):
        vocab_parallel_cross_entropy(x, t, weight=torch.ones(3))
    with pytest.raises(ValueError, match="weight must be a 1-D tensor with one entry per class of the whole"):
        vocab_parallel_cross_entropy(x, t, weight=torch.ones(2, 2))
    with pytest.raises(ValueError, match="weight requires grad"):
        vocab_parallel_cross_entropy(x, t, weight=torch.ones(4, requires_grad=True))
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        vocab_parallel_cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        vocab_parallel_cross_entropy(x, t, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        vocab_parallel_cross_entropy(x, t, ignore_index=1.0)
    with pytest.raises(ValueError, match=r"linear_weight must have shape \(V_r, D\) with V_r >= 1 and D = 4"):
        vocab_parallel_linear_cross_entropy(x, torch.randn(5, 3), t)
    with pytest.raises(TypeError, match="linear_weight must have input's dtype"):
        vocab_parallel_linear_cross_entropy(x, torch.randn(5, 4, dtype=torch.float64), t)
    with pytest.raises(ValueError, match=r"linear_bias must have shape \(5,\)"):
        vocab_parallel_linear_cross_entropy(x, torch.randn(5, 4), t, linear_bias=torch.randn(4))
    with pytest.raises(ValueError, match=r"target must have shape \(3,\) for input of shape \(3, 4\)"):
        vocab_parallel_linear_cross_entropy(x, torch.randn(5, 4), t[:2])

