"""binary_cross_entropy, binary_cross_entropy_with_logits and multilabel_soft_margin_loss against torch;
sigmoid_focal_loss against torchvision's definition written out in float64 (torchvision is not a
dependency)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import losskit
import losskit.functional as LF
import losskit.ops.reference.elementwise as elementwise
from losskit.ops.reference import losses
from losskit import LosskitWarning
from losskit.testing import (assert_close, assert_matches_reference, assert_same_results, assert_within_eps,
                             gradcheck, loss_and_grads)

REDUCTIONS = ["none", "mean", "sum"]
SHAPES = [(), (5,), (4, 7), (2, 3, 5)]
CONSTANTS = [None, "last", "full", "rows"]  # how weight / pos_weight broadcast to the input


def focal_reference(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """``torchvision.ops.sigmoid_focal_loss`` (torchvision 0.2x), line for line, evaluated in float64."""
    inputs, targets = inputs.double(), targets.double()
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


# --- inputs ------------------------------------------------------------------------------------------

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _probabilities(shape, dtype=torch.float64, seed=0):
    """Inside (0.02, 0.98): away from the clamps, where finite differences and float32 are well behaved."""
    return (0.02 + 0.96 * torch.rand(shape, generator=_gen(seed), dtype=torch.float64)).to(dtype)


def _logits(shape, dtype=torch.float64, seed=1):
    return (3 * torch.randn(shape, generator=_gen(seed), dtype=torch.float64)).to(dtype)


def _soft_labels(shape, dtype=torch.float64, seed=2):
    """Soft labels in [0, 1], a third of them exactly 0 or 1."""
    t = torch.rand(shape, generator=_gen(seed), dtype=torch.float64)
    if t.numel():
        t.view(-1)[::3] = t.view(-1)[::3].round()
    return t.to(dtype)


def _constant(kind, shape, dtype=torch.float64, seed=3):
    """A positive weight of the given broadcast kind: the last dim, the full shape, or one per leading row."""
    if kind is None or (kind == "rows" and len(shape) < 2):
        return None
    wshape = shape[-1:] if kind == "last" else shape if kind == "full" else (shape[0],) + (1,) * (len(shape) - 1)
    return (0.5 + 2 * torch.rand(wshape, generator=_gen(seed), dtype=torch.float64)).to(dtype)


# --- agreement with torch, every option --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight", CONSTANTS)
def test_bce_matches_torch(dtype, shape, reduction, weight):
    x, t, w = _probabilities(shape, dtype), _soft_labels(shape, dtype), _constant(weight, shape, dtype)
    assert_matches_reference(LF.binary_cross_entropy, F.binary_cross_entropy, x, t, w, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight", CONSTANTS)
@pytest.mark.parametrize("pos_weight", CONSTANTS)
def test_bce_with_logits_matches_torch(dtype, shape, reduction, weight, pos_weight):
    x, t = _logits(shape, dtype), _soft_labels(shape, dtype)
    w, pw = _constant(weight, shape, dtype), _constant(pos_weight, shape, dtype, seed=5)
    assert_matches_reference(LF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t, w,
                             reduction=reduction, pos_weight=pw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(6,), (4, 7), (2, 3, 5)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight", CONSTANTS)
def test_multilabel_soft_margin_matches_torch(dtype, shape, reduction, weight):
    x, t, w = _logits(shape, dtype), _soft_labels(shape, dtype), _constant(weight, shape, dtype)
    assert_matches_reference(LF.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss, x, t, w,
                             reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_multilabel_soft_margin_integer_labels_match_torch(reduction):
    x = _logits((5, 4))
    t = (_soft_labels((5, 4)) > 0.5).long()
    ours = LF.multilabel_soft_margin_loss(x.requires_grad_(), t, reduction=reduction)
    ref = F.multilabel_soft_margin_loss(x, t, reduction=reduction)
    assert_close(ours, ref)
    assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 2.0), (0.7, 0.0), (0.25, 0.5), (1.0, 3.0)])
def test_sigmoid_focal_matches_torchvision_definition(dtype, shape, reduction, alpha, gamma):
    x, t = _logits(shape, dtype), _soft_labels(shape, dtype)
    ours = loss_and_grads(LF.sigmoid_focal_loss, x, t, alpha, gamma, reduction)
    ref = loss_and_grads(focal_reference, x, t, alpha, gamma, reduction)
    # The reference runs in float64; judge our result against it with the table's entry for our dtype.
    assert_same_results(ours, tuple(r.to(dtype) for r in ref))


def test_mixed_dtypes_promote_like_torch():
    # Output and gradient dtypes are torch's. torch evaluates sigmoid(x) in x's float32 before promoting,
    # losskit everything in the promoted float64, so values agree to float32's tolerance.
    x, t = _logits((3, 4), torch.float32), _soft_labels((3, 4), torch.float64)
    assert_matches_reference(LF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t,
                             dtype=torch.float32)
    assert_matches_reference(LF.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss, x, t, dtype=torch.float32)
    w64 = _constant("last", (3, 4))
    assert_matches_reference(LF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t.float(), w64)
    assert LF.sigmoid_focal_loss(x, t).dtype == torch.float64


# --- low precision -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("loss", ["bce", "bce_logits", "soft_margin", "focal"])
def test_low_precision_within_eps_of_float64(dtype, reduction, loss):
    shape = (16, 9)
    if loss == "bce":
        x, t, w = _probabilities(shape), _soft_labels(shape), _constant("last", shape)
        ours_fn, ref_fn, args, kwargs = LF.binary_cross_entropy, F.binary_cross_entropy, (w,), {}
    elif loss == "bce_logits":
        x, t, w = _logits(shape), _soft_labels(shape), _constant("last", shape)
        ours_fn, ref_fn = LF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits
        args, kwargs = (w,), {"pos_weight": _constant("last", shape, seed=7)}
    elif loss == "soft_margin":
        x, t, w = _logits(shape), _soft_labels(shape), _constant("last", shape)
        ours_fn, ref_fn, args, kwargs = LF.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss, (w,), {}
    else:
        x, t = _logits(shape), _soft_labels(shape)
        ours_fn, ref_fn, args, kwargs = LF.sigmoid_focal_loss, focal_reference, (), {}
    x, t = x.to(dtype), t.to(dtype)
    args = [None if v is None else v.to(dtype) for v in args]
    kwargs = {k: v.to(dtype) for k, v in kwargs.items()}
    loss_shape = () if reduction == "mean" else shape[:1] if loss == "soft_margin" else shape
    go = torch.randn(loss_shape, generator=_gen(5), dtype=torch.float64).to(dtype)
    ours = loss_and_grads(ours_fn, x, t, *args, reduction=reduction, grad_output=go, **kwargs)
    truth = loss_and_grads(ref_fn, x.double(), t.double(), *[None if v is None else v.double() for v in args],
                           reduction=reduction, grad_output=go.double(), **{k: v.double() for k, v in kwargs.items()})
    # loss: a float32 value rounded once to dtype, 0.5 eps; relative per element. Gradients: rounded
    # when stored, then times grad_output: two roundings, 1 eps; normwise, as sigmoid(x) - t and
    # logit(x) cancel near 0.
    for name, a, c in zip(("loss", "d/dinput", "d/dtarget"), ours, truth):
        assert a.dtype == dtype
        if name == "loss":
            assert_within_eps(a, c, 1, msg=f"{loss} {name}")
        else:
            assert_within_eps(a, c, 1.5, floor=c.abs().max().item(), msg=f"{loss} {name}")


# --- gradcheck (float64 finite differences, both arguments) ------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    shape = (3, 4)
    p, y = _probabilities(shape).requires_grad_(), _probabilities(shape, seed=8).requires_grad_()
    x = _logits(shape).requires_grad_()
    w, pw = _constant("rows", shape), _constant("last", shape, seed=5)
    assert gradcheck(lambda a, b: LF.binary_cross_entropy(a, b, w, reduction=reduction), (p, y))
    assert gradcheck(lambda a, b: LF.binary_cross_entropy_with_logits(a, b, w, reduction=reduction, pos_weight=pw),
                     (x, y))
    assert gradcheck(lambda a, b: LF.multilabel_soft_margin_loss(a, b, pw, reduction=reduction), (x, y))
    for alpha, gamma in [(0.25, 2.0), (-1.0, 0.5), (0.6, 0.0)]:
        assert gradcheck(lambda a, b: LF.sigmoid_focal_loss(a, b, alpha, gamma, reduction), (x, y))


# --- properties over shapes --------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=3), reduction=st.sampled_from(REDUCTIONS),
       seed=st.integers(0, 2**16), chunk=st.sampled_from([1, 3, 7, elementwise.CHUNK]))
def test_property_matches_torch_any_shape_and_piece_size(shape, reduction, seed, chunk):
    shape = tuple(shape)
    saved, elementwise.CHUNK = elementwise.CHUNK, chunk
    try:
        x, p, t = _logits(shape, seed=seed), _probabilities(shape, seed=seed), _soft_labels(shape, seed=seed + 1)
        w = _constant("last", shape, seed=seed + 2)
        assert_matches_reference(LF.binary_cross_entropy, F.binary_cross_entropy, p, t, w, reduction=reduction)
        assert_matches_reference(LF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t,
                                 reduction=reduction, pos_weight=w)
        assert_matches_reference(LF.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss, x, t, w,
                                 reduction=reduction)
        assert_matches_reference(LF.sigmoid_focal_loss, focal_reference, x, t, 0.3, 1.5, reduction)
    finally:
        elementwise.CHUNK = saved


# --- identities --------------------------------------------------------------------------------------

def test_identities():
    shape = (5, 6)
    p, x, t = _probabilities(shape), _logits(shape), _soft_labels(shape)
    ones = torch.ones(6, dtype=torch.float64)
    calls = [
        lambda r, w=None: LF.binary_cross_entropy(p, t, w, reduction=r),
        lambda r, w=None: LF.binary_cross_entropy_with_logits(x, t, w, reduction=r),
        lambda r, w=None: LF.binary_cross_entropy_with_logits(x, t, reduction=r, pos_weight=w),
        lambda r, w=None: LF.multilabel_soft_margin_loss(x, t, w, reduction=r),
    ]
    for call in calls:
        none = call("none")
        assert_close(call("sum"), none.sum())
        assert_close(call("mean"), none.mean())
        for r in REDUCTIONS:
            assert_close(call(r, ones), call(r))
    for r in REDUCTIONS:
        # gamma = 0 with alpha < 0 is plain BCE-with-logits; alpha = 0.5 halves it.
        assert_close(LF.sigmoid_focal_loss(x, t, -1.0, 0.0, r), LF.binary_cross_entropy_with_logits(x, t, reduction=r))
        assert_close(LF.sigmoid_focal_loss(x, t, 0.5, 0.0, r),
                     0.5 * LF.binary_cross_entropy_with_logits(x, t, reduction=r))
    # The soft-margin loss of a row is the mean over its classes of the elementwise BCE-with-logits.
    assert_close(LF.multilabel_soft_margin_loss(x, t, reduction="none"),
                 LF.binary_cross_entropy_with_logits(x, t, reduction="none").mean(-1))
    # BCE of sigmoid(x) is BCE-with-logits of x.
    assert_close(LF.binary_cross_entropy(torch.sigmoid(x), t), LF.binary_cross_entropy_with_logits(x, t))


def test_focal_gamma_zero_gradients_equal_bce_with_logits():
    x, t = _logits((4, 5)), _soft_labels((4, 5))
    assert_same_results(loss_and_grads(LF.sigmoid_focal_loss, x, t, -1.0, 0.0, "none"),
                        loss_and_grads(LF.binary_cross_entropy_with_logits, x, t, reduction="none"))


# --- edge values, NaN, empty -------------------------------------------------------------------------

def test_bce_clamps_and_epsilon_like_torch():
    # x = 0 and 1 hit the -100 clamp of the log and the 1e-12 floor of the gradient's denominator.
    x = torch.tensor([0.0, 1.0, 0.0, 1.0, 1e-30, 0.5], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.5], dtype=torch.float64)
    for reduction in REDUCTIONS:
        assert_matches_reference(LF.binary_cross_entropy, F.binary_cross_entropy, x, t, reduction=reduction,
                                 target_requires_grad=False)
    # d/dtarget = -logit(x) is infinite at x = 0 and 1 in torch too.
    assert_matches_reference(LF.binary_cross_entropy, F.binary_cross_entropy, x, t, reduction="sum")


def test_bce_with_logits_is_stable_for_large_logits():
    x = torch.tensor([-200.0, -50.0, 50.0, 200.0], dtype=torch.float32)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float32)
    assert_matches_reference(LF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t,
                             reduction="none")
    assert_matches_reference(LF.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss, x, t, reduction="none")


def test_focal_saturated_logit_has_zero_gradient_not_nan():
    # q = 1 - p_t underflows to 0 for a confidently right logit; for gamma < 1 torchvision's autograd
    # gives 0 * inf = NaN there, ours the limit 0 (documented).
    x = torch.tensor([200.0, -200.0], dtype=torch.float32)
    t = torch.tensor([1.0, 0.0], dtype=torch.float32)
    loss, gx, gt = loss_and_grads(LF.sigmoid_focal_loss, x, t, 0.25, 0.5, "sum")
    assert loss == 0 and torch.equal(gx, torch.zeros(2))
    assert torch.isfinite(gt).all()
    assert torch.isnan(loss_and_grads(focal_reference, x, t, 0.25, 0.5, "sum")[1]).any()


def test_bce_domain_is_checked_on_the_whole_tensors_before_any_piece(monkeypatch):
    # An out-of-range value in the last of several pieces: rejected before the first piece is computed
    # (the torch path, whose pieces are computed by losses.bce; the compiled kernel checks in its pass).
    x = torch.full((3, elementwise.CHUNK), 0.5)
    x[-1, -1] = 1.5
    monkeypatch.setattr(losses, "bce", lambda ops, want: pytest.fail("computed before the check"))
    with pytest.raises(ValueError, match=r"input must have all elements in \[0, 1\], found 1.5"):
        LF.binary_cross_entropy(x, torch.full_like(x, 0.5), impl="torch")
    # A NaN (which passes) beside an out-of-range value does not hide it.
    with pytest.raises(ValueError, match=r"target must have all elements in \[0, 1\], found -0.25"):
        LF.binary_cross_entropy(torch.full((3,), 0.5), torch.tensor([float("nan"), -0.25, 0.5]))


def _assert_logit_losses_match(x, t, reduction):
    """The three losses of logits against torch (sigmoid_focal_loss: torchvision's definition)."""
    assert_matches_reference(LF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t,
                             reduction=reduction)
    assert_matches_reference(LF.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss, x, t, reduction=reduction)
    assert_matches_reference(LF.sigmoid_focal_loss, focal_reference, x, t, 0.25, 2.0, reduction)


def test_nan_propagates_like_torch():
    x = torch.tensor([[float("nan"), 0.5, -1.0], [0.2, 1.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 1.0], [0.0, float("nan"), 0.5]], dtype=torch.float64)
    for reduction in REDUCTIONS:
        _assert_logit_losses_match(x, t, reduction)


def test_bce_nan_propagates():
    # torch's CPU kernel raises on NaN (its [0, 1] check fails); losskit lets NaN through to the loss,
    # the convention of every other loss (the [0, 1] check only rejects real out-of-range values).
    x = torch.tensor([float("nan"), 0.3], dtype=torch.float64)
    t = torch.tensor([0.5, 0.5], dtype=torch.float64)
    loss, gx, gt = loss_and_grads(LF.binary_cross_entropy, x, t, reduction="none")
    assert torch.isnan(loss[0]) and torch.isnan(gx[0]) and torch.isnan(gt[0])
    assert_close(loss[1], F.binary_cross_entropy(x[1:], t[1:], reduction="none")[0])
    assert torch.isnan(LF.binary_cross_entropy(t, x))


@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_like_torch(shape, reduction):
    p, x, t = _probabilities(shape), _logits(shape), _soft_labels(shape)
    assert_matches_reference(LF.binary_cross_entropy, F.binary_cross_entropy, p, t, reduction=reduction)
    _assert_logit_losses_match(x, t, reduction)


def test_non_contiguous_inputs():
    x, t = _logits((6, 5)).t(), _soft_labels((6, 5)).t()  # (5, 6) transposed views
    pw = _constant("last", (5, 6))
    assert_matches_reference(LF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t,
                             pos_weight=pw, reduction="none")
    p = _probabilities((6, 5)).t()
    assert_matches_reference(LF.binary_cross_entropy, F.binary_cross_entropy, p, t)


def test_gradient_only_for_what_requires_grad():
    x, t = _logits((3, 4)), _soft_labels((3, 4))
    loss = LF.binary_cross_entropy_with_logits(x, t)
    assert loss.grad_fn is None and not loss.requires_grad
    x.requires_grad_()
    LF.binary_cross_entropy_with_logits(x, t, reduction="sum").backward()
    assert_close(x.grad, torch.sigmoid(x.detach()) - t)
    assert t.grad is None
    with torch.no_grad():
        assert LF.sigmoid_focal_loss(x, t).grad_fn is None


def test_with_logits_losses_warn_on_probabilities_in_check_mode():
    probs = _probabilities((4, 4))
    before = losskit.checks_enabled()
    losskit.set_checks(True)
    try:
        for call in (lambda: LF.binary_cross_entropy_with_logits(probs, probs),
                     lambda: LF.multilabel_soft_margin_loss(probs, probs),
                     lambda: LF.sigmoid_focal_loss(probs, probs)):
            with pytest.warns(LosskitWarning, match="logits"):
                call()
    finally:
        losskit.set_checks(before)


# --- bad input ---------------------------------------------------------------------------------------

def test_bad_input():
    p, t = _probabilities((2, 3)), _soft_labels((2, 3))
    with pytest.raises(ValueError, match=r"input must have all elements in \[0, 1\], found 1.5"):
        LF.binary_cross_entropy(torch.tensor([0.5, 1.5]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"target must have all elements in \[0, 1\], found -0.25"):
        LF.binary_cross_entropy(torch.tensor([0.5, 0.5]), torch.tensor([0.5, -0.25]))
    with pytest.raises(TypeError, match="target must have the input's dtype"):
        LF.binary_cross_entropy(p, t.float())
    with pytest.raises(TypeError, match="input"):
        LF.binary_cross_entropy_with_logits(torch.ones(2, 3, dtype=torch.long), t)
    with pytest.raises(TypeError, match="target"):
        LF.binary_cross_entropy_with_logits(p, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="target"):
        LF.binary_cross_entropy(p, [[0.0, 1.0, 1.0]] * 2)
    with pytest.raises(ValueError, match=r"target must have the same shape as input \(2, 3\), got \(3,\)"):
        LF.binary_cross_entropy_with_logits(p, t[0])
    with pytest.raises(ValueError, match=r"targets must have the same shape as inputs"):
        LF.sigmoid_focal_loss(p, t[:1])
    with pytest.raises(ValueError, match=r"weight of shape \(2,\) must broadcast to input's shape \(2, 3\)"):
        LF.binary_cross_entropy(p, t, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"pos_weight of shape \(2,\)"):
        LF.binary_cross_entropy_with_logits(p, t, pos_weight=torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight of shape \(4, 2, 3\)"):
        LF.multilabel_soft_margin_loss(p, t, torch.ones(4, 2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="weight"):
        LF.binary_cross_entropy_with_logits(p, t, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="weight requires grad"):
        LF.binary_cross_entropy_with_logits(p, t, torch.ones(3, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="reduction"):
        LF.binary_cross_entropy(p, t, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        LF.sigmoid_focal_loss(p, t, reduction="elementwise_mean")
    with pytest.raises(ValueError, match="gamma must be in"):
        LF.sigmoid_focal_loss(p, t, gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        LF.sigmoid_focal_loss(p, t, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        LF.sigmoid_focal_loss(p, t, alpha=math.nan)
    with pytest.raises(TypeError, match="alpha"):
        LF.sigmoid_focal_loss(p, t, alpha="0.25")
    with pytest.raises(ValueError, match="class dimension"):
        LF.multilabel_soft_margin_loss(torch.tensor(0.5), torch.tensor(1.0))
