"""The classification modules: one-call shells over the functionals, drop-in for torch.nn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import losskit.functional as LF
import losskit.nn as LN
from losskit.testing import assert_close, loss_and_grads

C = 4


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, C, 3, generator=g, dtype=torch.float64)
    t = torch.randint(0, C, (6, 3), generator=g)
    t[0, 0] = 2
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    return x, t, w


def _loss_and_input_grad(fn, x, t):
    return loss_and_grads(fn, x, t, target_requires_grad=False)[:2]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_modules_equal_functionals_and_torch(reduction, weighted):
    x, t, w = _case()
    w = w if weighted else None
    logp = x.log_softmax(1)
    pairs = [
        (LN.CrossEntropyLoss(w, ignore_index=2, reduction=reduction, label_smoothing=0.1),
         lambda a, b: LF.cross_entropy(a, b, w, ignore_index=2, reduction=reduction, label_smoothing=0.1),
         nn.CrossEntropyLoss(w, ignore_index=2, reduction=reduction, label_smoothing=0.1), x),
        (LN.NLLLoss(w, ignore_index=2, reduction=reduction),
         lambda a, b: LF.nll_loss(a, b, w, ignore_index=2, reduction=reduction),
         nn.NLLLoss(w, ignore_index=2, reduction=reduction), logp),
        (LN.FocalLoss(w, gamma=0.0, ignore_index=2, reduction=reduction),
         lambda a, b: LF.focal_loss(a, b, w, gamma=0.0, ignore_index=2, reduction=reduction),
         nn.CrossEntropyLoss(w, ignore_index=2, reduction=reduction), x),  # gamma = 0 is cross-entropy
    ]
    for module, functional, torch_module, inp in pairs:
        ours = _loss_and_input_grad(module, inp, t)
        for other in (functional, torch_module):
            for a, b in zip(ours, _loss_and_input_grad(other, inp, t)):
                assert_close(a, b)


def test_focal_module_passes_gamma():
    x, t, w = _case()
    assert_close(LN.FocalLoss(w, gamma=1.5)(x, t), LF.focal_loss(x, t, w, gamma=1.5))
    assert_close(LN.FocalLoss()(x, t), LF.focal_loss(x, t, gamma=2.0))


def test_probability_targets_through_the_module():
    x, _, w = _case()
    tp = torch.rand(6, C, 3, dtype=torch.float64).softmax(1)
    assert_close(LN.CrossEntropyLoss(w, label_smoothing=0.2)(x, tp), nn.CrossEntropyLoss(w, label_smoothing=0.2)(x, tp))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_modules(dim):
    x, _, _ = _case()
    assert_close(LN.Softmax(dim)(x), nn.Softmax(dim)(x))
    assert_close(LN.LogSoftmax(dim)(x), nn.LogSoftmax(dim)(x))
    assert_close(LN.Softmax(dim=dim)(x), LF.softmax(x, dim))


def test_weight_is_a_buffer_that_follows_to_and_state_dict():
    _, _, w = _case()
    module = LN.CrossEntropyLoss(w.float())
    assert "weight" in dict(module.named_buffers())
    assert torch.equal(module.state_dict()["weight"], w.float())
    module = module.to(torch.float64)
    assert module.weight.dtype == torch.float64
    assert LN.NLLLoss().weight is None and "weight" not in LN.NLLLoss().state_dict()
    clone = LN.FocalLoss(torch.ones(C))
    clone.load_state_dict(LN.FocalLoss(w.float()).state_dict())
    assert torch.equal(clone.weight, w.float())


def test_reduction_in_repr_and_attributes_follow_torch():
    module = LN.CrossEntropyLoss(reduction="sum", ignore_index=3, label_smoothing=0.25)
    ref = nn.CrossEntropyLoss(reduction="sum", ignore_index=3, label_smoothing=0.25)
    assert (module.reduction, module.ignore_index, module.label_smoothing) == (
        ref.reduction, ref.ignore_index, ref.label_smoothing)
    assert "reduction='sum'" in repr(module)


def test_bad_construction_arguments():
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'mean', 'sum', got 'avg'"):
        LN.CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        LN.NLLLoss(reduction="batchmean")
    with pytest.raises(TypeError, match="weight must have a floating-point dtype"):
        LN.FocalLoss(torch.ones(C, dtype=torch.long))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        LN.CrossEntropyLoss([1.0, 2.0])
    with pytest.raises(TypeError):
        LN.CrossEntropyLoss(None, 2)  # options are keyword-only


def test_bad_options_are_reported_at_call_time():
    x, t, _ = _case()
    with pytest.raises(ValueError, match="label_smoothing"):
        LN.CrossEntropyLoss(label_smoothing=2.0)(x, t)
    with pytest.raises(ValueError, match="gamma"):
        LN.FocalLoss(gamma=-0.5)(x, t)
    with pytest.raises(ValueError, match=r"weight must be a 1-D tensor with one entry per class \(4\)"):
        LN.NLLLoss(torch.ones(C + 1))(x, t)
