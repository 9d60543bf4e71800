"""cross_entropy, nll_loss, focal_loss, softmax and log_softmax against torch (focal: its float64 formula)."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import losskit.functional as LF
import losskit.ops.blocks as blocks
from losskit.testing import (assert_close, assert_matches_reference, assert_same_results, assert_within_eps,
                             gradcheck, loss_and_grads)

C = 5
# (C,), (N, C) and (N, C, d1, d2) inputs; classes on dim 0 for the single sample, dim 1 otherwise.
SHAPES = [(C,), (6, C), (2, C, 3, 2)]
REDUCTIONS = ["none", "mean", "sum"]
FLOATS = [torch.float64, torch.float32]
LOW = [torch.bfloat16, torch.float16]


def _cd(x):
    return 0 if x.dim() == 1 else 1


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(shape, dtype=torch.float64, seed=0):
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * 2).to(dtype)


def _index_target(shape, seed=0, ignore_index=None):
    """Class indices for an input of ``shape``; every third position set to ``ignore_index`` if given."""
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, shape[_cd(torch.empty(shape))], tshape, generator=_gen(seed + 1))
    if ignore_index is not None and t.numel() > 1:
        t.view(-1)[::3] = ignore_index
    return t


def _prob_target(shape, dtype=torch.float64, seed=0):
    x = torch.randn(shape, generator=_gen(seed + 2), dtype=torch.float64)
    return x.softmax(0 if len(shape) == 1 else 1).to(dtype)


def _weight(dtype=torch.float64, n=C):
    return (torch.rand(n, generator=_gen(7), dtype=torch.float64) + 0.5).to(dtype)


def _focal_ref(x, t, weight=None, *, gamma=2.0, ignore_index=-100, reduction="mean"):
    """Float64 formula of focal_loss's docstring: -w_y (1 - p_y)^gamma log p_y; "mean" divides by sum w_y."""
    cd = _cd(x)
    valid = t != ignore_index
    safe = t.masked_fill(~valid, 0).unsqueeze(cd)
    logp_y = x.double().log_softmax(cd).gather(cd, safe).squeeze(cd).where(valid, 0.0)  # ignored rows: 0
    w_y = (weight.double()[safe.squeeze(cd)] if weight is not None else torch.ones_like(logp_y)) * valid
    loss = -w_y * (1 - logp_y.exp()) ** gamma * logp_y
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / w_y.sum()


def _focal_ref_in_dtype(x, t, weight=None, **kwargs):
    """The float64 formula, its result cast to ``x``'s dtype (so its gradient is too), to compare with
    focal_loss."""
    return _focal_ref(x.double(), t, weight, **kwargs).to(x.dtype)


# --- values and gradients against torch, every option combination ------------------------------------

#: The losses of class-index targets: losskit's, the reference (torch, or focal_loss's float64 formula),
#: and the option swept besides weight, ignore_index and reduction.
_INDEX_LOSSES = {
    "cross_entropy": (LF.cross_entropy, F.cross_entropy, "label_smoothing", [0.0, 0.3]),
    "nll_loss": (LF.nll_loss, F.nll_loss, None, [None]),
    "focal_loss": (LF.focal_loss, _focal_ref_in_dtype, "gamma", [0.5, 2.0]),
}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("loss,option,value",
                         [(name, option, v) for name, (_, _, option, values) in _INDEX_LOSSES.items() for v in values])
@pytest.mark.parametrize("weighted,ignore_index,reduction",
                         list(itertools.product([False, True], [-100, 1], REDUCTIONS)))
def test_index_target_losses_match_reference(dtype, shape, loss, option, value, weighted, ignore_index, reduction):
    fn, reference = _INDEX_LOSSES[loss][:2]
    x = _logits(shape, dtype)
    if loss == "nll_loss":
        x = x.log_softmax(0 if len(shape) == 1 else 1)
    t = _index_target(shape, ignore_index=ignore_index)
    w = _weight(dtype) if weighted else None
    kw = dict(ignore_index=ignore_index, reduction=reduction, **({option: value} if option else {}))
    assert_matches_reference(fn, reference, x, t, w, **kw)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted,label_smoothing,reduction",
                         list(itertools.product([False, True], [0.0, 0.3], REDUCTIONS)))
def test_cross_entropy_probability_targets_match_torch(dtype, shape, weighted, label_smoothing, reduction):
    x, t = _logits(shape, dtype), _prob_target(shape, dtype)
    w = _weight(dtype) if weighted else None
    kw = dict(label_smoothing=label_smoothing, reduction=reduction)
    assert_matches_reference(LF.cross_entropy, F.cross_entropy, x, t, w, **kw)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", [((5,), 0), ((4, 5), 1), ((4, 5), -2), ((2, 5, 3), 1), ((2, 3, 5), -1)])
def test_softmax_and_log_softmax_match_torch(dtype, fn, shape, dim):
    x = _logits(shape, dtype)
    ours = loss_and_grads(lambda a, _t: getattr(LF, fn)(a, dim), x, torch.zeros(()))
    ref = loss_and_grads(lambda a, _t: getattr(F, fn)(a, dim), x, torch.zeros(()))
    assert_same_results(ours[:2], ref[:2])
    for cast in (torch.float64, None):
        assert_close(getattr(LF, fn)(x, dim, dtype=cast), getattr(F, fn)(x, dim, dtype=cast))


def test_softmax_implicit_dim_warns_like_torch():
    x = _logits((2, 3))
    for fn in ("softmax", "log_softmax"):
        with pytest.warns(UserWarning, match="Implicit dimension choice") as ours:
            out = getattr(LF, fn)(x)
        with pytest.warns(UserWarning) as ref:
            expected = getattr(F, fn)(x)
        assert str(ours[0].message) == str(ref[0].message)
        assert ours[0].filename == __file__
        assert_close(out, expected)


# --- low precision: judged in the dtype's eps against float64 on the same inputs -------------------

@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("loss", ["cross_entropy", "cross_entropy_smoothed", "cross_entropy_probs", "nll_loss"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_low_precision_within_eps_of_float64(dtype, loss, reduction):
    shape = (16, 40, 3)
    x = _logits(shape, dtype)
    t = _prob_target(shape, dtype) if loss == "cross_entropy_probs" else _index_target(shape, ignore_index=-100)
    kw = dict(reduction=reduction, weight=_weight(dtype, 40))
    if loss == "nll_loss":
        x = x.float().log_softmax(1).to(dtype)
    if loss == "cross_entropy_smoothed":
        kw["label_smoothing"] = 0.1
    name = "nll_loss" if loss == "nll_loss" else "cross_entropy"
    w = kw.pop("weight")
    grad_out = torch.randn((16, 3) if reduction == "none" else (), generator=_gen(5)).to(dtype)
    ours = loss_and_grads(getattr(LF, name), x, t, w, grad_output=grad_out, **kw)
    truth = loss_and_grads(getattr(F, name), x.double(), t.double() if t.is_floating_point() else t, w.double(),
                           grad_output=grad_out.double(), **kw)
    # loss: a float32 value (a row's log-sum-exp, or a mean of up to 48 positive terms) rounded once to
    # dtype, 0.5 eps; the data's losses are far from 0, so relative per element. Gradients: rounded when
    # stored, then times grad_output in dtype: two roundings, 1 eps; normwise, as p - y and -log_softmax
    # cancel near 0.
    for what, a, c in zip(("loss", "d/dinput", "d/dtarget"), ours, truth):
        if c is not None:
            assert a.dtype == dtype, what
            if what == "loss":
                assert_within_eps(a, c, 1, msg=f"{loss} {what}")
            else:
                assert_within_eps(a, c, 1.5, floor=c.abs().max().item(), msg=f"{loss} {what}")


@pytest.mark.parametrize("dtype", LOW)
def test_focal_loss_low_precision_within_eps_of_float64(dtype):
    x, t = _logits((32, 40), dtype), _index_target((32, 40))
    ours = LF.focal_loss(x, t, reduction="none")
    # a float32 value rounded once to dtype, 0.5 eps; relative per element (the data's 1 - p_y stay far from
    # 0, where float32's 1 - p would cancel)
    assert_within_eps(ours, _focal_ref(x, t, reduction="none"), 1)


# --- gradcheck (float64) ------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(4, C), (2, C, 3)])
def test_gradcheck(reduction, shape):
    x = _logits(shape).requires_grad_()
    t = _index_target(shape, ignore_index=1)
    tp = _prob_target(shape).requires_grad_()
    w = _weight()
    for fn, inputs in [
        (lambda a: LF.cross_entropy(a, t, w, ignore_index=1, label_smoothing=0.2, reduction=reduction), (x,)),
        (lambda a, b: LF.cross_entropy(a, b, w, label_smoothing=0.2, reduction=reduction), (x, tp)),
        (lambda a: LF.nll_loss(a, t, w, ignore_index=1, reduction=reduction), (x,)),
        (lambda a: LF.focal_loss(a, t, w, gamma=1.5, ignore_index=1, reduction=reduction), (x,)),
    ]:
        assert gradcheck(fn, inputs)


# --- property tests -----------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5), c=st.integers(1, 6), extra=st.lists(st.integers(1, 3), max_size=2),
       weighted=st.booleans(), ignore=st.booleans(), label_smoothing=st.sampled_from([0.0, 0.1, 1.0]),
       reduction=st.sampled_from(REDUCTIONS), probabilities=st.booleans(), seed=st.integers(0, 2**16))
def test_cross_entropy_property_matches_torch(n, c, extra, weighted, ignore, label_smoothing, reduction,
                                              probabilities, seed):
    shape = (n, c, *extra)
    x = _logits(shape, seed=seed)
    w = _weight(n=c) if weighted else None
    if probabilities:
        t, kw = _prob_target(shape, seed=seed), {}
    else:
        t = torch.randint(0, c, (n, *extra), generator=_gen(seed))
        if ignore:
            t[torch.rand(t.shape, generator=_gen(seed)) < 0.3] = -1
        kw = {"ignore_index": -1}
    kw.update(label_smoothing=label_smoothing, reduction=reduction)
    assert_matches_reference(LF.cross_entropy, F.cross_entropy, x, t, w, **kw)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 5), c=st.integers(2, 6), extra=st.lists(st.integers(1, 3), max_size=2),
       weighted=st.booleans(), gamma=st.floats(0.0, 3.0), reduction=st.sampled_from(REDUCTIONS),
       seed=st.integers(0, 2**16))
def test_focal_and_nll_property(n, c, extra, weighted, gamma, reduction, seed):
    shape = (n, c, *extra)
    x = _logits(shape, seed=seed)
    t = torch.randint(0, c, (n, *extra), generator=_gen(seed))
    w = _weight(n=c) if weighted else None
    assert_matches_reference(LF.focal_loss, _focal_ref_in_dtype, x, t, w, gamma=gamma, reduction=reduction)
    logp = x.log_softmax(1)
    assert_matches_reference(LF.nll_loss, F.nll_loss, logp, t, w, reduction=reduction)


# --- identities ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("loss,kwargs", [("cross_entropy", {"label_smoothing": 0.2}), ("nll_loss", {}),
                                         ("focal_loss", {"gamma": 2.0})])
def test_sum_equals_none_summed_and_mean_is_weighted(shape, loss, kwargs):
    fn = getattr(LF, loss)
    x, t, w = _logits(shape), _index_target(shape, ignore_index=-100), _weight()
    none = fn(x, t, w, reduction="none", **kwargs)
    assert_close(fn(x, t, w, reduction="sum", **kwargs), none.sum())
    valid = t != -100
    assert_close(fn(x, t, w, reduction="mean", **kwargs), none.sum() / w[t.masked_fill(~valid, 0)][valid].sum())


@pytest.mark.parametrize("reduction", REDUCTIONS[1:])
@pytest.mark.parametrize("loss,kwargs", [("cross_entropy", {"label_smoothing": 0.2}), ("nll_loss", {}),
                                         ("focal_loss", {"gamma": 2.0})])
def test_ignored_rows_equal_dropped_rows(reduction, loss, kwargs):
    fn = getattr(LF, loss)
    x, t, w = _logits((9, C)), _index_target((9, C), ignore_index=-100), _weight()
    keep = t != -100
    full = loss_and_grads(fn, x, t, w, reduction=reduction, **kwargs)
    dropped = loss_and_grads(fn, x[keep], t[keep], w, reduction=reduction, **kwargs)
    assert_close(full[0], dropped[0])
    assert_close(full[1][keep], dropped[1])
    assert (full[1][~keep] == 0).all()


@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss", "focal_loss"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ones_weight_equals_no_weight(loss, reduction):
    fn = getattr(LF, loss)
    x, t = _logits((2, C, 3)), _index_target((2, C, 3), ignore_index=-100)
    assert_same_results(loss_and_grads(fn, x, t, torch.ones(C, dtype=torch.float64), reduction=reduction),
                        loss_and_grads(fn, x, t, None, reduction=reduction))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction,weighted", [("none", True), ("sum", True), ("mean", False), ("none", False)])
def test_one_hot_probabilities_equal_index_targets(shape, reduction, weighted):
    x, t = _logits(shape), _index_target(shape)
    one_hot = F.one_hot(t, C).movedim(-1, _cd(x)).double()
    w = _weight() if weighted else None  # with weights "mean" differs by design (torch: / N vs / sum w_y)
    idx = loss_and_grads(LF.cross_entropy, x, t, w, reduction=reduction)
    prob = loss_and_grads(LF.cross_entropy, x, one_hot, w, reduction=reduction)
    assert_same_results(idx[:2], prob[:2])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_focal_gamma_zero_equals_cross_entropy(reduction, shape):
    x, t, w = _logits(shape), _index_target(shape, ignore_index=-100), _weight()
    assert_same_results(loss_and_grads(LF.focal_loss, x, t, w, gamma=0.0, reduction=reduction),
                        loss_and_grads(LF.cross_entropy, x, t, w, reduction=reduction))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["2d", "kdim", "probs", "focal"])
def test_independent_of_block_size(monkeypatch, dtype, case):
    shape = (7, C) if case in ("2d", "focal") else (3, C, 4)
    x = _logits(shape, dtype)
    t = _prob_target(shape, dtype) if case == "probs" else _index_target(shape, ignore_index=-100)
    fn = LF.focal_loss if case == "focal" else LF.cross_entropy
    kw = {} if case == "focal" else {"label_smoothing": 0.1}
    w = _weight(dtype)
    whole = loss_and_grads(fn, x, t, w, reduction="none", **kw)
    item = 8 if dtype == torch.float64 else 4
    # rows per block: 1; 3 (7 rows and 4 positions not divisible by 3); 8 (two samples of 4 positions
    # in one block, 3 samples not divisible by 2).
    # bfloat16 is held to the float32 row: blocking may only reorder float32 accumulation, never change a
    # bfloat16 rounding by more than that.
    tol = torch.float32 if dtype == torch.bfloat16 else None
    for rows in (1, 3, 8):
        monkeypatch.setattr(blocks, "BLOCK_BYTES", rows * C * item)
        assert blocks.block_rows(C, item) == rows
        assert_same_results(loss_and_grads(fn, x, t, w, reduction="none", **kw), whole, dtype=tol)


# --- corners ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss", "focal_loss"])
def test_all_targets_ignored_gives_nan_and_zero_gradients(loss):
    x, t = _logits((3, C)), torch.full((3,), -100)
    out, dx, _ = loss_and_grads(getattr(LF, loss), x, t, grad_output=torch.tensor(1.0, dtype=torch.float64))
    assert torch.isnan(out) and (dx == 0).all()
    assert_close(LF.cross_entropy(x, t, label_smoothing=0.3, reduction="sum"), torch.tensor(0.0).double())
    if loss != "focal_loss":
        ref = loss_and_grads(getattr(F, loss), x, t, grad_output=torch.tensor(1.0, dtype=torch.float64))
        assert_same_results(loss_and_grads(getattr(LF, loss), x, t, grad_output=torch.tensor(1.0, dtype=torch.float64)),
                            ref)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,tshape", [((0, C), (0,)), ((2, C, 0), (2, 0)), ((0, C, 3), (0, 3))])
def test_empty_batch_like_torch(reduction, shape, tshape):
    x, t = torch.zeros(shape, dtype=torch.float64), torch.zeros(tshape, dtype=torch.long)
    for loss in ("cross_entropy", "nll_loss"):
        assert_matches_reference(getattr(LF, loss), getattr(F, loss), x, t, reduction=reduction)
    assert_matches_reference(LF.cross_entropy, F.cross_entropy, x, x.clone(), reduction=reduction)
    assert LF.focal_loss(x, t, reduction=reduction).shape == F.cross_entropy(x, t, reduction=reduction).shape


def test_non_contiguous_and_k_dim_inputs():
    base = _logits((C, 6))
    x = base.t()  # (6, C) transposed view
    assert not x.is_contiguous()
    t = _index_target((6, C), ignore_index=-100)
    tp = _prob_target((C, 6)).t()
    for kw in ({}, {"label_smoothing": 0.2}):
        assert_matches_reference(LF.cross_entropy, F.cross_entropy, x, t, **kw)
        assert_matches_reference(LF.cross_entropy, F.cross_entropy, x, tp, **kw)
    xk = _logits((2, 3, C, 4)).permute(0, 2, 3, 1)  # (2, C, 4, 3), strided
    tk = _index_target((2, C, 4, 3), ignore_index=-100)
    assert_matches_reference(LF.cross_entropy, F.cross_entropy, xk, tk, reduction="none")
    # torch's own nll_loss backward refuses a strided 4-D input ("grad_input must be contiguous").
    assert_same_results(loss_and_grads(LF.nll_loss, xk, tk, reduction="none"),
                        loss_and_grads(F.nll_loss, xk.contiguous(), tk, reduction="none"))
    tk_bcast = torch.zeros(2, 4, 1, dtype=torch.long).expand(2, 4, 3)  # stride-0 target
    assert_matches_reference(LF.cross_entropy, F.cross_entropy, xk, tk_bcast)


def test_rows_with_minus_inf_logits():
    inf = float("inf")
    x = _logits((5, C))
    x[0, 1] = -inf  # a masked class, not the target
    x[1, :3] = -inf  # several masked classes
    x[2, 0] = -inf  # masked placeholder class of an ignored row
    x[3] = -inf  # a fully masked row: NaN, as torch
    x[4, 2] = -inf  # the target's own logit: loss inf
    t = torch.tensor([0, 4, -100, 1, 2])
    for kw in ({}, {"label_smoothing": 0.1}):
        assert_matches_reference(LF.cross_entropy, F.cross_entropy, x, t, reduction="none", **kw)
    rows = [0, 1, 2]  # the focal formula's autograd is finite on these rows
    assert_matches_reference(LF.focal_loss, _focal_ref_in_dtype, x[rows], t[rows], reduction="none")
    out = LF.focal_loss(x, t, reduction="none")
    assert out[2] == 0 and torch.isnan(out[3]) and out[4] == inf
    logp = x.log_softmax(1)
    assert_matches_reference(LF.nll_loss, F.nll_loss, logp, t, reduction="none")
    # probability targets with zero mass on the -inf classes: 0 * inf = NaN in torch, in ours too
    tp = _prob_target((5, C))
    assert_matches_reference(LF.cross_entropy, F.cross_entropy, x, tp, reduction="none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_propagates_as_torch(reduction):
    x = _logits((4, C))
    x[1, 3] = float("nan")  # scored row: its loss and gradient NaN
    x[2, 0] = float("nan")  # ignored row: loss 0, gradient NaN (torch's log_softmax backward)
    t = torch.tensor([0, 2, -100, 4])
    for kw in ({}, {"label_smoothing": 0.2}):
        assert_matches_reference(LF.cross_entropy, F.cross_entropy, x, t, reduction=reduction, **kw)
    logp = x.log_softmax(1)
    assert_matches_reference(LF.nll_loss, F.nll_loss, logp, t, reduction=reduction)


def test_single_class_and_large_logits():
    x1 = _logits((4, 1))
    t1 = torch.zeros(4, dtype=torch.long)
    for kw in ({}, {"label_smoothing": 0.5}):
        assert_matches_reference(LF.cross_entropy, F.cross_entropy, x1, t1, **kw)
    assert_matches_reference(LF.focal_loss, _focal_ref_in_dtype, x1, t1)
    big = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [1e4, 1e4 - 1, 0.0]])
    tb = torch.tensor([1, 2, 0])
    for dtype in FLOATS:
        for kw in ({}, {"label_smoothing": 0.1}):
            assert_matches_reference(LF.cross_entropy, F.cross_entropy, big.to(dtype), tb, **kw)
        assert torch.isfinite(LF.focal_loss(big.to(dtype), tb, reduction="none")).all()
    assert_matches_reference(LF.focal_loss, _focal_ref_in_dtype, big.double(), tb)


def test_focal_loss_confident_rows_stay_positive():
    # p_y -> 1: the loss (1 - p_y)^2 * -log p_y ~ q^3 is tiny but must not collapse to 0 or go negative.
    # Its relative precision is bounded by log-sum-exp rounding near 1 (eps / q ~ 1e-3 here), in torch's
    # log_softmax as in ours, hence rel_tol=1e-2 against the closed form.
    x = torch.tensor([[30.0, 0.0, 0.0], [12.0, -3.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([0, 0])
    q = 2 * math.exp(-30) / (1 + 2 * math.exp(-30))  # 1 - p_y of row 0
    out = LF.focal_loss(x, t, gamma=2.0, reduction="none")
    assert math.isclose(out[0].item(), q * q * -math.log1p(-q), rel_tol=1e-2)
    assert_close(out[1:], _focal_ref(x, t, gamma=2.0, reduction="none")[1:])


def test_index_target_dtypes():
    x, t = _logits((4, C)), _index_target((4, C))
    ref = F.cross_entropy(x, t)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert_close(LF.cross_entropy(x, t.to(dtype)), ref)
        assert_close(LF.nll_loss(x.log_softmax(1), t.to(dtype)), F.nll_loss(x.log_softmax(1), t))


def test_probability_target_gradient_only_when_required():
    x, tp = _logits((3, C)).requires_grad_(), _prob_target((3, C))
    LF.cross_entropy(x, tp).backward()
    assert tp.grad is None
    x2, tp2 = _logits((3, C)), _prob_target((3, C)).requires_grad_()
    LF.cross_entropy(x2, tp2, label_smoothing=0.2).backward()
    ref_t = tp2.detach().clone().requires_grad_()
    F.cross_entropy(x2, ref_t, label_smoothing=0.2).backward()
    assert x2.grad is None
    assert_close(tp2.grad, ref_t.grad)


# --- bad input ----------------------------------------------------------------------------------------

def test_bad_input_raises_naming_the_argument():
    x, t = _logits((4, C)), _index_target((4, C))
    cases = [
        (ValueError, r"class index 7, outside \[0, 5\) for input with 5 classes",
         lambda: LF.cross_entropy(x, torch.tensor([0, 7, 1, 2]))),
        (ValueError, r"class index -2, outside \[0, 5\)", lambda: LF.nll_loss(x, torch.tensor([0, -2, 1, 2]))),
        (ValueError, r"class index 5, outside \[0, 5\)",
         lambda: LF.focal_loss(x, torch.tensor([0, 5, 1, 2]), ignore_index=1)),
        (TypeError, "target must hold class indices with an integer dtype", lambda: LF.cross_entropy(x, t.float())),
        (TypeError, "target must hold class indices", lambda: LF.nll_loss(x, t.double())),
        (TypeError, "target must hold class indices", lambda: LF.focal_loss(x, t.bool())),
        (TypeError, "read as class probabilities and must be floating point",
         lambda: LF.cross_entropy(x, F.one_hot(t, C))),
        (ValueError, r"weight must be a 1-D tensor with one entry per class \(5\), got shape \(4,\)",
         lambda: LF.cross_entropy(x, t, torch.ones(4, dtype=torch.float64))),
        (ValueError, r"weight must be a 1-D tensor .* got shape \(1, 5\)", lambda: LF.nll_loss(x, t, torch.ones(1, C))),
        (TypeError, "weight must have a floating-point dtype, got torch.int64",
         lambda: LF.focal_loss(x, t, torch.ones(C, dtype=torch.long))),
        (ValueError, "weight requires grad", lambda: LF.cross_entropy(x, t, torch.ones(C, requires_grad=True))),
        (ValueError, "reduction must be one of 'none', 'mean', 'sum', got 'avg'",
         lambda: LF.cross_entropy(x, t, reduction="avg")),
        (ValueError, "reduction must be one of", lambda: LF.nll_loss(x, t, reduction="batchmean")),
        (ValueError, "reduction must be one of", lambda: LF.focal_loss(x, t, reduction=None)),
        (ValueError, r"label_smoothing must be in \[0.0, 1.0\], got 1.5",
         lambda: LF.cross_entropy(x, t, label_smoothing=1.5)),
        (ValueError, r"label_smoothing must be in \[0.0, 1.0\], got -0.1",
         lambda: LF.cross_entropy(x, t, label_smoothing=-0.1)),
        (ValueError, "label_smoothing must be in", lambda: LF.cross_entropy(x, t, label_smoothing=float("nan"))),
        (TypeError, "label_smoothing must be a real number", lambda: LF.cross_entropy(x, t, label_smoothing="0.1")),
        (ValueError, "gamma must be in >= 0.0, got -1.0", lambda: LF.focal_loss(x, t, gamma=-1.0)),
        (TypeError, "ignore_index must be an int", lambda: LF.cross_entropy(x, t, ignore_index=1.0)),
        (ValueError, r"target must have shape \(4,\) \(or \(4, 5\) for probabilities\) for input of shape "
                     r"\(4, 5\), got \(3,\)", lambda: LF.cross_entropy(x, t[:3])),
        (ValueError, r"target must have shape \(4,\) for input of shape \(4, 5\), got \(4, 1\)",
         lambda: LF.nll_loss(x, t[:, None])),
        (ValueError, r"target must have shape \(2, 3\)", lambda: LF.cross_entropy(_logits((2, C, 3)), t)),
        (ValueError, "input must have a class dimension", lambda: LF.cross_entropy(torch.tensor(1.0), t[0])),
        (ValueError, "input must have at least one class", lambda: LF.cross_entropy(torch.zeros(4, 0), t)),
        (TypeError, "input must have a floating-point dtype", lambda: LF.cross_entropy(t[:, None].repeat(1, C), t)),
        (TypeError, "input must be a torch.Tensor", lambda: LF.nll_loss([[0.0, 1.0]], t)),
        (ValueError, "ignore_index=3 is not supported with probability targets",
         lambda: LF.cross_entropy(x, _prob_target((4, C)), ignore_index=3)),
        (TypeError, "dim must be an int", lambda: LF.softmax(x, dim=1.0)),
        (ValueError, r"dim must be in \[-2, 1\] for input of shape \(4, 5\), got 2", lambda: LF.log_softmax(x, 2)),
        (TypeError, "dtype must be a floating torch.dtype", lambda: LF.softmax(x, 1, dtype=torch.long)),
        (TypeError, "input must have a floating-point dtype", lambda: LF.softmax(t, 0)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


def test_bad_input_is_rejected_before_any_work():
    # An out-of-range class must never reach the gather, even inside ignored-looking values.
    x = _logits((3, C)).requires_grad_()
    with pytest.raises(ValueError, match="class index -100"):
        LF.cross_entropy(x, torch.tensor([0, -100, 1]), ignore_index=-1)
    assert x.grad is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warnings from a valid call
        LF.cross_entropy(x, torch.tensor([0, 1, 2]))
