"""kl_div against torch.nn.functional.kl_div, entropy against its float64 formula."""

from __future__ import annotations

import math
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import losskit
import losskit.functional as LF
import losskit.ops.blocks as blocks
import losskit.ops.reference.elementwise as elementwise
import losskit.nn as LN
from losskit.testing import assert_close, assert_within_eps, gradcheck, measure_peaks_in_child

KL_REDUCTIONS = ["none", "mean", "sum", "batchmean"]
SHAPES = [(), (5,), (4, 7), (2, 3, 5)]


def _quiet(fn, *args, **kwargs):
    """Call with torch's and our reduction="mean" warning silenced (it is tested on its own)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def _kl_inputs(shape, dtype, log_target, seed=0, zeros=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).log_softmax(-1) if shape else torch.tensor(-0.7)
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    if zeros and t.numel() > 1:
        t.view(-1)[::3] = 0.0  # 0 log 0 = 0 in the loss, NaN in torch's target gradient
    if log_target:
        t = t.log()  # -inf where t == 0
    return x.to(dtype), t.to(dtype)


def _loss_and_grads(fn, x, t, grad_out=None, **kwargs):
    x = x.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    loss = _quiet(fn, x, t, **kwargs)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out)
    return loss.detach(), x.grad, t.grad


# --- kl_div ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_matches_torch(dtype, shape, reduction, log_target):
    x, t = _kl_inputs(shape, dtype, log_target)
    ours = _loss_and_grads(LF.kl_div, x, t, reduction=reduction, log_target=log_target)
    ref = _loss_and_grads(F.kl_div, x, t, reduction=reduction, log_target=log_target)
    for name, a, b in zip(("loss", "d/dinput", "d/dtarget"), ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, msg=name)


def test_kl_div_zero_target_conventions():
    # 0 * log 0 = 0 in the loss; torch's autograd gives NaN for d/dtarget at t == 0 and -t = -0 for d/dinput.
    x = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    loss, gx, gt = _loss_and_grads(LF.kl_div, x, t, reduction="none")
    assert loss[0] == 0 and gx[0] == 0
    assert torch.isnan(gt[0]) and torch.isfinite(gt[1])
    # log_target: a -inf log-probability gives exp(-inf) * (-inf - x) = NaN in torch; so in ours.
    loss, gx, gt = _loss_and_grads(LF.kl_div, x, t.log(), reduction="none", log_target=True)
    assert torch.isnan(loss[0]) and torch.isnan(gt[0]) and gx[0] == 0


@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
def test_kl_div_none_with_random_grad_output(reduction):
    x, t = _kl_inputs((3, 4), torch.float64, False, zeros=False)
    grad_out = torch.randn(3, 4, dtype=torch.float64) if reduction == "none" else torch.tensor(-1.7).double()
    ours = _loss_and_grads(LF.kl_div, x, t, grad_out, reduction=reduction)
    ref = _loss_and_grads(F.kl_div, x, t, grad_out, reduction=reduction)
    for a, b in zip(ours, ref):
        assert_close(a, b)


@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
@pytest.mark.parametrize("x_shape,t_shape", [((4, 6), (6,)), ((6,), (4, 6)), ((4, 1), (1, 6)), ((3, 4, 6), (4, 1))])
def test_kl_div_broadcasting_matches_torch(reduction, x_shape, t_shape):
    x = torch.randn(x_shape, dtype=torch.float64).log_softmax(-1)
    t = torch.rand(t_shape, dtype=torch.float64)
    out_shape = torch.broadcast_shapes(x_shape, t_shape)
    grad_out = torch.randn(out_shape, dtype=torch.float64) if reduction == "none" else None
    ours = _loss_and_grads(LF.kl_div, x, t, grad_out, reduction=reduction)
    ref = _loss_and_grads(F.kl_div, x, t, grad_out, reduction=reduction)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert_close(a, b)


def test_kl_div_mixed_dtypes_promote_like_torch():
    x, t = _kl_inputs((3, 4), torch.float32, False, zeros=False)
    ours = _loss_and_grads(LF.kl_div, x, t.double(), reduction="sum")
    ref = _loss_and_grads(F.kl_div, x, t.double(), reduction="sum")
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype
        assert_close(a, b, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_low_precision_within_eps_of_float64(dtype, reduction, log_target):
    x64, t64 = _kl_inputs((16, 33), torch.float64, log_target, zeros=False)
    x, t = x64.to(dtype), t64.to(dtype)
    truth = _loss_and_grads(F.kl_div, x.double(), t.double(), reduction=reduction, log_target=log_target)
    ours = _loss_and_grads(LF.kl_div, x, t, reduction=reduction, log_target=log_target)
    # float32 values (a sum of 528 terms for the reduced loss) rounded once to dtype (grad_output is
    # ones): 0.5 eps; normwise, as t (log t - x) and log t + 1 - x cancel near 0
    for name, a, c in zip(("loss", "d/dinput", "d/dtarget"), ours, truth):
        assert a.dtype == dtype
        assert_within_eps(a, c, 1, floor=c.abs().max().item(), msg=name)


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
def test_kl_div_gradcheck(log_target, reduction):
    x, t = _kl_inputs((3, 4), torch.float64, log_target, zeros=False)  # d/dt is NaN at t == 0
    x.requires_grad_()
    t.requires_grad_()
    assert gradcheck(lambda a, b: _quiet(LF.kl_div, a, b, reduction=reduction, log_target=log_target), (x, t))


def test_kl_div_mean_warns_like_torch():
    x, t = _kl_inputs((2, 3), torch.float32, False)
    with pytest.warns(UserWarning, match="batchmean") as ours:
        LF.kl_div(x, t)
    with pytest.warns(UserWarning) as ref:
        F.kl_div(x, t)
    assert str(ours[0].message) == str(ref[0].message)
    assert ours[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for reduction in ("none", "sum", "batchmean"):
            LF.kl_div(x, t, reduction=reduction)


@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0)])
def test_kl_div_empty_like_torch(reduction, shape):
    x, t = torch.zeros(shape, requires_grad=True), torch.zeros(shape)
    ours, ref = _quiet(LF.kl_div, x, t, reduction=reduction), _quiet(F.kl_div, x, t, reduction=reduction)
    assert ours.shape == ref.shape
    assert_close(ours.detach(), ref)
    ours.sum().backward()
    assert x.grad.shape == x.shape


def test_kl_div_non_contiguous_inputs():
    x, t = _kl_inputs((6, 5), torch.float64, False)
    xt, tt = x.t(), t.t()  # (5, 6) transposed views
    for a, b in zip(_loss_and_grads(LF.kl_div, xt, tt, reduction="none"),
                    _loss_and_grads(F.kl_div, xt, tt, reduction="none")):
        assert_close(a, b)


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_kl_div_independent_of_piece_size(monkeypatch, log_target, reduction):
    x, t = _kl_inputs((3, 7, 11), torch.float64, log_target)
    whole = _loss_and_grads(LF.kl_div, x, t, reduction=reduction, log_target=log_target)
    for chunk in (1, 5, 22):  # one element; 5 elements (cuts rows); 2 rows of 11 (cuts dim 1)
        monkeypatch.setattr(elementwise, "CHUNK", chunk)
        pieces = _loss_and_grads(LF.kl_div, x, t, reduction=reduction, log_target=log_target)
        for a, b in zip(pieces, whole):
            assert_close(a, b)


def test_kl_div_no_grad_work_when_nothing_requires_grad():
    x, t = _kl_inputs((3, 4), torch.float32, False)
    loss = LF.kl_div(x, t, reduction="sum")
    assert loss.grad_fn is None and not loss.requires_grad
    with torch.no_grad():
        assert LF.kl_div(x.requires_grad_(), t, reduction="sum").grad_fn is None


def test_kl_div_gradient_only_for_what_requires_grad():
    x, t = _kl_inputs((3, 4), torch.float64, False, zeros=False)
    x.requires_grad_()
    LF.kl_div(x, t, reduction="sum").backward()
    assert_close(x.grad, -t)
    assert t.grad is None


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=3), reduction=st.sampled_from(KL_REDUCTIONS),
       log_target=st.booleans(), seed=st.integers(0, 2**16))
def test_kl_div_property_matches_torch(shape, reduction, log_target, seed):
    x, t = _kl_inputs(tuple(shape), torch.float64, log_target, seed=seed, zeros=False)
    for a, b in zip(_loss_and_grads(LF.kl_div, x, t, reduction=reduction, log_target=log_target),
                    _loss_and_grads(F.kl_div, x, t, reduction=reduction, log_target=log_target)):
        assert_close(a, b)


@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
def test_kl_div_identities(reduction):
    x, t = _kl_inputs((4, 5), torch.float64, False, zeros=False)
    none = LF.kl_div(x, t, reduction="none")
    assert_close(LF.kl_div(x, t, reduction="sum"), none.sum())
    assert_close(LF.kl_div(x, t, reduction="batchmean"), none.sum() / 4)
    assert_close(LF.kl_div(x, t.log(), reduction="none", log_target=True), none)
    module = LN.KLDivLoss(reduction=reduction, log_target=True)
    assert_close(_quiet(module, x, t.log()), _quiet(LF.kl_div, x, t.log(), reduction=reduction, log_target=True))
    assert "log_target=True" in repr(module)


def test_kl_div_check_mode_flags_probabilities_as_input():
    before = losskit.checks_enabled()
    losskit.set_checks(True)
    try:
        with pytest.warns(losskit.LosskitWarning, match="log-probabilities"):
            LF.kl_div(torch.full((2, 3), 1 / 3), torch.full((2, 3), 1 / 3), reduction="sum")
    finally:
        losskit.set_checks(before)


def test_kl_div_bad_input():
    x, t = _kl_inputs((2, 3), torch.float32, False)
    with pytest.raises(TypeError, match="target"):
        LF.kl_div(x, torch.ones(2, 3, dtype=torch.long), reduction="sum")
    with pytest.raises(TypeError, match="input"):
        LF.kl_div(torch.ones(2, 3, dtype=torch.long), t, reduction="sum")
    with pytest.raises(TypeError, match="target"):
        LF.kl_div(x, [[0.5, 0.5, 0.0]], reduction="sum")
    with pytest.raises(ValueError, match="reduction.*'batchmean'.*'elementwise'"):
        LF.kl_div(x, t, reduction="elementwise")
    with pytest.raises(ValueError, match=r"input of shape \(2, 3\) and target of shape \(2, 4\)"):
        LF.kl_div(x, torch.rand(2, 4), reduction="sum")
    with pytest.raises(TypeError, match="log_target"):
        LF.kl_div(x, t, reduction="sum", log_target=1)
    with pytest.raises(ValueError, match="reduction"):
        LN.KLDivLoss(reduction="avg")


# --- entropy -----------------------------------------------------------------------------------------

def _entropy_ref(x: torch.Tensor, dim: int, logits: bool) -> torch.Tensor:
    """Float64 formula: H = -sum p log p with 0 log 0 = 0; p = softmax(x) for logits."""
    p = x.double().softmax(dim) if logits else x.double()
    return -torch.xlogy(p, p).sum(dim)


def _entropy_grad_ref(x: torch.Tensor, dim: int, logits: bool) -> torch.Tensor:
    """Float64 gradient: -(log p + 1), 0 where p == 0 (documented); p (sum p log p - log p) for logits."""
    x = x.double()
    if logits:
        logp = x.log_softmax(dim)
        p = logp.exp()
        return torch.where(p > 0, p * ((p * logp).nan_to_num().sum(dim, keepdim=True) - logp), 0.0)
    return torch.where(x == 0, 0.0, -(x.log() + 1))


def _probs(shape, dim, seed=0, zeros=True):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(shape, generator=g, dtype=torch.float64)
    if zeros and p.numel() > 1:
        p.view(-1)[::4] = 0.0
    return p / p.sum(dim, keepdim=True).clamp_min(1e-12)


def _entropy_and_grad(x, dim, logits, grad_out=None):
    x = x.detach().clone().requires_grad_()
    h = LF.entropy(x, dim, logits=logits)
    h.backward(torch.ones_like(h) if grad_out is None else grad_out)
    return h.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,dim", [((7,), 0), ((4, 7), -1), ((4, 7), 0), ((2, 5, 3), 1), ((2, 3, 5), -1)])
@pytest.mark.parametrize("logits", [False, True])
def test_entropy_matches_formula(dtype, shape, dim, logits):
    x = (torch.randn(shape, dtype=torch.float64) * 3 if logits else _probs(shape, dim)).to(dtype)
    grad_out = torch.randn(_entropy_ref(x, dim, logits).shape, dtype=dtype)
    h, g = _entropy_and_grad(x, dim, logits, grad_out)
    assert h.dtype == dtype and h.shape == _entropy_ref(x, dim, logits).shape
    assert_close(h, _entropy_ref(x, dim, logits))
    assert_close(g, _entropy_grad_ref(x, dim, logits) * grad_out.double().unsqueeze(dim))


def test_entropy_gradient_matches_torch_autograd_of_the_formula():
    # Where every p > 0 the documented gradients are plain calculus: compare with torch's autograd.
    for logits in (False, True):
        x = torch.randn(3, 6, dtype=torch.float64) if logits else _probs((3, 6), -1, zeros=False)
        ref_x = x.clone().requires_grad_()
        _entropy_ref(ref_x, -1, logits).sum().backward()
        assert_close(_entropy_and_grad(x, -1, logits)[1], ref_x.grad)


def test_entropy_gradient_is_zero_where_p_is_zero():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    h, g = _entropy_and_grad(p, -1, False)
    assert_close(h, torch.tensor([math.log(2.0), 0.0], dtype=torch.float64))
    assert g[0, 2] == 0 and g[1, 0] == 0 and g[1, 2] == 0
    assert torch.isfinite(g).all()


def test_entropy_through_underflowing_softmax_equals_logits_path():
    # exp(-800) underflows to 0 in float64: the chained gradient is still the exact one (no inf * 0 = NaN).
    x = torch.tensor([[0.0, 1.0, -800.0], [2.0, -1.0, 0.5]], dtype=torch.float64)
    xs = x.clone().requires_grad_()
    LF.entropy(xs.softmax(-1)).sum().backward()
    h, g = _entropy_and_grad(x, -1, True)
    assert_close(LF.entropy(x.softmax(-1)), h)
    assert torch.isfinite(xs.grad).all()
    assert_close(xs.grad, g)


def test_entropy_logits_corners():
    inf = float("inf")
    x = torch.tensor([[0.0, 0.0, -inf], [1e4, -1e4, 1e4], [-inf, -inf, -inf], [0.0, inf, 1.0],
                      [3.0, float("nan"), 1.0]], dtype=torch.float64)
    h, g = _entropy_and_grad(x, -1, True)
    assert_close(h[:2], torch.tensor([2.0, 2.0], dtype=torch.float64).log())
    assert g[0, 2] == 0 and torch.isfinite(g[:2]).all()
    assert_close(g[:2], _entropy_grad_ref(x[:2], -1, True))
    assert torch.isnan(h[2:]).all()  # all -inf, +inf and NaN rows: NaN, as softmax gives NaN there


def test_entropy_single_class_and_nan_probabilities():
    h, g = _entropy_and_grad(torch.ones(3, 1, dtype=torch.float64), -1, False)
    assert (h == 0).all() and (g == -1).all()
    h, g = _entropy_and_grad(torch.zeros(3, 1, dtype=torch.float64), -1, True)
    assert (h == 0).all() and (g == 0).all()
    h, _ = _entropy_and_grad(torch.tensor([[0.5, float("nan")], [-0.5, 1.5]]), -1, False)
    assert torch.isnan(h).all()


@pytest.mark.parametrize("logits", [False, True])
def test_entropy_gradcheck(logits):
    x = torch.randn(3, 5, dtype=torch.float64) if logits else _probs((3, 5), 0, zeros=False)
    x.requires_grad_()
    assert gradcheck(lambda a: LF.entropy(a, 0, logits=logits), (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("logits", [False, True])
def test_entropy_low_precision_within_eps_of_float64(dtype, logits):
    x = (torch.randn(8, 50, dtype=torch.float64) * 2 if logits else _probs((8, 50), -1)).to(dtype)
    ours = LF.entropy(x, logits=logits)
    assert ours.dtype == dtype
    # a float32 sum of 50 terms -p log p >= 0 rounded once to dtype: 0.5 eps, relative per row
    assert_within_eps(ours, _entropy_ref(x, -1, logits), 1)


@pytest.mark.parametrize("logits", [False, True])
def test_entropy_independent_of_block_size(monkeypatch, logits):
    x = torch.randn(3, 6, 5, dtype=torch.float64) if logits else _probs((3, 6, 5), 1)
    whole = _entropy_and_grad(x, 1, logits)
    for budget in (1, 8 * 6 * 2, 8 * 6 * 7):  # rows of 1; 2 rows (5 not divisible); 7 rows (spans samples)
        monkeypatch.setattr(blocks, "BLOCK_BYTES", budget)
        for a, b in zip(_entropy_and_grad(x, 1, logits), whole):
            assert_close(a, b)


def test_entropy_non_contiguous_and_empty():
    x = _probs((5, 4), 0)
    h, g = _entropy_and_grad(x.t(), -1, False)  # (4, 5) transposed view, distributions along dim 1
    assert_close(h, _entropy_ref(x.t(), -1, False))
    assert_close(g, _entropy_grad_ref(x.t(), -1, False))
    h, g = _entropy_and_grad(torch.zeros(0, 3), -1, True)
    assert h.shape == (0,) and g.shape == (0, 3)


def test_entropy_no_grad_work_when_nothing_requires_grad():
    assert LF.entropy(torch.rand(2, 3)).grad_fn is None


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), data=st.data(), logits=st.booleans(),
       seed=st.integers(0, 2**16))
def test_entropy_property_matches_formula(shape, data, logits, seed):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x = x if logits else _probs(tuple(shape), dim, seed=seed)
    h, g = _entropy_and_grad(x, dim, logits)
    assert_close(h, _entropy_ref(x, dim, logits))
    assert_close(g, _entropy_grad_ref(x, dim, logits))


def test_entropy_module_equals_functional():
    x = torch.randn(2, 3, 4)
    module = LN.Entropy(1, logits=True)
    assert_close(module(x), LF.entropy(x, 1, logits=True))
    assert "dim=1, logits=True" in repr(module)


def test_entropy_bad_input():
    with pytest.raises(TypeError, match="input"):
        LF.entropy(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\].*got 2"):
        LF.entropy(torch.rand(2, 3), 2)
    with pytest.raises(TypeError, match="dim"):
        LF.entropy(torch.rand(2, 3), 1.0)
    with pytest.raises(ValueError, match="input must have at least one dimension"):
        LF.entropy(torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"at least one entry along dim=-1, got shape \(2, 0\)"):
        LF.entropy(torch.rand(2, 0))
    with pytest.raises(TypeError, match="logits"):
        LF.entropy(torch.rand(2, 3), logits="yes")


# --- memory: nothing input-sized but the gradients (and a "none" output) -----------------------------

_PROBE = textwrap.dedent("""
    import torch, losskit.functional as LF
    n = 1 << 22  # 4M float32 elements: 16 MiB per input-sized tensor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g).log_softmax(0).requires_grad_()
    t = torch.rand(n, generator=g).requires_grad_()
    logits = torch.randn(4096, 1024, generator=g).requires_grad_()
    probs = torch.rand(4096, 1024, generator=g).softmax(1).requires_grad_()
    calls = {
        "kl_sum": lambda: LF.kl_div(x, t, reduction="sum"),
        "kl_log_target": lambda: LF.kl_div(x, t, reduction="batchmean", log_target=True),
        "kl_none": lambda: LF.kl_div(x, t, reduction="none"),
        "entropy_logits": lambda: LF.entropy(logits, logits=True),
        "entropy_probs": lambda: LF.entropy(probs),
    }
""")


def test_only_gradients_and_output_are_input_sized():
    peaks = measure_peaks_in_child(_PROBE)
    tensor = (1 << 22) * 4
    # kl_div: about a dozen live float32 pieces of CHUNK elements; entropy: the (rows, C) work block of
    # BLOCK_BYTES and about three temporaries of its size.
    budget = {"kl": 12 * elementwise.CHUNK * 4, "entropy": 6 * blocks.BLOCK_BYTES}
    results = {"kl_sum": 2, "kl_log_target": 2, "kl_none": 3, "entropy_logits": 1, "entropy_probs": 1}
    for name, n_tensors in results.items():
        assert peaks[name] <= n_tensors * tensor + budget[name.split("_")[0]], (name, peaks[name] / 2**20)
