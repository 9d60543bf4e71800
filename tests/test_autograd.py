"""The autograd contract of the fused losses (losskit._autograd): precomputed gradients scaled by
grad_output, no gradient work when none is needed, clear errors for what the design refuses."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import losskit.functional as LF
import losskit.ops.classification as classification
from losskit._autograd import attach, needs_grad
from losskit.testing import assert_close

C = 5


def _case(shape=(4, C), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, C, (shape[0], *shape[2:]), generator=g)
    return x, t


def _fused_calls():
    """One call per fused path, each as ``fn(x) -> loss`` with ``reduction="none"`` where it applies."""
    _, t = _case()
    tp = torch.rand(4, C, dtype=torch.float64)
    return {
        "cross_entropy": lambda x, **kw: LF.cross_entropy(x, t, **kw),
        "cross_entropy_probs": lambda x, **kw: LF.cross_entropy(x, tp, **kw),
        "nll_loss": lambda x, **kw: LF.nll_loss(x, t, **kw),
        "focal_loss": lambda x, **kw: LF.focal_loss(x, t, **kw),
    }


FUSED = list(_fused_calls())


@pytest.mark.parametrize("name", FUSED)
def test_no_graph_when_nothing_requires_grad(name):
    fn = _fused_calls()[name]
    x, _ = _case()
    assert fn(x).grad_fn is None and not fn(x).requires_grad
    with torch.no_grad():
        out = fn(x.clone().requires_grad_())
    assert out.grad_fn is None and not out.requires_grad


def _spy_on_driver(monkeypatch):
    """Record (want_x, want_t) of every call of the cross_entropy/focal driver, whatever its backend."""
    seen = []
    real = classification._softmax_xent
    signature = inspect.signature(real)

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        seen.append((bound["want_x"], bound["want_t"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(classification, "_softmax_xent", spy)
    return seen


@pytest.mark.parametrize("with_grad", [False, True])
def test_no_gradient_work_when_none_is_needed(monkeypatch, with_grad):
    seen = _spy_on_driver(monkeypatch)
    x, t = _case()
    tp = torch.rand(4, C, dtype=torch.float64)
    x.requires_grad_(with_grad)
    LF.cross_entropy(x, t)
    LF.cross_entropy(x, tp)
    LF.focal_loss(x, t)
    with torch.no_grad():
        LF.cross_entropy(x, tp)
    assert seen == [(with_grad, False)] * 3 + [(False, False)]


def test_gradient_only_for_the_target_when_only_it_requires_grad(monkeypatch):
    seen = _spy_on_driver(monkeypatch)
    x, _ = _case()
    tp = torch.rand(4, C, dtype=torch.float64, requires_grad=True)
    LF.cross_entropy(x, tp).backward()
    assert seen == [(False, True)] and tp.grad is not None and x.grad is None


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("shape", [(4, C), (4, C, 3)])
def test_none_reduction_with_random_grad_output(name, shape):
    x, t = _case(shape)
    tp = torch.rand(shape, dtype=torch.float64)
    ours_fn = {"cross_entropy": lambda a: LF.cross_entropy(a, t, reduction="none"),
               "cross_entropy_probs": lambda a: LF.cross_entropy(a, tp, reduction="none"),
               "nll_loss": lambda a: LF.nll_loss(a, t, reduction="none"),
               "focal_loss": lambda a: LF.focal_loss(a, t, gamma=0.0, reduction="none")}[name]
    ref_fn = {"cross_entropy": lambda a: F.cross_entropy(a, t, reduction="none"),
              "cross_entropy_probs": lambda a: F.cross_entropy(a, tp, reduction="none"),
              "nll_loss": lambda a: F.nll_loss(a, t, reduction="none"),
              "focal_loss": lambda a: F.cross_entropy(a, t, reduction="none")}[name]
    grad_out = torch.randn((shape[0], *shape[2:]), dtype=torch.float64)
    grads = []
    for fn in (ours_fn, ref_fn):
        xx = x.clone().requires_grad_()
        fn(xx).backward(grad_out)
        grads.append(xx.grad)
    assert_close(grads[0], grads[1])


@pytest.mark.parametrize("scale", [1.0, -2.5, 0.0])
def test_scalar_grad_output_scales_the_gradient(scale):
    x, t = _case()
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    (LF.cross_entropy(ours, t) * scale).backward()
    (F.cross_entropy(ref, t) * scale).backward()
    assert_close(ours.grad, ref.grad)


def test_gradients_of_several_losses_accumulate():
    x, t = _case()
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    for a, mod in ((ours, LF), (ref, F)):
        loss = mod.cross_entropy(a, t) + 0.5 * mod.nll_loss(a.log_softmax(1), t) + mod.cross_entropy(a, t)
        loss.backward()
        mod.cross_entropy(a, t, reduction="sum").backward()  # second graph, accumulates into .grad
    assert_close(ours.grad, ref.grad)


def test_same_loss_used_twice_in_one_graph():
    x, t = _case()
    a = x.clone().requires_grad_()
    loss = LF.cross_entropy(a, t)
    (loss + 3 * loss).backward()  # one backward call through the fused node, grad_output 4
    b = x.clone().requires_grad_()
    (4 * F.cross_entropy(b, t)).backward()
    assert_close(a.grad, b.grad)


@pytest.mark.parametrize("name", FUSED)
def test_second_backward_with_retain_graph_raises(name):
    x = _case()[0].requires_grad_()
    loss = _fused_calls()[name](x)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same fused loss twice is not supported"):
        loss.backward()


@pytest.mark.parametrize("name", FUSED)
def test_double_backward_raises(name):
    # Refused at the first backward: a constant stored gradient would make a gradient penalty's own
    # gradient silently zero.
    x = _case()[0].requires_grad_()
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(_fused_calls()[name](x), x, create_graph=True)
    v = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)  # a grad_output that itself requires grad
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(_fused_calls()[name](x), x, grad_outputs=v, create_graph=True)


def test_attach_without_gradients_returns_the_loss_itself():
    loss = torch.tensor(1.0)
    x = torch.zeros(3, requires_grad=True)
    assert attach(loss, (x,), (None,)) is loss


def test_attach_expand_dim_broadcasts_grad_output_over_the_class_dim():
    x = torch.zeros(2, 3, 4, requires_grad=True)
    with torch.no_grad():
        loss = torch.zeros(2, 4)
    out = attach(loss, (x,), (torch.ones(2, 3, 4),), expand_dim=1)
    grad_out = torch.arange(8.0).view(2, 4)
    out.backward(grad_out)
    assert_close(x.grad, grad_out.unsqueeze(1).expand(2, 3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grad_output", ["ones, broadcast", "2.5, broadcast", "random", "random, transposed"])
def test_backward_scaling_of_a_large_gradient(dtype, grad_output):
    # A gradient of 64K elements or more is scaled by the C pass (native_pointwise.scale_), and a broadcast
    # scalar 1 (the backward of a per-row loss's .sum()) skips the pass: either way mul_'s result, bit for bit
    n, c, length = 64, 1031, 3
    expected_grad = torch.randn(n, c, length, dtype=torch.float32).to(dtype)
    go = {"ones, broadcast": torch.ones(()).to(dtype).expand(n, length),
          "2.5, broadcast": torch.full((), 2.5).to(dtype).expand(n, length),
          "random": torch.randn(n, length).to(dtype),
          "random, transposed": torch.randn(length, n).to(dtype).t()}[grad_output]
    x = torch.zeros(n, c, length, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        loss = torch.zeros(n, length, dtype=dtype)
    attach(loss, (x,), (expected_grad.clone(),), expand_dim=1).backward(go)
    assert torch.equal(x.grad.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       expected_grad.mul(go.unsqueeze(1)).view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_needs_grad():
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1)
    assert needs_grad(a, b, None) == (True, False, False)
    with torch.no_grad():
        assert needs_grad(a, b) == (False, False)
