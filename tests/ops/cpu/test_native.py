"""The compiled row kernels (impl="compiled") against the pure-torch path (impl="torch") and torch itself."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import losskit.functional as LF
from losskit.ops import _dispatch
from losskit.ops.cpu import native
from losskit.testing import assert_close, assert_within_eps, gradcheck, measure_peaks_in_child

# Every option of the row family: (loss, kwargs, target kind). "index_ignored" puts ignore_index on
# every third position.
CASES = [
    (LF.cross_entropy, {}, "index"),
    (LF.cross_entropy, {"weight": True}, "index_ignored"),
    (LF.cross_entropy, {"label_smoothing": 0.15}, "index_ignored"),
    (LF.cross_entropy, {"weight": True, "label_smoothing": 0.3}, "index"),
    (LF.cross_entropy, {"ignore_index": 2}, "index"),
    (LF.cross_entropy, {}, "prob"),
    (LF.cross_entropy, {"weight": True, "label_smoothing": 0.2}, "prob"),
    (LF.focal_loss, {"gamma": 2.0}, "index_ignored"),
    (LF.focal_loss, {"gamma": 0.5, "weight": True}, "index"),
]
CASE_IDS = [f"{fn.__name__}-{'-'.join(kw)}-{kind}" for fn, kw, kind in CASES]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(shape, kind, dtype=torch.float64, seed=0, ignore_index=-100):
    """Logits, a target of ``kind`` and class weights for an input of ``shape`` (classes on dim 1, or 0)."""
    cd = 0 if len(shape) == 1 else 1
    x = torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * 3
    if kind == "prob":
        t = torch.randn(shape, generator=_gen(seed + 1), dtype=torch.float64).softmax(cd).to(dtype)
    else:
        tshape = shape[:cd] + shape[cd + 1:]
        t = torch.randint(0, shape[cd], tshape, generator=_gen(seed + 1))
        if kind == "index_ignored" and t.numel() > 1:
            t.view(-1)[::3] = ignore_index
    w = torch.rand(shape[cd], generator=_gen(seed + 2), dtype=torch.float64) + 0.5
    return x.to(dtype), t, w.to(dtype)


def _run(fn, x, t, *, grad_dtype=None, **kwargs):
    """(loss, d/dx, d/dt) of ``fn`` for a fixed random grad_output, rounded to ``grad_dtype`` (default: the
    loss's dtype; a float64 truth takes the low-precision run's grad_output this way)."""
    x = x.detach().clone().requires_grad_()
    tt = t.detach().clone().requires_grad_() if t.is_floating_point() else t
    loss = fn(x, tt, **kwargs)
    go = torch.randn(loss.shape, generator=_gen(9), dtype=torch.float64).to(grad_dtype or loss.dtype)
    loss.backward(go.to(loss.dtype))
    return loss.detach(), x.grad, tt.grad if t.is_floating_point() else None


def _close(ours, ref, dtype=None):
    for name, a, b in zip(("loss", "d/dinput", "d/dtarget"), ours, ref):
        if b is None:
            assert a is None, name
        else:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert_close(a, b, dtype=dtype, msg=name)


def _kwargs(kw, w):
    return {**kw, "weight": w} if kw.get("weight") is True else kw


def _torch_kwargs(fn, kw):
    """focal_loss has no torch counterpart: compare it with losskit's torch path only."""
    return None if fn is LF.focal_loss else kw


@pytest.mark.parametrize(("fn", "kw", "kind"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", [(7,), (6, 7), (3, 7, 2, 3)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_compiled_matches_torch_path_and_torch(fn, kw, kind, shape, reduction, dtype):
    x, t, w = _inputs(shape, kind, dtype, ignore_index=kw.get("ignore_index", -100))
    kw = {**_kwargs(kw, w), "reduction": reduction}
    ours = _run(fn, x, t, impl="compiled", **kw)
    _close(ours, _run(fn, x, t, impl="torch", **kw))
    if _torch_kwargs(fn, kw) is not None:
        _close(ours, _run(F.cross_entropy, x, t, **kw))


def test_auto_picks_compiled_on_cpu_and_equals_it():
    x, t, _ = _inputs((5, 9), "index")
    assert _dispatch.backend("xent_rows", "auto", x, t) == "cpu"
    for a, b in zip(_run(LF.cross_entropy, x, t), _run(LF.cross_entropy, x, t, impl="compiled")):
        assert a is b is None or torch.equal(a, b)


@pytest.mark.parametrize("shape", [(1, 1), (9, 1), (1, 13), (4, 1031), (2, 8), (3, 17), (1, 3, 5)], ids=str)
@pytest.mark.parametrize(("fn", "kw", "kind"), CASES, ids=CASE_IDS)
def test_odd_sizes(shape, fn, kw, kind):
    """C = 1, prime C, N = 1, C a multiple of the vector width and one past it."""
    x, t, w = _inputs(shape, kind, ignore_index=kw.get("ignore_index", -100) if shape[1] > 2 else -100)
    kw = _kwargs({k: v for k, v in kw.items() if k != "ignore_index" or shape[1] > 2}, w)
    _close(_run(fn, x, t, impl="compiled", **kw), _run(fn, x, t, impl="torch", **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rows_larger_than_the_caches(dtype):
    # One row of 1.2 MiB float32 (2.4 MiB float64) does not fit the 512 KiB L2: the later passes re-read it.
    x, t, w = _inputs((2, 300_007), "index", dtype)
    for kw in ({}, {"weight": w, "label_smoothing": 0.1}):
        _close(_run(LF.cross_entropy, x, t, impl="compiled", **kw), _run(F.cross_entropy, x, t, **kw))


def test_non_contiguous_inputs_and_targets():
    base, t, _ = _inputs((9, 14), "index")
    p = torch.randn(9, 14, generator=_gen(4), dtype=torch.float64).softmax(0)
    views = {
        "transposed": (base.t().contiguous().t(), t),  # class stride N, not 1
        "strided": (base[::2, ::2], t[::2].clamp(max=6)),  # both strides doubled, C = 7
        # (1, C, H, W) with the classes innermost in memory (class stride 1, positions strided)
        "channels_last": (torch.randn(1, 3, 4, 9, generator=_gen(5), dtype=torch.float64).permute(0, 3, 1, 2),
                          torch.randint(0, 9, (1, 3, 4), generator=_gen(5))),
        "prob_transposed": (base.t(), p.t()),  # input and probability target both non-contiguous
        "expanded": (base[:1].expand(9, 14), t),  # row stride 0: every row reads the same memory
    }
    for name, (x, tt) in views.items():
        assert not x.is_contiguous(), name
        for kw in ({}, {"label_smoothing": 0.1}):
            _close(_run(LF.cross_entropy, x, tt, impl="compiled", **kw), _run(F.cross_entropy, x, tt, **kw))


def _grad(x, t, **kw):
    """d/dx of the summed loss for grad_output 1, which backward does not multiply by."""
    x = x.clone().requires_grad_()
    LF.cross_entropy(x, t, impl="compiled", reduction="sum", **kw).backward()
    return x.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradient_is_the_float32_one_rounded_to_nearest_even(dtype):
    # A low-precision row with probability targets is computed as a float32 row (float16: widened, and
    # its gradient rounded to nearest even when stored; bfloat16: read and written in pairs, its sums
    # made in the float32 path's order, see the next test), so its gradient equals torch's rounding of
    # the float32 input's gradient, bit for bit, NaN where NaN (C = 301 is not a multiple of 8 or 16).
    x = torch.randn(16, 301, generator=_gen(3)).to(dtype)
    x[3, 7] = float("nan")
    t = torch.randn(16, 301, generator=_gen(4)).softmax(1).to(dtype)
    low, wide = _grad(x, t), _grad(x.float(), t.float()).to(dtype)
    assert low.dtype == dtype and torch.equal(low.isnan(), wide.isnan()) and low.isnan().any()
    assert torch.equal(low.nan_to_num(), wide.nan_to_num())


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.2}, {"ignore_index": 5}], ids=str)
@pytest.mark.parametrize("c", [16, 301, 4099], ids=str)
def test_bfloat16_rows_read_and_written_in_pairs(kw, c):
    # Index targets without class weights: bfloat16 rows are read and written by the pair-order passes
    # (16 elements at a time, then the C % 16 rest). Their float32 arithmetic sums the row in another
    # order than the float32 input's, so the rounded gradients agree to one bfloat16 step, exactly
    # where rounding leaves no doubt; NaN rows stay NaN.
    x = (torch.randn(24, c, generator=_gen(5)) * 4).bfloat16()
    x[2, c // 2] = float("nan")
    t = torch.randint(0, c, (24,), generator=_gen(6))
    t[3] = 5
    low, wide = _grad(x, t, **kw).float(), _grad(x.float(), t, **kw).bfloat16().float()
    assert torch.equal(low.isnan(), wide.isnan()) and low[2].isnan().all()
    ok = ~wide.isnan()
    low, wide = low[ok], wide[ok]
    assert ((low - wide).abs() <= torch.finfo(torch.bfloat16).eps * wide.abs()).all()
    assert (low == wide).float().mean() > 0.99


def _prob_rows(n, c, seed):
    """bfloat16 logits and probability targets with NaN/inf entries at even and odd positions and in the
    last C % 16 (each in a row of its own, rows 1-7), a row of -inf logits (8), a target row with zeros (9)."""
    x = (torch.randn(n, c, generator=_gen(seed)) * 3).bfloat16()
    t = torch.randn(n, c, generator=_gen(seed + 1)).softmax(1).bfloat16()
    specials = [(x, 1, 0, float("nan")), (x, 2, c - 1, float("inf")), (x, 3, c // 2, float("-inf")),
                (t, 4, c - 1, float("nan")), (t, 5, c // 3, float("inf")), (t, 6, 0, float("-inf")),
                (t, 7, c // 2, -0.25)]
    for tensor, row, col, value in specials:
        tensor[row, col] = value
    x[8] = float("-inf")  # a row of -inf: every e is NaN
    t[9, : c // 2] = 0
    return x, t


def _loss_and_grads(x, t, **kw):
    x, t = x.clone().requires_grad_(), t.clone().requires_grad_()
    loss = LF.cross_entropy(x, t, impl="compiled", **kw)
    loss.sum().backward()
    return loss.detach(), x.grad, t.grad


def _same(a, b, msg):
    assert a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()), msg
    assert torch.equal(a.nan_to_num(), b.nan_to_num()), msg


@pytest.mark.parametrize("kw", [{"reduction": "none"}, {"label_smoothing": 0.2}, {"reduction": "sum", "weight": True}],
                         ids=str)
@pytest.mark.parametrize("c", [1, 2, 15, 16, 17, 31, 32, 33, 47, 307, 4099], ids=str)
def test_bfloat16_probability_targets_in_pairs_equal_the_float32_path_rounded(kw, c):
    # Contiguous bfloat16 x and t are read and written in pairs (class weights copied in pair order),
    # their sums kept per residue of c mod 16 as the float32 path keeps them: the loss, the input's and
    # the target's gradients are the float32 path's on the same values, rounded once to bfloat16, bit for
    # bit, NaN where NaN (C from 1 over the multiples of 16 and their neighbours to primes). Rows 1-9 hold
    # NaN/inf logits and targets, zeros and a negative target.
    n = 12
    x, t = _prob_rows(n, c, seed=c)
    if kw.get("weight") is True:
        w = torch.rand(c, generator=_gen(7)).bfloat16()
        w[c // 2] = 0  # where row 3 has x = -inf: the target's gradient there is 0 * inf, NaN
        kw = {**kw, "weight": w}
    wide_kw = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    low = _loss_and_grads(x, t, **kw)
    wide = _loss_and_grads(x.float(), t.float(), **wide_kw)
    for name, a, b in zip(("loss", "d/dinput", "d/dtarget"), low, wide):
        _same(a, b.bfloat16(), f"{name}, C = {c}")
    if c >= 10:
        assert low[1][0].isfinite().all() and low[1][1].isnan().all() and low[1][4].isnan().all()


def test_bfloat16_probability_target_pairs_split_over_threads_without_changing_a_bit():
    x, t = _prob_rows(40, 301, seed=3)
    outs = []
    for threads in (1, 2, 3):
        loss, grad, tgrad = torch.empty(40, 1), torch.empty(40, 301, 1, dtype=torch.bfloat16), \
            torch.empty(40, 301, 1, dtype=torch.bfloat16)
        native.xent_rows(x.unsqueeze(-1), t.unsqueeze(-1), grad, tgrad, None, loss, ignore_index=-100,
                         label_smoothing=0.1, gamma=0.0, scale=0.25, threads=threads)
        outs.append((loss, grad, tgrad))
    for out in outs[1:]:
        for a, b in zip(out, outs[0]):
            _same(a, b, "threads")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["index_ignored", "prob"])
def test_low_precision_within_eps_of_float64(dtype, kind):
    x64, t, w = _inputs((16, 301), kind)
    t_low = t.to(dtype) if kind == "prob" else t
    kw = {"weight": w.to(dtype), "label_smoothing": 0.1}
    ours = _run(LF.cross_entropy, x64.to(dtype), t_low, impl="compiled", **kw)
    truth = _run(F.cross_entropy, x64.to(dtype).double(), t_low.double() if kind == "prob" else t,
                 weight=w.to(dtype).double(), label_smoothing=0.1, grad_dtype=dtype)
    # loss: a float32 weighted mean of 16 rows' losses (each over 301 classes) rounded once to dtype:
    # 0.5 eps, bound 1. Gradients: rounded when stored, then times grad_output: two roundings, 1 eps,
    # bound 1.5; normwise, as p - y and -log_softmax cancel.
    for name, a, c in zip(("loss", "d/dinput", "d/dtarget"), ours, truth):
        if c is not None:
            assert a.dtype == dtype, name
            assert_within_eps(a, c, 1 if name == "loss" else 1.5, floor=c.abs().max().item(), msg=name)


def test_threads_split_rows_without_changing_a_bit():
    """The row split over threads is invisible: each row is computed whole by one thread."""
    x, t, w = _inputs((11, 37), "index_ignored")
    outs = []
    for threads in (1, 2, 3, 11, 64):
        loss, grad = torch.empty(11, 1, dtype=torch.float64), torch.empty(11, 37, 1, dtype=torch.float64)
        native.xent_rows(x.unsqueeze(-1), t, grad, None, w, loss, ignore_index=-100, label_smoothing=0.1,
                         gamma=0.0, scale=0.5, threads=threads)
        outs.append((loss, grad))
    for loss, grad in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(grad, outs[0][1])


def test_empty_inputs_match_torch():
    for x, t in ((torch.randn(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long)),
                 (torch.randn(2, 5, 0, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.long))):
        for reduction in ("none", "sum"):
            _close(_run(LF.cross_entropy, x, t, impl="compiled", reduction=reduction),
                   _run(F.cross_entropy, x, t, reduction=reduction))


def test_non_finite_logits_match_torch_path():
    x = torch.randn(5, 6, generator=_gen(1), dtype=torch.float64)
    x[0, 2], x[1] = float("nan"), float("-inf")
    x[2, 3], x[3, 0] = float("inf"), float("-inf")
    t = torch.tensor([1, 2, 3, 0, -100])
    for kw in ({}, {"label_smoothing": 0.2}):
        _close(_run(LF.cross_entropy, x, t, impl="compiled", **kw), _run(LF.cross_entropy, x, t, impl="torch", **kw))


def test_gradcheck_compiled():
    x, t, w = _inputs((3, 5), "index_ignored")
    p = torch.randn(3, 5, generator=_gen(6), dtype=torch.float64).softmax(1)
    assert gradcheck(lambda a: LF.cross_entropy(a, t, w, label_smoothing=0.2, impl="compiled"), [x.requires_grad_()])
    assert gradcheck(lambda a: LF.focal_loss(a, t, w, gamma=1.5, impl="compiled"), [x])
    assert gradcheck(lambda a, b: LF.cross_entropy(a, b, w, label_smoothing=0.1, impl="compiled"),
                     [x, p.requires_grad_()])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(1, 40), length=st.integers(1, 3), ls=st.sampled_from([0.0, 0.25]),
       gamma=st.sampled_from([0.0, 1.0, 2.5]), weighted=st.booleans(), kind=st.sampled_from(["index_ignored", "prob"]),
       seed=st.integers(0, 2**16))
def test_property_compiled_equals_torch_path(n, c, length, ls, gamma, weighted, kind, seed):
    x, t, w = _inputs((n, c, length), kind, seed=seed)
    w = w if weighted else None
    if gamma and kind != "prob":
        fn, kw = LF.focal_loss, {"gamma": gamma}
    else:
        fn, kw = LF.cross_entropy, {"label_smoothing": ls}
    _close(_run(fn, x, t, impl="compiled", weight=w, **kw), _run(fn, x, t, impl="torch", weight=w, **kw))


def test_impl_is_validated():
    x, t, _ = _inputs((2, 3), "index")
    with pytest.raises(ValueError, match="impl"):
        LF.cross_entropy(x, t, impl="fast")
    with pytest.raises(ValueError, match="impl"):
        LF.focal_loss(x, t, impl=None)
    meta = torch.empty(2, 3, device="meta")
    assert _dispatch.backend("xent_rows", "auto", meta) == "composite"
    with pytest.raises(ValueError, match="CPU"):
        _dispatch.backend("xent_rows", "compiled", meta)


def test_missing_extension_falls_back_and_says_how_to_build(monkeypatch):
    x, t, _ = _inputs((4, 6), "index")
    expected = _run(LF.cross_entropy, x, t, impl="torch")
    monkeypatch.setitem(native._loaded, native.XENT, ImportError("No module named 'losskit.ops.cpu._native'"))
    assert not native.available()
    with pytest.raises(ImportError, match="impl='compiled'.*pip install"):
        LF.cross_entropy(x, t, impl="compiled")
    _close(_run(LF.cross_entropy, x, t), expected)  # "auto": torch's own loss, the composite


def test_out_of_range_targets_never_reach_memory():
    x = torch.randn(4, 5, dtype=torch.float64)
    for bad, row in ((5, 1), (-1, 3), (1 << 40, 2)):  # rows 2 and 3 belong to the second thread
        t = torch.tensor([0, 1, 2, 3])
        t[row] = bad
        with pytest.raises(ValueError, match="target"):
            LF.cross_entropy(x, t, impl="compiled")
        with pytest.raises(ValueError, match="target"):
            LF.focal_loss(x, t, impl="compiled")
        # Called directly, past the loss's checks: the kernel refuses the row instead of indexing with it.
        with pytest.raises(ValueError, match="class index outside"):
            native.xent_rows(x.unsqueeze(-1), t, torch.empty(4, 5, 1, dtype=torch.float64), None, None,
                             torch.empty(4, 1, dtype=torch.float64), ignore_index=-100, label_smoothing=0.0,
                             gamma=0.0, scale=1.0, threads=2)


def test_kernel_operands_are_checked():
    x = torch.randn(3, 4, 1)
    t = torch.tensor([0, 1, 2])
    good = {"ignore_index": -100, "label_smoothing": 0.0, "gamma": 0.0, "scale": 1.0}
    bad_calls = [
        (x, t, None, None, None, torch.empty(3, 1, dtype=torch.float64)),  # loss in the wrong dtype
        (x, t, None, None, None, torch.empty(2, 1)),  # loss too short
        (x, t.int(), None, None, None, torch.empty(3, 1)),  # int32 targets
        (x, t[:2], None, None, None, torch.empty(3, 1)),  # too few targets
        (x, t, torch.empty(3, 5, 1), None, None, torch.empty(3, 1)),  # gradient of another shape
        (x, t, None, None, torch.ones(5), torch.empty(3, 1)),  # weight of another length
        (x.long(), t, None, None, None, torch.empty(3, 1)),  # integer logits
    ]
    for args in bad_calls:
        with pytest.raises(ValueError, match="native kernel"):
            native.xent_rows(*args, **good)


def test_exp_accuracy_in_ulp():
    """The kernels' vector exp, over dense sweeps of its domain, against extended-precision exp.

    Measured maximum: 1.013 ulp (float32), 0.99 ulp (float64); below 1.5x the smallest normal result it
    flushes to 0, and -inf gives 0, NaN gives NaN.
    """
    for dtype, low, bound in ((torch.float32, -86.98, 1.5), (torch.float64, -708.0, 1.5)):
        g = _gen(11)
        x = torch.cat([torch.linspace(low, 0, 1 << 20, dtype=dtype), torch.rand(1 << 18, generator=g, dtype=dtype) * low,
                       torch.rand(1 << 14, generator=g, dtype=dtype) * -1e-3])
        ours = native.exp_(x.clone()).numpy().astype(np.longdouble)
        truth = np.exp(x.numpy().astype(np.longdouble))
        ulp = np.spacing(truth.astype(x.numpy().dtype)).astype(np.longdouble)
        err = float((np.abs(ours - truth) / ulp).max())
        assert err < bound, (dtype, err)
        special = native.exp_(torch.tensor([low * 1.01, low * 10, float("-inf"), float("nan"), 0.0], dtype=dtype))
        assert special[:3].eq(0).all() and special[3].isnan() and special[4] == 1


def test_bfloat16_grade_exp_error_is_far_below_bfloat16_rounding():
    """The exp of the bfloat16 row passes (2^f, a degree-4 polynomial, after a one-FMA reduction):
    relative error below 2^-17 = 7.6e-6 over its domain, 1/256 of bfloat16's half step 2^-9. Measured:
    4.0e-6 in the clones with FMA (2.9e-6 from the polynomial's fit, the rest from log2(e)'s float rounding
    at large |x|); 6.6e-6 in the baseline clone (.ci/baseline), which has no FMA and rounds x log2(e)
    before subtracting k."""
    g = _gen(12)
    x = torch.cat([torch.linspace(-86.98, 0, 1 << 20), torch.rand(1 << 16, generator=g) * -1e-3])
    ours = native.exp_(x.clone(), bf16_grade=True).double()
    truth = x.double().exp()
    assert ((ours - truth).abs() / truth).max() < 2**-17
    special = native.exp_(torch.tensor([-86.98 * 1.01, float("-inf"), float("nan"), 0.0]), bf16_grade=True)
    assert special[:2].eq(0).all() and special[2].isnan() and special[3] == 1


@pytest.mark.parametrize("ls", [0.0, 0.1], ids=str)
def test_bfloat16_gradients_that_cancel_keep_float32_accuracy(ls):
    # The gradient at y is p_y - (1 - ls + ls / C): near 0 where p_y is near 1 - ls + ls / C (label
    # smoothing) or near 1. Rows of x_y = 7.5 and the other logits at z + k 2^-10, z the logit that puts
    # p_y there: gradients at y from 5e-5 up, where any relative error of p beyond float32's shows. C
    # from 200 to 400 moves x - max over a whole ln 2, so exp is tried all over its reduced range. The
    # bfloat16 rows are computed in float32 like the float32 path on the same values: their gradients
    # agree to one bfloat16 step and float32's own error (an exp of 5e-6 relative error is not).
    n = 8
    for c in range(200, 400, 7):
        p_y = 1 - ls + ls / c if ls else 1 - 1e-3
        z = 7.5 + math.log((1 - p_y) / (p_y * (c - 1))) + torch.arange(1, n + 1, dtype=torch.float64) * 2**-10
        x = z[:, None].expand(n, c).clone()
        t = torch.randint(0, c, (n,), generator=_gen(c))
        x[torch.arange(n), t] = 7.5
        x = x.bfloat16()
        low = _grad(x, t, label_smoothing=ls).float()
        wide = _grad(x.float(), t, label_smoothing=ls)
        # one bfloat16 step, plus what float32 itself leaves of a gradient of order 1 (p in float32, summed
        # in another order): 4 float32 ulps of 1
        assert ((low - wide).abs() <= torch.finfo(torch.bfloat16).eps * wide.abs() + 4 * 2**-24).all(), c
    ours = _run(LF.cross_entropy, x, t, impl="compiled", label_smoothing=ls)
    truth = _run(F.cross_entropy, x.double(), t, label_smoothing=ls, grad_dtype=torch.bfloat16)
    # loss: one rounding, 0.5 eps, plus float32's error: at ls = 0 the loss, 1e-3, is log s for a float32
    # sum s = 1.001 of C exponentials, whose rounding is relative to 1, not to the loss (measured 0.18 eps,
    # torch's 0.1): bound 1.5. Gradient: rounded when stored, then times grad_output: two roundings, 1 eps,
    # bound 1.5; normwise, as these rows' p - y cancel.
    for name, a, tr in zip(("loss", "d/dinput"), ours, truth):
        assert_within_eps(a, tr, 1.5, floor=tr.abs().max().item(), msg=name)


def test_modules_pass_impl_through():
    import losskit.nn as LN

    x, t, w = _inputs((5, 8), "index_ignored")
    for module, fn, kw in ((LN.CrossEntropyLoss, LF.cross_entropy, {"label_smoothing": 0.1}),
                           (LN.FocalLoss, LF.focal_loss, {"gamma": 1.5})):
        for impl in ("torch", "compiled"):
            ours = _run(lambda a, b: module(w, impl=impl, **kw)(a, b), x, t)
            for a, b in zip(ours, _run(fn, x, t, weight=w, impl=impl, **kw)):
                assert a is b is None or torch.equal(a, b)
        with pytest.raises(ValueError, match="impl"):
            module(impl="fast")(x, t)


_PROBE = textwrap.dedent("""
    import torch, losskit.functional as LF
    torch.set_num_threads(2)
    n, c = 256, 16384  # 4M elements: 16 MiB per float32 input-sized tensor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g).requires_grad_()
    xb = torch.randn(n, c, generator=g).bfloat16().requires_grad_()
    y = torch.randint(0, c, (n,), generator=g)
    p = torch.randn(n, c, generator=g).softmax(1).requires_grad_()
    pb = p.detach().bfloat16().requires_grad_()
    w = torch.rand(c, generator=g)
    calls = {
        "index": lambda: LF.cross_entropy(x, y, w, label_smoothing=0.1, impl="compiled"),
        "bf16": lambda: LF.cross_entropy(xb, y, impl="compiled"),
        "prob": lambda: LF.cross_entropy(x, p, impl="compiled"),
        "bf16_prob": lambda: LF.cross_entropy(xb, pb, impl="compiled"),
        "focal": lambda: LF.focal_loss(x, y, impl="compiled"),
    }
""")


def test_only_the_gradients_are_input_sized():
    peaks = measure_peaks_in_child(_PROBE)
    grad = 256 * 16384 * 4
    # Beyond the gradients: per thread, scratch rows of C floats (64 KiB each), plus per-row vectors and
    # the allocator's rounding; 2 MiB is ample and far below one input-sized tensor (16 MiB).
    slack = 2 << 20
    budget = {"index": grad, "bf16": grad // 2, "prob": 2 * grad, "bf16_prob": grad, "focal": grad}
    for name, allowed in budget.items():
        assert peaks[name] <= allowed + slack, (name, peaks[name] / 2**20)


def test_gradient_of_probability_target_alone_and_no_gradient():
    x, p, w = _inputs((5, 9), "prob")
    for impl in ("compiled", "torch"):
        pp = p.clone().requires_grad_()
        LF.cross_entropy(x, pp, w, label_smoothing=0.1, impl=impl).backward()
        ref = p.clone().requires_grad_()
        F.cross_entropy(x, ref, w, label_smoothing=0.1).backward()
        assert_close(pp.grad, ref.grad)
    with torch.no_grad():
        assert_close(LF.cross_entropy(x.requires_grad_(), p, w, impl="compiled"), F.cross_entropy(x, p, w))
