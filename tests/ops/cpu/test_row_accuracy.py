"""The row kernels' accuracy against a float64 truth at any row length, in float32 eps.

Two rows of float32 logits ``randn * 2``, and the same plus 1000, of C = 32768, 128256, 300007 and
1,000,003 classes; the truth is the float64 formula on the same float32 values (and float32 targets,
weights and grad_outputs). Bounds, the same at every C:

- softmax and the cross-entropy input gradient: 4 eps relative per element;
- log_softmax: 4 eps times max(1, |value|);
- losses (cross_entropy with every option, nll_loss, focal_loss): 4 eps relative;
- entropy of logits: 8 eps relative;
- gradients that cancel (label smoothing's p - ls/C, probability targets' p - t, the entropy's
  p (E[z] - z)): 4 eps of their largest entry.

Why they hold on any CPU: an entry is e (1/s) with e the exp of an exact argument (about 1 ulp), 1/s
from a sum carried in double and rounded once (half an ulp), and the product (half an ulp); the losses
and log-sum-exps are formed in double. None of it depends on which of torch's kernels the CPU gets.
(Torch 2.13's own float32 softmax misses the 4 eps bound from C = 32768 on, by 8 to 39 eps.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import losskit.functional as LF
from losskit.testing import assert_within_eps

SIZES = [32768, 128256, 300007, 1_000_003]
OFFSETS = [0.0, 1000.0]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", params=[(c, o) for c in SIZES for o in OFFSETS], ids=lambda p: f"C{p[0]}+{p[1]:g}")
def rows(request):
    """(x, y, t, w): float32 logits (2, C), class indices, probability targets and class weights."""
    C, offset = request.param
    x = torch.randn(2, C, generator=_gen(C)) * 2 + offset
    y = torch.randint(0, C, (2,), generator=_gen(C + 1))
    t = torch.rand(2, C, generator=_gen(C + 2))
    t = t / t.sum(1, keepdim=True)
    w = torch.rand(C, generator=_gen(C + 3)) + 0.5
    return x, y, t, w


def _value_and_grad(fn, x, grad_output=None):
    """fn(x) and d/dx for grad_output (ones when None); x float32 or float64."""
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    g = torch.ones_like(out) if grad_output is None else grad_output.to(out.dtype)
    return out.detach(), torch.autograd.grad(out, x, g)[0]


def _normwise(truth):
    return truth.abs().max().item()


def test_softmax_within_4_eps_per_element(rows):
    x = rows[0]
    assert_within_eps(LF.softmax(x, 1, impl="compiled"), x.double().softmax(1), 4, msg="softmax")


def test_log_softmax_within_4_eps_of_max_1_value(rows):
    x = rows[0]
    assert_within_eps(LF.log_softmax(x, 1, impl="compiled"), x.double().log_softmax(1), 4, floor=1, msg="log_softmax")


def test_softmax_backwards_against_float64(rows):
    # backward of softmax: y (g - sum g y) cancels where g ~ sum g y: normwise; log_softmax's g - p sum g too
    x = rows[0]
    g = torch.randn(x.shape, generator=_gen(7))
    for fn, ref in ((LF.softmax, torch.softmax), (LF.log_softmax, torch.log_softmax)):
        _, ours = _value_and_grad(lambda a: fn(a, 1, impl="compiled"), x, g)
        _, truth = _value_and_grad(lambda a: ref(a, 1), x.double(), g)
        assert_within_eps(ours, truth, 4, floor=_normwise(truth), msg=f"{fn.__name__} backward")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_loss_and_gradient_within_4_eps(rows, reduction):
    x, y = rows[:2]
    loss, grad = _value_and_grad(lambda a: LF.cross_entropy(a, y, reduction=reduction, impl="compiled"), x)
    t_loss, t_grad = _value_and_grad(lambda a: F.cross_entropy(a, y, reduction=reduction), x.double())
    assert_within_eps(loss, t_loss, 4, msg="loss")
    assert_within_eps(grad, t_grad, 4, msg="d/dinput")  # relative per element: p_c / N, and p_y - 1


@pytest.mark.parametrize("option", ["weight", "ignore_index", "label_smoothing", "weight+label_smoothing"])
def test_cross_entropy_options_within_4_eps(rows, option):
    x, y, _, w = rows
    kwargs = {}
    if "weight" in option:
        kwargs["weight"] = w
    if "label_smoothing" in option:
        kwargs["label_smoothing"] = 0.1
    if option == "ignore_index":
        y = y.clone()
        y[1] = kwargs["ignore_index"] = 3  # the second row is skipped: its gradient is exactly 0
    truth_kwargs = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    loss, grad = _value_and_grad(lambda a: LF.cross_entropy(a, y, impl="compiled", **kwargs), x)
    t_loss, t_grad = _value_and_grad(lambda a: F.cross_entropy(a, y, **truth_kwargs), x.double())
    assert_within_eps(loss, t_loss, 4, msg=f"{option} loss")
    # with smoothing, p_c - ls/C cancels: normwise; else relative per element
    floor = _normwise(t_grad) if "label_smoothing" in option else None
    assert_within_eps(grad, t_grad, 4, floor=floor, msg=f"{option} d/dinput")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_cross_entropy_probability_targets_within_4_eps(rows, label_smoothing):
    x, _, t, _ = rows
    loss, grad = _value_and_grad(lambda a: LF.cross_entropy(a, t, label_smoothing=label_smoothing, impl="compiled"), x)
    t_loss, t_grad = _value_and_grad(lambda a: F.cross_entropy(a, t.double(), label_smoothing=label_smoothing),
                                     x.double())
    assert_within_eps(loss, t_loss, 4, msg="loss")
    assert_within_eps(grad, t_grad, 4, floor=_normwise(t_grad), msg="d/dinput")  # p - t cancels: normwise


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_focal_loss_within_4_eps(rows, reduction):
    x, y, _, w = rows

    def truth(a):  # the docstring's formula: -w_y (1 - p_y)^gamma log p_y
        logp = a.log_softmax(1).gather(1, y[:, None])[:, 0]
        loss = -w.double()[y] * (1 - logp.exp()) ** 2 * logp
        return loss.sum() if reduction == "sum" else loss

    loss, grad = _value_and_grad(lambda a: LF.focal_loss(a, y, w, gamma=2.0, reduction=reduction, impl="compiled"), x)
    t_loss, t_grad = _value_and_grad(truth, x.double())
    assert_within_eps(loss, t_loss, 4, msg="loss")
    assert_within_eps(grad, t_grad, 4, floor=_normwise(t_grad), msg="d/dinput")


def test_nll_loss_of_log_softmax_within_4_eps(rows):
    x, y, _, w = rows
    logp = LF.log_softmax(x, 1, impl="compiled")
    for weight in (None, w):
        ours = LF.nll_loss(logp, y, weight, impl="compiled")
        truth = F.nll_loss(logp.double(), y, None if weight is None else weight.double())
        assert_within_eps(ours, truth, 4, msg=f"nll_loss weight={weight is not None}")


def test_entropy_of_logits_within_8_eps(rows):
    x = rows[0]
    h, grad = _value_and_grad(lambda a: LF.entropy(a, 1, logits=True, impl="compiled").sum(), x)
    t_h, t_grad = _value_and_grad(lambda a: -(a.softmax(1) * a.log_softmax(1)).sum(), x.double())
    per_row = LF.entropy(x, 1, logits=True, impl="compiled")
    assert_within_eps(per_row, -(x.double().softmax(1) * x.double().log_softmax(1)).sum(1), 8, msg="entropy")
    assert_within_eps(grad, t_grad, 8, floor=_normwise(t_grad), msg="d/dinput")  # p (E[z] - z) cancels


@pytest.mark.parametrize("shape", [(2, 4096, 9), (64, 5), (37, 13), (3, 1000, 3)], ids=str)
def test_column_tiles_within_the_same_bounds(shape):
    """Short rows and (N, C, L > 1) inputs run in column tiles (one row per lane): the same bounds."""
    x = torch.randn(shape, generator=_gen(11)) * 2
    xd = x.double()
    assert_within_eps(LF.softmax(x, 1, impl="compiled"), xd.softmax(1), 4, msg="softmax")
    assert_within_eps(LF.log_softmax(x, 1, impl="compiled"), xd.log_softmax(1), 4, floor=1, msg="log_softmax")
    assert_within_eps(LF.entropy(x, 1, logits=True, impl="compiled"), -(xd.softmax(1) * xd.log_softmax(1)).sum(1), 8,
                      msg="entropy")
