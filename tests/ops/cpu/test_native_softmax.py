"""The compiled softmax-family kernels (impl="compiled") against the pure-torch path (impl="torch") and torch.

softmax / log_softmax / entropy / nll_loss; values and gradients, every option, odd sizes, strides and
dims, low precision, thread split, and the wrapper's and kernel's refusal of bad operands and targets.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import losskit.functional as LF
import losskit.nn as LN
from losskit.ops import _dispatch
from losskit.ops.cpu import native, native_softmax
from losskit.testing import assert_close, assert_same_results, assert_within_eps, gradcheck, loss_and_grads

FLOATS = [torch.float64, torch.float32]
LOW = [torch.bfloat16, torch.float16]
_NO_TARGET = torch.zeros(())


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype=torch.float64, seed=0, scale=3.0):
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def _probs(shape, dim, dtype=torch.float64, seed=0, zeros=True):
    """Probabilities along ``dim``, with a zero in every fourth entry if ``zeros``."""
    p = torch.rand(shape, generator=_gen(seed), dtype=torch.float64)
    if zeros and p.numel() > 1:
        p.view(-1)[::4] = 0.0
    return (p / p.sum(dim, keepdim=True).clamp_min(1e-12)).to(dtype)


def _unary(fn, **kwargs):
    """``fn(input, **kwargs)`` as the (input, target) callable that loss_and_grads expects."""
    return lambda a, _t: fn(a, **kwargs)


def _results(fn, x, **kwargs):
    """(value, d/dinput) of ``fn(x, **kwargs)`` for a fixed random grad_output."""
    return loss_and_grads(_unary(fn, **kwargs), x, _NO_TARGET)[:2]


def _entropy_reference(x, dim, logits):
    if logits:  # log_softmax, not log(softmax): no 0 * -inf where a probability underflows
        return -(x.softmax(dim) * x.log_softmax(dim)).sum(dim)
    return -torch.xlogy(x, x).sum(dim)


#: name -> (losskit function, torch reference, kwargs); entropy's reference is losskit's torch path, whose
#: own tests compare it with the formula (tests/functional/test_divergence.py).
ROWS = {
    "softmax": (LF.softmax, F.softmax),
    "log_softmax": (LF.log_softmax, F.log_softmax),
    "entropy_logits": (functools.partial(LF.entropy, logits=True), None),
    "entropy_probs": (functools.partial(LF.entropy, logits=False), None),
}


def _row_input(name, shape, dim, dtype=torch.float64, seed=0, zeros=True):
    return _probs(shape, dim, dtype, seed, zeros) if name == "entropy_probs" else _randn(shape, dtype, seed)


def _identical(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=msg or None)


#: Fixed bounds (eps of the result's dtype) of the compiled kernel against the float64 truth on the same
#: inputs and the same (rounded) grad_output: (value, d/dinput). Low precision: computed in float32 and
#: rounded once (half an eps) -- log_softmax rounds the row's sum and its log to the dtype first, as
#: ATen's last-dim kernel does, so two roundings, times max(1, |value|). float32: an exp of an exact
#: argument, a sum in double, one rounding of 1/s and of the product (tests/ops/cpu/test_row_accuracy.py
#: has the bounds at up to 1e6 classes). Gradients are normwise: y (g - sum g y) cancels.
BOUNDS = {
    "softmax": (1, 1.5), "log_softmax": (2, 2), "entropy_logits": (1, 1.5), "entropy_probs": (1, 1.5),
}
F32_BOUNDS = {"softmax": (4, 4), "log_softmax": (4, 4), "entropy_logits": (8, 8), "entropy_probs": (4, 4)}


def _within_bounds_of_float64(name, x, dim):
    """Values and gradients of the compiled kernel on ``x`` (float32 or lower) within the fixed bounds
    above of the float64 truth (torch's formula in float64 on the same values)."""
    fn, ref = ROWS[name]
    if ref is None:  # entropy: the formula in float64
        logits = name == "entropy_logits"
        ref = lambda a, dim: _entropy_reference(a, dim, logits)  # noqa: E731
    value = fn(x, dim=dim, impl="compiled")
    go = _randn(value.shape, seed=1, scale=1.0).to(x.dtype)  # the same rounded grad_output for both
    ours = loss_and_grads(_unary(fn, dim=dim, impl="compiled"), x, _NO_TARGET, grad_output=go)[:2]
    truth = loss_and_grads(_unary(ref, dim=dim), x.double(), _NO_TARGET, grad_output=go.double())[:2]
    bounds = F32_BOUNDS[name] if x.dtype == torch.float32 else BOUNDS[name]
    floors = (1 if name == "log_softmax" else None, truth[1].abs().max().item())
    for what, a, t, n, floor in zip(("value", "d/dinput"), ours, truth, bounds, floors):
        assert a.dtype == x.dtype, what
        assert_within_eps(a, t, n, floor=floor, msg=f"{name} {what}")


def _check_rows(name, x, dim, dtype=None):
    """Compiled == torch path == torch, values and gradients."""
    fn, ref = ROWS[name]
    ours = _results(fn, x, dim=dim, impl="compiled")
    assert_same_results(ours, _results(fn, x, dim=dim, impl="torch"), dtype=dtype)
    if ref is not None:
        assert_same_results(ours, _results(ref, x, dim=dim), dtype=dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("name", ROWS)
@pytest.mark.parametrize("shape,dim", [((7,), 0), ((4, 7), -1), ((4, 7), 0), ((2, 5, 3), 1), ((2, 3, 5), -1),
                                       ((2, 3, 4, 5), 2)], ids=str)
def test_rows_match_torch_path_and_torch(name, shape, dim, dtype):
    _check_rows(name, _row_input(name, shape, dim, dtype), dim)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_dtype_argument(name):
    fn, ref = ROWS[name]
    for x_dtype, out_dtype in ((torch.float32, torch.float64), (torch.float64, torch.float32),
                               (torch.bfloat16, torch.float32)):
        x = _randn((3, 11), x_dtype)
        ours = _results(fn, x, dim=1, dtype=out_dtype, impl="compiled")
        assert ours[0].dtype == out_dtype and ours[1].dtype == x_dtype
        assert_same_results(ours, _results(ref, x, dim=1, dtype=out_dtype), dtype=out_dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", ROWS)
@pytest.mark.parametrize("shape,dim", [((16, 301), -1), ((4, 21, 30), 1), ((40, 5), -1)], ids=str)
def test_low_precision_within_eps_of_float64(name, shape, dim, dtype):
    # no zero probabilities: torch's xlogy gradient there is infinite (losskit's is 0 by definition)
    _within_bounds_of_float64(name, _row_input(name, shape, dim, dtype, zeros=False), dim)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_log_softmax_along_the_last_dim_is_torchs_to_the_bit(dtype):
    # ATen's last-dim kernel rounds each row's sum and its log to the storage dtype; the kernel does too
    # (rows of 301: the row path; rows of 5: column tiles).
    for shape in ((64, 301), (37, 5)):
        x = _randn(shape, dtype)
        for a, b in zip(_results(LF.log_softmax, x, dim=-1, impl="compiled"), _results(F.log_softmax, x, dim=-1)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ROWS)
@pytest.mark.parametrize("shape", [(1, 1), (9, 1), (1, 13), (37, 5), (4, 1031), (3, 16), (3, 17), (1, 3, 5),
                                   (2, 4096, 9), (2, 4097, 3)], ids=str)
def test_odd_sizes(name, shape):
    """C = 1, prime C, N = 1, C a multiple of the vector width and one past it; rows shorter than 16
    and (N, C, L > 1) inputs run in column tiles (up to C = 4096), others row by row."""
    _check_rows(name, _row_input(name, shape, 1), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ROWS)
def test_rows_larger_than_the_caches(name, dtype):
    # C = 300007: a float32 row is 1.2 MiB, beyond a 1 MiB L2; the later passes re-read it. Fixed bounds
    # from float64, the same at any C (torch's own float32 softmax is 17 eps off here).
    _within_bounds_of_float64(name, _row_input(name, (2, 300_007), 1, dtype, zeros=False), 1)


@pytest.mark.parametrize("name", ROWS)
def test_non_contiguous_inputs(name):
    base = _row_input(name, (9, 14), 1)
    views = {
        "transposed": (base.t().contiguous().t(), 1),  # row stride 1, entry stride 9
        "strided": (base[::2, ::2], 1),
        "dim0_of_transposed": (base.t(), 0),
        "channels_last": (_row_input(name, (2, 4, 5, 3), 3).permute(0, 3, 1, 2), 1),
        "expanded": (base[:1].expand(6, 14), 1),  # row stride 0
    }
    for what, (x, dim) in views.items():
        assert not x.is_contiguous(), what
        _check_rows(name, x, dim)


def test_softmax_backward_of_strided_and_expanded_grad_outputs():
    x = _randn((5, 12)).requires_grad_()
    for fn, ref in (ROWS["softmax"], ROWS["log_softmax"]):
        for grad in (_randn((12, 5), seed=3).t(), torch.ones(()).double().expand(5, 12)):
            ours = torch.autograd.grad(fn(x, 1, impl="compiled"), x, grad)[0]
            assert_close(ours, torch.autograd.grad(ref(x, 1), x, grad)[0])
        ours = torch.autograd.grad(fn(x, 1, impl="compiled").sum(), x)[0]  # grad_output: expanded ones
        assert_close(ours, torch.autograd.grad(ref(x, 1).sum(), x)[0])


def test_non_finite_inputs_match_torch_path():
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[0.0, 0.0, -inf], [1e4, -1e4, 1e4], [-inf, -inf, -inf], [0.0, inf, 1.0], [3.0, nan, 1.0]],
                     dtype=torch.float64)
    for name in ("softmax", "log_softmax", "entropy_logits"):
        _check_rows(name, x, 1)
    p = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.5, nan, 0.5], [-0.5, 1.5, 0.0], [1e-310, 1.0, 0.0]],
                     dtype=torch.float64)
    _check_rows("entropy_probs", p, 1)


def test_empty_inputs():
    for name in ROWS:
        # entropy refuses an empty distribution dim (tests/functional/test_divergence.py)
        for shape in ((0, 5), (2, 3, 0)) if name.startswith("entropy") else ((0, 5), (3, 0, 2), (2, 3, 0)):
            fn, x = ROWS[name][0], torch.zeros(shape)
            ours, ref = _results(fn, x, dim=1, impl="compiled"), _results(fn, x, dim=1, impl="torch")
            assert [t.shape for t in ours] == [t.shape for t in ref], (name, shape)
    for name in ("softmax", "log_softmax"):  # a 0-dim input is its own one-entry distribution
        _check_rows(name, torch.tensor(2.5, dtype=torch.float64), 0)


def test_threads_split_rows_without_changing_a_bit():
    """The row split over threads is invisible: each row is computed whole by one thread."""
    x, g = _randn((11, 37, 3)), _randn((11, 37, 3), seed=1)
    p = _probs((11, 37, 3), 1)

    def entropy(out, threads):  # the entropies (11, 3) in out[0, :, 0], the gradient in out[1]
        h = torch.empty(11, 3, dtype=torch.float64)
        native_softmax.entropy_rows(p, h, out[1], logits=False, threads=threads)
        out[0, :, 0] = h

    calls = {
        "softmax": lambda out, th: native_softmax.softmax_rows(x, out[0], log=False, threads=th),
        "log_softmax_backward": lambda out, th: native_softmax.softmax_backward_rows(x, g, out[0], log=True,
                                                                                     threads=th),
        "entropy": entropy,
    }
    for name, call in calls.items():
        outs = []
        for threads in (1, 2, 3, 11, 64):
            out = torch.zeros(2, 11, 37, 3, dtype=torch.float64)
            call(out, threads)
            outs.append(out)
        for out in outs[1:]:
            assert torch.equal(out, outs[0]), name
    t = torch.randint(0, 37, (33,), generator=_gen(2))
    t[::4] = -100
    nll = []
    for threads in (1, 2, 5, 64):
        loss, grad = torch.empty(11, 3, dtype=torch.float64), torch.empty(11, 37, 3, dtype=torch.float64)
        native_softmax.nll_rows(x, t, grad, torch.rand(37, dtype=torch.float64, generator=_gen(3)), loss,
                                ignore_index=-100, scale=0.25, threads=threads)
        nll.append((loss, grad))
    for loss, grad in nll[1:]:
        assert torch.equal(loss, nll[0][0]) and torch.equal(grad, nll[0][1])


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_gradcheck_and_double_backward(name):
    fn = ROWS[name][0]
    x = _randn((3, 5), scale=1.0).requires_grad_()
    assert gradcheck(lambda a: fn(a, 1, impl="compiled"), [x])
    # create_graph: the backward runs in torch ops and is differentiable again.
    assert torch.autograd.gradgradcheck(lambda a: fn(a, 1, impl="compiled"), [x])


def test_entropy_gradcheck_compiled():
    x = _randn((3, 5), scale=1.0).requires_grad_()
    assert gradcheck(lambda a: LF.entropy(a, 0, logits=True, impl="compiled"), [x])
    p = _probs((3, 5), 1).clamp_min(0.05).requires_grad_()
    assert gradcheck(lambda a: LF.entropy(a, 1, impl="compiled"), [p])


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), data=st.data(), name=st.sampled_from(list(ROWS)),
       seed=st.integers(0, 2**16))
def test_property_compiled_equals_torch_path(shape, data, name, seed):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    _check_rows(name, _row_input(name, tuple(shape), dim, seed=seed), dim)


# --- nll_loss ---------------------------------------------------------------------------------------------


def _nll_inputs(shape, dtype=torch.float64, seed=0, ignore_index=-100):
    cd = 0 if len(shape) == 1 else 1
    x = _randn(shape, torch.float64, seed).log_softmax(cd).to(dtype)
    t = torch.randint(0, shape[cd], shape[:cd] + shape[cd + 1:], generator=_gen(seed + 1))
    if t.numel() > 2:
        t.view(-1)[::3] = ignore_index
    w = (torch.rand(shape[cd], generator=_gen(seed + 2), dtype=torch.float64) + 0.5).to(dtype)
    return x, t, w


def _nll_check(x, t, w=None, dtype=None, **kw):
    ours = loss_and_grads(LF.nll_loss, x, t, w, impl="compiled", **kw)
    assert_same_results(ours, loss_and_grads(LF.nll_loss, x, t, w, impl="torch", **kw), dtype=dtype)
    assert_same_results(ours, loss_and_grads(F.nll_loss, x.contiguous(), t, w, **kw), dtype=dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(7,), (6, 7), (3, 7, 2, 3), (2, 5, 40)], ids=str)
def test_nll_matches_torch_path_and_torch(shape, weighted, reduction, dtype):
    x, t, w = _nll_inputs(shape, dtype)
    _nll_check(x, t, w if weighted else None, reduction=reduction)
    _nll_check(x, t.clamp_min(0), w if weighted else None, ignore_index=1, reduction=reduction)


@pytest.mark.parametrize("shape", [(1, 1), (9, 1), (1, 13), (4, 1031), (2, 300_007), (1, 3, 5000)], ids=str)
def test_nll_odd_sizes(shape):
    x, t, w = _nll_inputs(shape, torch.float32)
    _nll_check(x, t, w)


def test_nll_non_contiguous_and_low_precision():
    x, t, w = _nll_inputs((9, 14))
    xk = _randn((2, 3, 7, 4)).log_softmax(3).permute(0, 3, 1, 2)  # (2, C=4, 3, 7), classes innermost
    tk = torch.randint(0, 4, (2, 3, 7), generator=_gen(5))
    for xx, tt in ((x.t().contiguous().t(), t), (x[::2, ::2], t[::2].clamp(max=6)), (xk, tk),
                   (x[:1].expand(9, 14), t)):
        assert not xx.is_contiguous()
        _nll_check(xx, tt, reduction="none")
        _nll_check(xx, tt)
    for dtype in LOW:
        xl = x.to(dtype)
        go = torch.tensor(0.75, dtype=dtype)  # exact in the dtype, so both sides get the same
        ours = loss_and_grads(LF.nll_loss, xl, t, w.to(dtype), impl="compiled", grad_output=go)
        truth = loss_and_grads(F.nll_loss, xl.double(), t, w.to(dtype).double(), grad_output=go.double())
        # the weighted mean: a float32 sum of 9 products rounded once; gradients -w_y go / sum w rounded once
        for what, a, c in zip(("loss", "d/dinput"), ours[:2], truth[:2]):
            assert a.dtype == dtype
            assert_within_eps(a, c, 1, floor=c.abs().max().item(), msg=f"{dtype} {what}")


def test_nll_no_gradient_and_empty():
    x, t, w = _nll_inputs((5, 8))
    with torch.no_grad():
        assert_close(LF.nll_loss(x.requires_grad_(), t, w, impl="compiled"), F.nll_loss(x, t, w))
    for shape, tshape in (((0, 5), (0,)), ((2, 5, 0), (2, 0))):
        for reduction in ("none", "sum"):
            _nll_check(torch.zeros(shape, dtype=torch.float64), torch.zeros(tshape, dtype=torch.long),
                       reduction=reduction)


def test_nll_out_of_range_targets_never_reach_memory():
    x = torch.randn(4, 5, dtype=torch.float64).log_softmax(1)
    for bad, row in ((5, 1), (-1, 3), (1 << 40, 2)):  # rows 2 and 3 belong to the second thread
        t = torch.tensor([0, 1, 2, 3])
        t[row] = bad
        with pytest.raises(ValueError, match="target"):
            LF.nll_loss(x, t, impl="compiled")
        # Called directly, past the loss's checks: the kernel refuses the row instead of indexing with it.
        for grad in (torch.empty(4, 5, 1, dtype=torch.float64), None):
            with pytest.raises(ValueError, match="target contains a class index outside"):
                native_softmax.nll_rows(x.unsqueeze(-1), t, grad, None, torch.empty(4, 1, dtype=torch.float64),
                                        ignore_index=-100, scale=1.0, threads=2)


# --- impl selection, modules, the wrapper's checks -----------------------------------------------------------


def test_auto_picks_compiled_on_cpu_and_equals_it():
    x, t, _ = _nll_inputs((5, 9))
    assert _dispatch.backend("nll_rows", "auto", x, t) == _dispatch.backend("softmax_rows", "auto", x) == "cpu"
    for name, (fn, _) in ROWS.items():
        xx = _row_input(name, (5, 9), 1)
        for a, b in zip(_results(fn, xx, dim=1), _results(fn, xx, dim=1, impl="compiled")):
            _identical(a, b, name)
    for a, b in zip(loss_and_grads(LF.nll_loss, x, t), loss_and_grads(LF.nll_loss, x, t, impl="compiled")):
        assert a is b is None or torch.equal(a, b)


def test_auto_leaves_torch_func_transforms_on_the_torch_path():
    # vmap/grad wrap tensors without a data pointer for the kernel; "auto" runs torch there, as before.
    x = _randn((3, 4, 5))
    for fn, ref in (ROWS["softmax"], ROWS["log_softmax"]):
        assert_close(torch.func.vmap(lambda a: fn(a, -1))(x), torch.func.vmap(lambda a: ref(a, -1))(x))
        grads = [torch.func.grad(lambda a, f=f: (f(a, 1) * x).sum())(x) for f in (fn, ref)]
        assert_close(*grads)


def test_impl_is_validated_and_missing_extension_falls_back(monkeypatch):
    x, t, _ = _nll_inputs((4, 6))
    calls = [lambda impl: LF.softmax(x, 1, impl=impl), lambda impl: LF.log_softmax(x, 1, impl=impl),
             lambda impl: LF.entropy(x, impl=impl), lambda impl: LF.nll_loss(x, t, impl=impl)]
    for call in calls:
        with pytest.raises(ValueError, match="impl"):
            call("fast")
    expected = [call("torch") for call in calls]
    monkeypatch.setitem(native._loaded, native_softmax.EXTENSION, ImportError("No module named '_native_softmax'"))
    for call, value in zip(calls, expected):
        with pytest.raises(ImportError, match="impl='compiled'.*_native_softmax"):
            call("compiled")
        _identical(call("auto"), value)


def test_modules_pass_impl_through():
    x, t, w = _nll_inputs((5, 8))
    modules = [(lambda impl: LN.Softmax(1, impl=impl), lambda a, impl: LF.softmax(a, 1, impl=impl)),
               (lambda impl: LN.LogSoftmax(1, impl=impl), lambda a, impl: LF.log_softmax(a, 1, impl=impl)),
               (lambda impl: LN.Entropy(logits=True, impl=impl), lambda a, impl: LF.entropy(a, logits=True, impl=impl))]
    for module, fn in modules:
        for impl in ("torch", "compiled"):
            ours = loss_and_grads(lambda a, _t: module(impl)(a), x, _NO_TARGET)
            for a, b in zip(ours, loss_and_grads(lambda a, _t: fn(a, impl), x, _NO_TARGET)):
                assert a is b is None or torch.equal(a, b)
    for impl in ("torch", "compiled"):
        ours = loss_and_grads(lambda a, b: LN.NLLLoss(w, impl=impl)(a, b), x, t)
        for a, b in zip(ours, loss_and_grads(LF.nll_loss, x, t, w, impl=impl)):
            assert a is b is None or torch.equal(a, b)
    with pytest.raises(ValueError, match="impl"):
        LN.Softmax(1, impl="fast")(x)


def test_wrapper_operands_are_checked():
    x = torch.randn(3, 4, 2)
    good_out = torch.empty(3, 4, 2)
    bad_softmax = [
        (x, torch.empty(3, 5, 2)),  # output of another shape
        (x, torch.empty(3, 2, 4).transpose(1, 2)),  # non-contiguous output
        (x.long(), good_out),  # integer input
        (x[0], good_out[0]),  # not (N, C, L)
        (x, good_out.long()),  # integer output
    ]
    for args in bad_softmax:
        with pytest.raises(ValueError, match="native_softmax operand"):
            native_softmax.softmax_rows(*args, log=False)
    with pytest.raises(ValueError, match="native_softmax operand g"):
        native_softmax.softmax_backward_rows(x, torch.randn(3, 4, 1), good_out, log=True)
    with pytest.raises(ValueError, match="native_softmax operand per_row"):
        native_softmax.entropy_rows(x, torch.empty(3, 2, dtype=torch.float64), None, logits=True)
    with pytest.raises(ValueError, match="native_softmax operand per_row"):
        native_softmax.entropy_rows(x, torch.empty(3, 1), None, logits=True)
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    loss = torch.empty(3, 2)
    bad_nll = [
        (x, t.int(), None, None, loss),  # int32 targets
        (x, t[:4], None, None, loss),  # too few targets
        (x, t, None, None, torch.empty(3, 2, dtype=torch.float64)),  # loss in the wrong dtype
        (x, t, torch.empty(3, 4, 3), None, loss),  # gradient of another shape
        (x, t, torch.empty(3, 2, 4).transpose(1, 2), None, loss),  # non-contiguous gradient
        (x, t, None, torch.ones(5), loss),  # weight of another length
    ]
    for args in bad_nll:
        with pytest.raises(ValueError, match="native_softmax operand"):
            native_softmax.nll_rows(*args, ignore_index=-100, scale=1.0)
    with pytest.raises(ValueError, match="invalid sizes"):  # no classes: refused by the kernel's size check
        native_softmax.nll_rows(torch.empty(3, 0, 2), t, None, None, loss, ignore_index=-100, scale=1.0)


def _transposed(t):
    """``t`` (2-D) with the same values and entries ``t.shape[0]`` apart: the kernels' float-row path."""
    return t.t().contiguous().t()


def _within_one_bf16_step(actual, expected, what, equal=0.98):
    """The same NaNs and infinities, every finite entry within one bfloat16 step of ``expected`` (both
    bfloat16; a floor of 2^-16 of the largest entry where a gradient cancels), at least the fraction
    ``equal`` of them equal: a misplaced element is far off."""
    a, b = actual.double(), expected.double()
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), what
    finite = b.isfinite()
    a, b = a[finite], b[finite]
    step = torch.exp2(torch.floor(torch.log2(b.abs().clamp_min(1e-30))) - 7)
    diff = (a - b).abs()
    assert (diff <= torch.maximum(step, b.abs().max() * 2.0**-16)).all(), f"{what}: max diff {diff.max().item()}"
    assert (diff == 0).double().mean() >= equal, f"{what}: {(diff != 0).sum().item()} of {diff.numel()} differ"


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "entropy_logits"])
@pytest.mark.parametrize("shape", [(3, 16), (3, 17), (5, 31), (2, 1031), (2, 4099)], ids=str)
def test_bfloat16_pair_rows_match_the_float_row_path(name, shape):
    """Contiguous bfloat16 rows (every operand) run on even/odd pairs, 16 elements a block, the C % 16
    tail (0, 1, 15, 7, 3) in element order; the same values with entries strided (input and
    grad_output) run on float rows. Values and gradients agree to one bfloat16 step (the pair path's
    exp is of bfloat16 grade and its sums add in another order), and both are within the fixed bounds."""
    fn = ROWS[name][0]
    x = _row_input(name, shape, 1, torch.bfloat16)
    go = _randn(shape if name != "entropy_logits" else shape[:1], torch.bfloat16, seed=5, scale=1.0)
    pairs = loss_and_grads(_unary(fn, dim=-1, impl="compiled"), x, _NO_TARGET, grad_output=go)[:2]
    rows = loss_and_grads(_unary(fn, dim=-1, impl="compiled"), _transposed(x), _NO_TARGET,
                          grad_output=_transposed(go) if go.dim() == 2 else go)[:2]
    for what, a, b in zip(("value", "d/dinput"), pairs, rows):
        _within_one_bf16_step(a, b, f"{name} {shape} {what}")
    _within_bounds_of_float64(name, x, -1)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "entropy_logits"])
def test_bfloat16_pair_rows_with_non_finite_entries(name):
    # C = 37: two blocks of 16 and a tail of 5; NaN, +inf and -inf in a block and in the tail, a row of
    # -inf, and large logits: the same values, NaNs and infinities as the torch path
    inf, nan = float("inf"), float("nan")
    x = _randn((8, 37), torch.float64, seed=4)
    x[0, 3] = nan
    x[1, 34] = nan
    x[2, [0, 5, 17, 33, 36]] = -inf
    x[3, 20] = inf
    x[4] = -inf
    x[5, 35] = inf
    x[6] *= 1e4
    x[7, :36] = -inf
    x = x.bfloat16()
    ours = _results(ROWS[name][0], x, dim=1, impl="compiled")
    theirs = _results(ROWS[name][0], x, dim=1, impl="torch")
    for a, b in zip(ours, theirs):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
    assert_same_results(ours, theirs)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "entropy_logits"])
def test_bfloat16_along_another_dim_stays_on_float_rows(name):
    # dim 1 of (2, 4100, 3): rows of C = 4100 > 4096 with entries 3 apart run row by row, converted to
    # float rows: the result is the float32 computation rounded to bfloat16, to the bit
    fn = ROWS[name][0]
    x = _row_input(name, (2, 4100, 3), 1, torch.bfloat16)
    assert torch.equal(fn(x, 1, impl="compiled"), fn(x.float(), 1, impl="compiled").bfloat16())
    _within_bounds_of_float64(name, x, 1)


def test_bfloat16_entropy_of_probabilities_logs_through_a_mantissa_table():
    # bfloat16 probabilities are 2^e (1 + k / 128): their log is a table entry plus e log 2. Rows of 37
    # (vectors of 8 and a tail of 5); the kernel on the same values as float32 uses the polynomial log.
    p = _probs((6, 37), 1, torch.bfloat16, seed=7)
    h, g = torch.empty(6, 1), torch.empty(6, 37, 1, dtype=torch.bfloat16)
    h32, g32 = torch.empty(6, 1), torch.empty(6, 37, 1)
    native_softmax.entropy_rows(p.view(6, 37, 1), h, g, logits=False)
    native_softmax.entropy_rows(p.float().view(6, 37, 1), h32, g32, logits=False)
    assert_close(h, h32)
    _within_one_bf16_step(g, g32.bfloat16(), "entropy gradient")
    # vectors holding a value that is not a positive normal number or 0 (subnormal, negative, inf, NaN)
    # take the polynomial log: values, NaNs and infinities as the torch path
    inf, nan = float("inf"), float("nan")
    q = _probs((5, 37), 1, seed=8)
    q[0, 3], q[1, 34], q[2, 9], q[3, 20], q[4, 35] = 1e-39, -0.25, inf, nan, 1e-39
    q = q.bfloat16()
    ours, theirs = _results(ROWS["entropy_probs"][0], q, dim=1, impl="compiled"), _results(
        ROWS["entropy_probs"][0], q, dim=1, impl="torch")
    for a, b in zip(ours, theirs):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
    assert_same_results(ours, theirs)


def test_bfloat16_pair_backward_with_non_finite_and_huge_grad_outputs():
    # softmax's backward skips the NaN fix-up of its rounding when d = sum(g y) is below 1e36; grad_outputs
    # with NaN, infinities and values near bfloat16's largest (3.39e38, against exact zeros of y) must
    # give the NaNs, infinities and values of the float rows (the same grad_output with strided entries)
    x = _randn((6, 37), torch.float64, seed=9)
    x[2, [1, 18, 36]] = -float("inf")  # y = 0 exactly there
    y = torch.softmax(x, 1).bfloat16()
    g = _randn((6, 37), torch.float64, seed=10, scale=1.0)
    g[0, 3] = float("nan")
    g[1, 20] = float("inf")
    g[2, [1, 18, 36]] = 3.3e38
    g[3, 35] = -float("inf")
    g[4, 5], g[4, 6] = 3.3e38, -3.3e38
    g[5] *= 1e37
    g = g.bfloat16()
    for log in (False, True):
        out = [torch.empty(6, 37, 1, dtype=torch.bfloat16) for _ in range(2)]
        yl = y.float().log().bfloat16() if log else y
        native_softmax.softmax_backward_rows(yl.view(6, 37, 1), g.view(6, 37, 1), out[0], log=log)
        native_softmax.softmax_backward_rows(yl.view(6, 37, 1), _transposed(g).view(6, 37, 1), out[1], log=log)
        # log_softmax's rows scaled by 1e37: exp(y) sum(g) cancels against g, and the two exps' grades
        # (bfloat16 on pairs, float on float rows) show in most entries, within one step
        _within_one_bf16_step(out[0], out[1], f"log={log}", equal=0.5 if log else 0.98)


def _every_bf16_pattern(rows):
    """All 65536 bfloat16 bit patterns (NaNs, infinities, zeros, subnormals, negatives) as ``rows`` rows."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).view(rows, -1)


def _bits(t):
    return t.contiguous().view(torch.int16)


@pytest.mark.parametrize("cols", [16, 37, 4099], ids=str)
def test_bfloat16_entropy_of_probabilities_on_pairs_is_the_float_rows_to_the_bit(cols):
    """Contiguous bfloat16 probabilities read p log p and the gradient -(log p + 1) from tables over the
    65536 bit patterns, built by the float rows' own expressions; the sum adds the same terms in the same
    lanes and order. Against the same values with strided entries (float rows): entropies and gradients
    equal bit for bit, over every bit pattern (rows of 16: whole vectors) and over probabilities with
    zeros and non-finite entries in blocks and in the C % 8 tail."""
    def both(p):
        n, c = p.shape
        out = []
        for q in (p, _transposed(p)):
            h, g = torch.empty(n, 1), torch.empty(n, c, 1, dtype=torch.bfloat16)
            native_softmax.entropy_rows(q.unsqueeze(-1), h, g, logits=False)
            h2 = torch.empty(n, 1)
            native_softmax.entropy_rows(q.unsqueeze(-1), h2, None, logits=False)  # no gradient: its own loop
            _identical(h, h2)
            out.append((h, g))
        return out

    every = _every_bf16_pattern(65536 // 16) if cols == 16 else _every_bf16_pattern(16)[:, :cols]
    p = _probs((9, cols), 1, torch.bfloat16, seed=11)
    p[1, 5], p[2, cols - 1], p[3, 7], p[4, cols - 2], p[5, 0] = float("nan"), float("inf"), -0.5, 1e-39, 1.0
    p[6] = 0.0
    for x in (every, p):
        (h, g), (h_rows, g_rows) = both(x)
        assert torch.equal(_bits(g), _bits(g_rows))
        _identical(h, h_rows)


def test_bfloat16_log_softmax_backward_on_pairs_reads_exp_from_a_table():
    """log_softmax's backward on contiguous bfloat16 rows reads exp(y) from a table over y's 65536 bit
    patterns, built by the float rows' own exp: with grad_outputs whose row sums are exact in any order
    (small integers), the input gradient equals the float rows' (strided entries) bit for bit over every
    bit pattern of y, NaNs and infinities included (rows of 64: whole pair blocks); and a C % 16 tail."""
    for y in (_every_bf16_pattern(1024), _every_bf16_pattern(16)[:, :4099]):
        g = torch.randint(-4, 5, y.shape, generator=_gen(12)).bfloat16()
        out = [torch.empty(*y.shape, 1, dtype=torch.bfloat16) for _ in range(2)]
        native_softmax.softmax_backward_rows(y.unsqueeze(-1), g.unsqueeze(-1), out[0], log=True)
        native_softmax.softmax_backward_rows(_transposed(y).unsqueeze(-1), _transposed(g).unsqueeze(-1), out[1],
                                             log=True)
        assert torch.equal(_bits(out[0]), _bits(out[1]))


def test_bfloat16_log_softmax_sums_exp_from_a_double_table():
    """log_softmax's forward on contiguous bfloat16 rows sums exp(x) read from a table of every bit
    pattern's exp in double, times exp(-max), when the row's sum lies in [2^-960, 2^1000] (logits within
    about +-660), else computes the exps as before. Rows on both sides of those bounds, with -inf entries,
    NaN and +inf (C = 301: blocks of 32 and a tail; C = 16): the outputs and gradients are torch's to the
    bit (the sum rounded to bfloat16, as ATen rounds it), and NaNs and infinities are the float rows'."""
    for c in (301, 16):
        x = _randn((12, c), torch.float64, seed=13)
        x += torch.tensor([-1e4, -700.0, -665.0, -640.0, -30.0, 0.0, 30.0, 640.0, 665.0, 700.0, 1e4, 0.0])[:, None]
        x[4, [0, c - 1]] = -float("inf")
        x[11, 3] = float("nan") if c == 301 else float("inf")
        x = x.bfloat16()
        ours = _results(LF.log_softmax, x, dim=-1, impl="compiled")
        for a, b in zip(ours, _results(F.log_softmax, x, dim=-1)):
            _identical(a, b)
        rows = torch.empty(12, c, 1, dtype=torch.bfloat16)
        native_softmax.softmax_rows(_transposed(x).unsqueeze(-1), rows, log=True)
        _within_one_bf16_step(ours[0], rows.squeeze(-1), f"C={c}")
