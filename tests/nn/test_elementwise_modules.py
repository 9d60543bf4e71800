"""The elementwise loss modules: one-call shells over their functionals, drop-in for torch.nn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import losskit.functional as LF
import losskit.nn as LN
from losskit.testing import assert_close, loss_and_grads


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    t = torch.rand(4, 5, generator=g, dtype=torch.float64)
    w = 0.5 + torch.rand(5, generator=g, dtype=torch.float64)
    return x, t, w


def _loss_and_input_grad(fn, x, t):
    return loss_and_grads(fn, x, t, target_requires_grad=False)[:2]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_modules_equal_functionals_and_torch(reduction):
    x, t, w = _data()
    p = torch.sigmoid(x)
    cases = [
        (LN.BCELoss(w, reduction=reduction), nn.BCELoss(w, reduction=reduction), p,
         lambda a, b: LF.binary_cross_entropy(a, b, w, reduction=reduction)),
        (LN.BCEWithLogitsLoss(w, reduction=reduction, pos_weight=2 * w),
         nn.BCEWithLogitsLoss(w, reduction=reduction, pos_weight=2 * w), x,
         lambda a, b: LF.binary_cross_entropy_with_logits(a, b, w, reduction=reduction, pos_weight=2 * w)),
        (LN.MultiLabelSoftMarginLoss(w, reduction=reduction), nn.MultiLabelSoftMarginLoss(w, reduction=reduction),
         x, lambda a, b: LF.multilabel_soft_margin_loss(a, b, w, reduction=reduction)),
        (LN.MSELoss(reduction=reduction), nn.MSELoss(reduction=reduction), x,
         lambda a, b: LF.mse_loss(a, b, reduction=reduction)),
    ]
    for ours, theirs, inp, functional in cases:
        got = _loss_and_input_grad(ours, inp, t)
        for a, b in zip(got, _loss_and_input_grad(functional, inp, t)):
            assert torch.equal(a, b), type(ours).__name__
        for a, b in zip(got, _loss_and_input_grad(theirs, inp, t)):
            assert_close(a, b, msg=type(ours).__name__)


def test_sigmoid_focal_and_rmse_modules_equal_functionals():
    x, t, _ = _data()
    for reduction in ("none", "mean", "sum"):
        got = _loss_and_input_grad(LN.SigmoidFocalLoss(0.4, 1.5, reduction=reduction), x, t)
        want = _loss_and_input_grad(lambda a, b: LF.sigmoid_focal_loss(a, b, 0.4, 1.5, reduction), x, t)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert LN.SigmoidFocalLoss().reduction == "none"  # torchvision's default
    assert all(torch.equal(a, b) for a, b in zip(_loss_and_input_grad(LN.RMSELoss(), x, t),
                                                 _loss_and_input_grad(LF.rmse_loss, x, t)))


def test_weights_are_buffers():
    _, _, w = _data()
    module = LN.BCEWithLogitsLoss(w, pos_weight=2 * w)
    assert set(module.state_dict()) == {"weight", "pos_weight"}
    module = module.to(torch.float32)
    assert module.weight.dtype == torch.float32 and module.pos_weight.dtype == torch.float32
    assert set(LN.BCELoss(w).state_dict()) == {"weight"}
    assert set(LN.MultiLabelSoftMarginLoss(w).state_dict()) == {"weight"}
    assert LN.BCEWithLogitsLoss().pos_weight is None and LN.BCELoss().weight is None


def test_constructor_validation_and_keyword_only_options():
    with pytest.raises(ValueError, match="reduction"):
        LN.BCELoss(reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        LN.SigmoidFocalLoss(reduction="avg")
    with pytest.raises(TypeError, match="pos_weight"):
        LN.BCEWithLogitsLoss(pos_weight=torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="weight"):
        LN.MultiLabelSoftMarginLoss(torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError):
        LN.BCELoss(None, "sum")  # options are keyword-only
    with pytest.raises(TypeError):
        LN.MSELoss("sum")
    x, t, _ = _data()
    with pytest.raises(ValueError, match="gamma"):
        LN.SigmoidFocalLoss(gamma=-1.0)(x, t)
    assert "alpha=0.25, gamma=2.0, reduction='none'" in repr(LN.SigmoidFocalLoss())
