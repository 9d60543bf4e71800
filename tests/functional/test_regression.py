"""mse_loss against torch.nn.functional.mse_loss (torch 2.13, weighted included); rmse_loss against its
float64 formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import losskit.functional as LF
import losskit.ops.reference.elementwise as elementwise
from losskit.testing import (assert_close, assert_matches_reference, assert_same_results, assert_within_eps,
                             gradcheck, loss_and_grads)

REDUCTIONS = ["none", "mean", "sum"]
SHAPES = [(), (5,), (4, 7), (2, 3, 5)]


def rmse_reference(input, target, weight=None):
    """float64 formula: sqrt(sum(w (x - y)^2) / sum(w)), w = 1 when None."""
    d2 = (input.double() - target.double()) ** 2
    if weight is None:
        return d2.mean().sqrt()
    w = weight.double()
    return ((w * d2).sum() / w.sum()).sqrt()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pair(shape, dtype=torch.float64, seed=0):
    g = _gen(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype), (x + torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _weight(shape, dtype=torch.float64, seed=1):
    return (0.5 + torch.rand(shape, generator=_gen(seed), dtype=torch.float64)).to(dtype)


def _grad_output(shape, dtype, seed=5):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


# --- mse_loss ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_matches_torch(dtype, shape, reduction, weighted):
    x, t = _pair(shape, dtype)
    w = _weight(shape, dtype) if weighted else None
    assert_matches_reference(LF.mse_loss, F.mse_loss, x, t, reduction=reduction, weight=w)


def test_mse_integer_target_and_mixed_dtypes_like_torch():
    x, t = _pair((3, 4), torch.float32)
    ti = t.round().long()
    ours = LF.mse_loss(x.requires_grad_(), ti)
    ref = F.mse_loss(x, ti)
    assert ours.dtype == ref.dtype
    assert_close(ours, ref)
    assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0])
    assert_matches_reference(LF.mse_loss, F.mse_loss, x, t.double())
    # torch squares the float32 residual before promoting to the float64 weight; losskit computes in the
    # promoted float64, so the two agree to float32's tolerance.
    w64 = _weight((3, 4))
    assert_matches_reference(LF.mse_loss, F.mse_loss, x, t, weight=w64, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_low_precision_within_eps_of_float64(dtype, reduction, weighted):
    x, t = (v.to(dtype) for v in _pair((32, 17)))
    w = _weight((32, 17), dtype) if weighted else None
    go = _grad_output((32, 17) if reduction == "none" else (), dtype)
    ours = loss_and_grads(LF.mse_loss, x, t, reduction=reduction, weight=w, grad_output=go)
    truth = loss_and_grads(F.mse_loss, x.double(), t.double(), reduction=reduction,
                           weight=None if w is None else w.double(), grad_output=go.double())
    # x - t is exact in float32. loss: w (x - t)^2, or a float32 sum of 544 such positive terms, rounded
    # once to dtype: 0.5 eps, bound 1. Gradients: 2 w (x - t) / n rounded when stored, then times
    # grad_output: two roundings, up to 1 eps, bound 2. Relative per element.
    for name, a, c in zip(("loss", "d/dinput", "d/dtarget"), ours, truth):
        assert a.dtype == dtype
        assert_within_eps(a, c, 1 if name == "loss" else 2, msg=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_gradcheck(reduction):
    x, t = _pair((3, 4))
    w = _weight((3, 4))
    assert gradcheck(lambda a, b: LF.mse_loss(a, b, reduction=reduction), (x.requires_grad_(), t.requires_grad_()))
    assert gradcheck(lambda a, b: LF.mse_loss(a, b, reduction=reduction, weight=w), (x, t))


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=3), reduction=st.sampled_from(REDUCTIONS),
       weighted=st.booleans(), seed=st.integers(0, 2**16), chunk=st.sampled_from([1, 3, 7, elementwise.CHUNK]))
def test_mse_property_matches_torch_any_shape_and_piece_size(shape, reduction, weighted, seed, chunk):
    shape = tuple(shape)
    saved, elementwise.CHUNK = elementwise.CHUNK, chunk
    try:
        x, t = _pair(shape, seed=seed)
        w = _weight(shape, seed=seed + 1) if weighted else None
        assert_matches_reference(LF.mse_loss, F.mse_loss, x, t, reduction=reduction, weight=w)
        assert_matches_reference(LF.rmse_loss, rmse_reference, x, t, weight=w)
    finally:
        elementwise.CHUNK = saved


def test_mse_identities():
    x, t = _pair((5, 6))
    w = _weight((5, 6))
    none = LF.mse_loss(x, t, reduction="none")
    assert_close(LF.mse_loss(x, t, reduction="sum"), none.sum())
    assert_close(LF.mse_loss(x, t), none.mean())
    assert_close(LF.mse_loss(x, t, reduction="none", weight=w), w * none)
    assert_close(LF.mse_loss(x, t, weight=w), (w * none).sum() / w.sum())
    for reduction in REDUCTIONS:
        assert_close(LF.mse_loss(x, t, reduction=reduction, weight=torch.ones_like(x)),
                     LF.mse_loss(x, t, reduction=reduction))
    assert_close(LF.mse_loss(t, x), LF.mse_loss(x, t))


def test_mse_nan_empty_and_non_contiguous_like_torch():
    x = torch.tensor([[float("nan"), 1.0], [2.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, float("inf")], [1.0, 3.0]], dtype=torch.float64)
    for reduction in REDUCTIONS:
        assert_matches_reference(LF.mse_loss, F.mse_loss, x, t, reduction=reduction)
    for shape in [(0,), (0, 3), (2, 0)]:
        e, f = _pair(shape)
        for reduction in REDUCTIONS:
            assert_matches_reference(LF.mse_loss, F.mse_loss, e, f, reduction=reduction)
            assert_matches_reference(LF.mse_loss, F.mse_loss, e, f, reduction=reduction, weight=_weight(shape))
    a, b = _pair((6, 5))
    assert_matches_reference(LF.mse_loss, F.mse_loss, a.t(), b.t(), reduction="none")


def test_mse_bad_input():
    x, t = _pair((2, 3))
    with pytest.raises(ValueError, match=r"target must have the same shape as input \(2, 3\), got \(3,\)"):
        LF.mse_loss(x, t[0])  # torch broadcasts with a warning; losskit refuses
    with pytest.raises(ValueError, match=r"weight must have the same shape as input \(2, 3\), got \(3,\)"):
        LF.mse_loss(x, t, weight=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight requires grad"):
        LF.mse_loss(x, t, weight=torch.ones(2, 3, dtype=torch.float64, requires_grad=True))
    with pytest.raises(TypeError, match="input"):
        LF.mse_loss(x.long(), t)
    with pytest.raises(TypeError, match="target"):
        LF.mse_loss(x, t > 0)
    with pytest.raises(TypeError, match="weight"):
        LF.mse_loss(x, t, weight=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        LF.mse_loss(x, t, reduction="elementwise_mean")
    with pytest.raises(TypeError):
        LF.mse_loss(x, t, "sum")  # reduction is keyword-only
    with pytest.raises(ValueError, match=r"target must have the same shape as input \(2, 3\)"):
        LF.rmse_loss(x, t[:1])


# --- rmse_loss ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_rmse_matches_float64_formula(dtype, shape, weighted):
    x, t = _pair(shape, dtype)
    w = _weight(shape, dtype) if weighted else None
    ours = loss_and_grads(LF.rmse_loss, x, t, weight=w)
    ref = loss_and_grads(rmse_reference, x, t, weight=w)
    assert_same_results(ours, (ref[0].to(dtype), *ref[1:]))


def test_rmse_is_sqrt_of_mse():
    x, t = _pair((4, 5))
    w = _weight((4, 5))
    assert_close(LF.rmse_loss(x, t), LF.mse_loss(x, t).sqrt())
    assert_close(LF.rmse_loss(x, t, weight=w), LF.mse_loss(x, t, weight=w).sqrt())


def test_rmse_gradient_is_zero_not_nan_at_zero_loss():
    x = torch.randn(3, 4, dtype=torch.float64)
    loss, gx, gt = loss_and_grads(LF.rmse_loss, x, x.clone())
    assert loss == 0
    assert torch.equal(gx, torch.zeros_like(x)) and torch.equal(gt, torch.zeros_like(x))
    # Only the weighted residuals matter: a residual under a zero weight leaves the loss at 0.
    t = x.clone()
    t[0, 0] += 1
    w = torch.ones_like(x)
    w[0, 0] = 0
    loss, gx, _ = loss_and_grads(LF.rmse_loss, x, t, weight=w)
    assert loss == 0 and torch.equal(gx, torch.zeros_like(x))


def test_rmse_low_precision_within_eps_of_float64():
    for dtype in (torch.bfloat16, torch.float16):
        x, t = (v.to(dtype) for v in _pair((32, 17)))
        go = _grad_output((), dtype)
        ours = loss_and_grads(LF.rmse_loss, x, t, grad_output=go)
        truth = loss_and_grads(rmse_reference, x.double(), t.double(), grad_output=go.double())
        # x - t is exact in float32. loss: the sqrt of a float32 mean of 544 squares, rounded once to
        # dtype: 0.5 eps, bound 1. Gradients: (x - t) / (n rmse) rounded when stored, then times
        # grad_output: two roundings, up to 1 eps, bound 2. Relative per element.
        for name, a, c in zip(("loss", "d/dinput", "d/dtarget"), ours, truth):
            assert a.dtype == dtype
            assert_within_eps(a, c, 1 if name == "loss" else 2, msg=f"{dtype} {name}")


def test_rmse_gradcheck():
    x, t = _pair((3, 4))
    w = _weight((3, 4))
    assert gradcheck(LF.rmse_loss, (x.requires_grad_(), t.requires_grad_()))
    assert gradcheck(lambda a, b: LF.rmse_loss(a, b, weight=w), (x, t))


def test_no_gradient_work_when_nothing_requires_grad():
    x, t = _pair((3, 4))
    assert LF.mse_loss(x, t).grad_fn is None and LF.rmse_loss(x, t).grad_fn is None
    x.requires_grad_()
    LF.mse_loss(x, t, reduction="sum").backward()
    assert_close(x.grad, 2 * (x.detach() - t))
    assert t.grad is None
