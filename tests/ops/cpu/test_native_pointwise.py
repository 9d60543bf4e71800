"""The compiled pointwise kernels (mse_loss, rmse_loss, kl_div with impl="compiled") against the pure-torch
path (impl="torch") and torch itself; the wrapper's operand checks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import losskit.functional as LF
import losskit.nn as LN
from losskit.ops.cpu import native_pointwise
from losskit.ops.cpu.native_pointwise import KL_LOG, KL_PROB, MSE, pointwise
from losskit.testing import assert_close, assert_same_results, assert_within_eps, gradcheck, loss_and_grads

REDUCTIONS = ["none", "mean", "sum"]
KL_REDUCTIONS = ["none", "mean", "sum", "batchmean"]
# 1 element, primes, one under and one past the vector width, a shape split unevenly over two threads
# (70001 elements: 69 blocks of 1024 and a tail of 367).
SHAPES = [(1,), (7,), (9,), (13, 17), (3, 1031), (70001,)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mse_inputs(shape, dtype=torch.float64, seed=0):
    x = torch.randn(shape, generator=_gen(seed), dtype=torch.float64)
    t = x + torch.randn(shape, generator=_gen(seed + 1), dtype=torch.float64)
    w = 0.5 + torch.rand(shape, generator=_gen(seed + 2), dtype=torch.float64)
    return x.to(dtype), t.to(dtype), w.to(dtype)


def _kl_inputs(shape, log_target, dtype=torch.float64, seed=0):
    x = torch.randn(shape, generator=_gen(seed), dtype=torch.float64).log_softmax(-1)
    t = torch.rand(shape, generator=_gen(seed + 1), dtype=torch.float64)
    if t.numel() > 1 and not log_target:
        t.view(-1)[::5] = 0.0  # 0 log 0 = 0 in the loss, NaN in torch's target gradient (log: see below)
    return x.to(dtype), (t.log() if log_target else t).to(dtype)


def _kl(*args, **kwargs):
    """kl_div with torch's and our reduction="mean" warning silenced (test_divergence tests it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return LF.kl_div(*args, **kwargs)


def _torch_kl(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return F.kl_div(*args, **kwargs)


def _rmse_reference(x, t, weight=None):
    d2 = (x.double() - t.double()) ** 2
    w = torch.ones_like(d2) if weight is None else weight.double()
    return ((w * d2).sum() / w.sum()).sqrt()


def _three_way(fn, reference, x, t, **kwargs):
    """compiled == torch path (same tolerance), compiled == reference."""
    ours = loss_and_grads(fn, x, t, impl="compiled", **kwargs)
    assert_same_results(ours, loss_and_grads(fn, x, t, impl="torch", **kwargs))
    expected = loss_and_grads(reference, x, t, **kwargs)
    assert_same_results(ours, tuple(e if e is None else e.to(o.dtype) for o, e in zip(ours, expected)))


# --- values and gradients ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_compiled_matches_torch_path_and_torch(dtype, shape, reduction, weighted):
    x, t, w = _mse_inputs(shape, dtype)
    _three_way(LF.mse_loss, F.mse_loss, x, t, reduction=reduction, weight=w if weighted else None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_rmse_compiled_matches_torch_path_and_formula(dtype, shape, weighted):
    x, t, w = _mse_inputs(shape, dtype)
    kwargs = {"weight": w} if weighted else {}
    ours = loss_and_grads(LF.rmse_loss, x, t, impl="compiled", **kwargs)
    assert_same_results(ours, loss_and_grads(LF.rmse_loss, x, t, impl="torch", **kwargs))
    ref = loss_and_grads(_rmse_reference, x, t, **kwargs)
    assert_same_results(ours, (ref[0].to(dtype), *ref[1:]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_compiled_matches_torch_path_and_torch(dtype, shape, reduction, log_target):
    x, t = _kl_inputs(shape, log_target, dtype)
    _three_way(_kl, _torch_kl, x, t, reduction=reduction, log_target=log_target)


def test_auto_is_compiled_on_cpu():
    x, t, w = _mse_inputs((5, 9))
    for fn, kwargs in ((LF.mse_loss, {"weight": w}), (LF.rmse_loss, {}), (_kl, {"log_target": True})):
        auto = loss_and_grads(fn, x, t, **kwargs)
        compiled = loss_and_grads(fn, x, t, impl="compiled", **kwargs)
        for a, b in zip(auto, compiled):
            assert torch.equal(a, b)


def test_beyond_the_caches():
    # 4M + 37 float32 elements: each operand 16 MiB, inputs and gradients 64 MiB, past the 32 MiB L3.
    x, t, w = _mse_inputs((1 << 22) + 37, torch.float32)
    _three_way(LF.mse_loss, F.mse_loss, x, t, weight=w)


def test_non_contiguous_and_broadcast_operands():
    x, t, w = _mse_inputs((40, 33))
    views = ((x.t(), t.t(), w.t()), (x[::3, 1::2], t[::3, 1::2], w[::3, 1::2]), (x.t(), t.t().contiguous(), None))
    for a, b, c in views:
        assert not a.is_contiguous()
        for reduction in REDUCTIONS:
            _three_way(LF.mse_loss, F.mse_loss, a, b, reduction=reduction, weight=c)
        _three_way(LF.rmse_loss, _rmse_reference, a, b, weight=c)
    for log_target in (False, True):
        p, q = _kl_inputs((40, 33), log_target)
        # broadcast targets ((C,) and (N, 1)) and input, a transposed input
        for a, b in ((p, q[0]), (p, q[:, :1]), (p[:1], q), (p.t(), q.t())):
            for reduction in KL_REDUCTIONS:
                _three_way(_kl, _torch_kl, a, b, reduction=reduction, log_target=log_target)


def test_pieces_of_any_size(monkeypatch):
    import losskit.ops.reference.elementwise as elementwise

    x, t, w = _mse_inputs((6, 11))
    p, q = _kl_inputs((6, 11), False)
    for chunk in (1, 5, 11, 23):
        monkeypatch.setattr(elementwise, "CHUNK", chunk)
        _three_way(LF.mse_loss, F.mse_loss, x.t(), t.t(), weight=w.t())
        _three_way(_kl, _torch_kl, p, q[0], reduction="sum")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(61,), (16, 301)], ids=str)
def test_low_precision_within_eps_of_float64(dtype, shape):
    x, t, w = _mse_inputs(shape)
    cases = [(LF.mse_loss, F.mse_loss, x, t, {"reduction": r, "weight": wt})
             for r in REDUCTIONS for wt in (None, w)]
    cases.append((LF.rmse_loss, lambda a, b: F.mse_loss(a, b).sqrt(), x, t, {}))
    for log_target in (False, True):
        p, q = _kl_inputs(shape, log_target)
        cases += [(_kl, _torch_kl, p, q, {"reduction": r, "log_target": log_target}) for r in KL_REDUCTIONS]
    for fn, ref, a, b, kwargs in cases:
        low = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        exact = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in low.items()}
        go = torch.randn(shape if kwargs.get("reduction") == "none" else (), generator=_gen(9),
                         dtype=torch.float64).to(dtype)
        ours = loss_and_grads(fn, a.to(dtype), b.to(dtype), impl="compiled", grad_output=go, **low)
        truth = loss_and_grads(ref, a.to(dtype).double(), b.to(dtype).double(), grad_output=go.double(), **exact)
        # loss: float32 values (sums of up to 4816 terms) rounded once to dtype, 0.5 eps, plus float32's
        # error: bound 1. Gradients: rounded when stored, then times grad_output: two roundings, 1 eps,
        # bound 2. mse and rmse: relative per element (x - t is exact in float32); kl_div: normwise, as
        # t (log t - x) and log t + 1 - x cancel, and at least relative to the smallest normal (float16's
        # mean gradient, -t / 4816, is subnormal: rounded in steps of eps times that).
        mse = fn is not _kl
        for name, o, tr in zip(("loss", "d/dinput", "d/dtarget"), ours, truth):
            assert o.dtype == dtype, name
            # torch's own NaN (kl_div's target gradient at t == 0) is compared as such
            nan = torch.isnan(tr)
            assert torch.equal(torch.isnan(o), nan), (fn, kwargs, name)
            if not nan.all():
                o, tr = o[~nan], tr[~nan]
                norm = max(tr.abs().max().item(), torch.finfo(dtype).tiny)
                assert_within_eps(o, tr, 1 if name == "loss" else 2, floor=None if mse else norm,
                                  msg=f"{fn} {kwargs} {name}")


def test_integer_and_mixed_dtypes():
    x, t, w = _mse_inputs((9, 13), torch.float32)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        ti = (t.abs() * 3).round().to(dtype)
        _three_way(LF.mse_loss, F.mse_loss, x, ti)
        _three_way(LF.mse_loss, F.mse_loss, x, ti, reduction="none")
    # float32 input, float64 target and weight: computed in float64 (torch promotes)
    _three_way(LF.mse_loss, F.mse_loss, x, t.double(), reduction="none")
    assert_same_results(loss_and_grads(LF.mse_loss, x, t, weight=w.double(), impl="compiled"),
                        loss_and_grads(LF.mse_loss, x, t, weight=w.double(), impl="torch"))
    _three_way(_kl, _torch_kl, x.log_softmax(-1), t.double().softmax(-1), reduction="batchmean")
    # a bfloat16 input and a float32 target: the mixed-dtype path, computed in float32
    xb = x.bfloat16()
    assert_same_results(loss_and_grads(LF.mse_loss, xb, t, reduction="none", impl="compiled"),
                        loss_and_grads(LF.mse_loss, xb, t, reduction="none", impl="torch"))


def test_unsigned_wide_target_falls_back_under_auto_and_is_refused_compiled():
    x = torch.randn(4, 5)
    t = torch.arange(20).to(torch.uint16).view(4, 5)
    assert_close(LF.mse_loss(x, t), F.mse_loss(x, t.float()))
    with pytest.raises(ValueError, match="does not take torch.uint16"):
        LF.mse_loss(x, t, impl="compiled")


def test_non_finite_values_like_torch_path():
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([nan, 1.0, inf, -inf, 2.0, 0.5, 3.0, -1.0, 4.0], dtype=torch.float64)
    t = torch.tensor([0.0, inf, inf, 1.0, nan, 0.5, -2.0, 0.0, 1e300], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        a, b = x.to(dtype), t.to(dtype)
        for reduction in REDUCTIONS:
            _three_way(LF.mse_loss, F.mse_loss, a, b, reduction=reduction)
        # rmse: a NaN loss; losskit's gradient factor is 0 where the loss is not > 0 (documented), the
        # reference's NaN: only the two implementations are compared
        assert_same_results(loss_and_grads(LF.rmse_loss, a, b, impl="compiled"),
                            loss_and_grads(LF.rmse_loss, a, b, impl="torch"))
        # kl_div: t = 0 (gradient NaN), t < 0 and NaN (xlogy NaN), inf; log targets above 0, up to overflow
        logq = torch.tensor([-1.0, -2.0, -0.5, -3.0, nan, -inf, -1.0, 0.0, -2.0], dtype=dtype)
        tau = torch.tensor([0.0, -inf, 89.0, 1000.0, -1.0, -1.0, 3.0, inf, nan], dtype=dtype)
        for reduction in ("none", "sum"):
            _three_way(_kl, _torch_kl, logq, b, reduction=reduction)
            _three_way(_kl, _torch_kl, logq, tau, reduction=reduction, log_target=True)


def test_rmse_zero_loss_has_zero_gradient():
    x = torch.randn(3, 1031, dtype=torch.float64)
    loss, gx, gt = loss_and_grads(LF.rmse_loss, x, x.clone(), impl="compiled")
    assert loss == 0 and torch.equal(gx, torch.zeros_like(x)) and torch.equal(gt, torch.zeros_like(x))


def test_empty_inputs():
    for shape in ((0,), (3, 0)):
        x, t, w = _mse_inputs(shape)
        for reduction in REDUCTIONS:
            _three_way(LF.mse_loss, F.mse_loss, x, t, reduction=reduction, weight=w)
        p, q = _kl_inputs(shape, False)
        for reduction in KL_REDUCTIONS:
            _three_way(_kl, _torch_kl, p, q, reduction=reduction)


def test_gradcheck_compiled():
    x, t, w = _mse_inputs((3, 5))
    x, t = x.requires_grad_(), t.requires_grad_()
    assert gradcheck(lambda a, b: LF.mse_loss(a, b, weight=w, impl="compiled"), (x, t))
    assert gradcheck(lambda a, b: LF.rmse_loss(a, b, weight=w, impl="compiled"), (x, t))
    p, q = _kl_inputs((3, 5), False)
    q = q.clamp(min=0.05)  # away from t == 0, where the target gradient is NaN
    assert gradcheck(lambda a, b: _kl(a, b, reduction="batchmean", impl="compiled"),
                     (p.requires_grad_(), q.requires_grad_()))
    assert gradcheck(lambda a, b: _kl(a, b, log_target=True, impl="compiled"), (p, q.log().detach().requires_grad_()))


def test_modules_take_impl():
    x, t, _ = _mse_inputs((4, 6))
    p, q = _kl_inputs((4, 6), True)
    for impl in ("torch", "compiled"):
        assert_close(LN.MSELoss(reduction="sum", impl=impl)(x, t), LF.mse_loss(x, t, reduction="sum", impl=impl))
        assert_close(LN.RMSELoss(impl=impl)(x, t), LF.rmse_loss(x, t, impl=impl))
        assert_close(LN.KLDivLoss(reduction="batchmean", log_target=True, impl=impl)(p, q),
                     LF.kl_div(p, q, reduction="batchmean", log_target=True, impl=impl))
    with pytest.raises(ValueError, match="impl"):
        LF.mse_loss(x, t, impl="fast")


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), reduction=st.sampled_from(REDUCTIONS),
       weighted=st.booleans(), log_target=st.booleans(), transpose=st.booleans(), seed=st.integers(0, 2**16))
def test_property_compiled_equals_torch_path(shape, reduction, weighted, log_target, transpose, seed):
    x, t, w = _mse_inputs(tuple(shape), seed=seed)
    p, q = _kl_inputs(tuple(shape), log_target, seed=seed)
    if transpose:
        x, t, w, p, q = (v.transpose(0, -1) for v in (x, t, w, p, q))
    w = w if weighted else None
    for fn, a, b, kwargs in ((LF.mse_loss, x, t, {"reduction": reduction, "weight": w}),
                             (LF.rmse_loss, x, t, {"weight": w}),
                             (_kl, p, q, {"reduction": reduction, "log_target": log_target})):
        assert_same_results(loss_and_grads(fn, a, b, impl="compiled", **kwargs),
                            loss_and_grads(fn, a, b, impl="torch", **kwargs))


# --- the kernel call ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_conversions_are_torchs(dtype):
    """Every 16-bit pattern read, and the float32 results g = 2 (x - 0) s written as torch rounds them
    (nearest even, overflow to inf, subnormals, NaN), bit for bit; s = 0.5 gives x back except where
    2 x overflows float32 (bfloat16's top binade)."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    zero, out = torch.zeros_like(every), torch.empty_like(every)

    def same_bits(a, b):
        return bool(((a.view(torch.int16) == b.view(torch.int16)) | (a.isnan() & b.isnan())).all())

    for scale in (0.5, 3.7, 1e-3, 1e-6, 2.0**-20, 1e3, 0.999):
        pointwise(MSE, every, zero, None, None, out, None, scale=scale)
        assert same_bits(out, (2 * every.float() * scale).to(dtype)), scale


def _same_bits(a, b):
    return bool(((a.view(torch.int16) == b.view(torch.int16)) | (a.isnan() & b.isnan())).all())


def _special_bf16_operands(n, kind, seed):
    """n bfloat16 inputs and targets of ``kind``, every third target a special value: 0, -0, negative,
    inf, -inf, NaN, a subnormal, the largest finite (the rest as _kl_inputs / _mse_inputs make them)."""
    if kind == MSE:
        x, t, _ = _mse_inputs((n,), torch.float32, seed)
    else:
        x, t = _kl_inputs((n,), kind == KL_LOG, torch.float32, seed)
    special = torch.tensor([0.0, -0.0, -0.5, float("inf"), -float("inf"), float("nan"), 1e-39, 3.3e38])
    t[::3] = special.repeat(n // len(special) + 1)[: len(t[::3])]
    x[1::7] = float("nan")
    return x.bfloat16(), t.bfloat16()


@pytest.mark.parametrize("kind", [MSE, KL_PROB, KL_LOG])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 31, 1024 + 17, 3 * 1024 + 5])
def test_bfloat16_pairs_agree_with_float32_path(kind, n):
    """The uniform bfloat16 path reads 16 elements as 8 words (even and odd lanes), writes them back
    rounded without the NaN fix-up, and reads kl_div's log y and exp y from tables over y's bit patterns:
    each element as the float32 kernel computes it on the same values, rounded as torch rounds (bit for
    bit, NaN as NaN)."""
    x, t = _special_bf16_operands(n, kind, seed=n)
    low = [torch.empty(n, dtype=torch.bfloat16) for _ in range(3)]
    ref = [torch.empty(n) for _ in range(3)]
    total = pointwise(kind, x, t, None, *low, scale=0.75)
    total32 = pointwise(kind, x.float(), t.float(), None, *ref, scale=0.75)
    for name, ours, theirs in zip(("loss", "grad_input", "grad_target"), low, ref):
        assert _same_bits(ours, theirs.bfloat16()), name
    assert total == total32 or (total != total and total32 != total32) or abs(total - total32) <= 1e-5 * abs(total32)


def test_bfloat16_nan_scale_gives_nan():
    """A NaN scale takes the converting path (the paired stores round without the NaN fix-up)."""
    x, t = _special_bf16_operands(40, KL_PROB, seed=3)
    outs = [torch.empty(40, dtype=torch.bfloat16) for _ in range(2)]
    pointwise(KL_PROB, x, t, None, None, *outs, scale=float("nan"))
    assert all(o.isnan().all() for o in outs)


def test_bfloat16_log_within_an_ulp_and_a_half():
    """kl_div's loss term y log y (x = 0) of every positive finite bfloat16 y (subnormals included), with
    log y read from the table: within 1.5 float ulp of the float64 value (0.82 ulp of the float path's
    log, half an ulp of the product)."""
    y = torch.arange(1, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    got = torch.empty(len(y), dtype=torch.float32)
    pointwise(KL_PROB, torch.zeros_like(y), y.float(), None, got)  # float y: the computed log, as reference
    table = torch.empty_like(y)
    pointwise(KL_PROB, torch.zeros_like(y), y, None, table)
    assert _same_bits(table, got.bfloat16())  # the table's log is the computed one
    truth = y.double() * y.double().log()
    big = truth.float().isinf()  # y log y past float's range: inf, as torch's
    assert big.any() and (got[big] == float("inf")).all()
    t32 = truth[~big].float().abs()
    ulp = (t32.nextafter(torch.tensor(float("inf"))) - t32).double()
    assert ((got[~big].double() - truth[~big]).abs() <= 1.5 * ulp).all()


@pytest.mark.parametrize("kind", [KL_PROB, KL_LOG])
def test_bfloat16_tables_cover_every_bit_pattern(kind):
    """Every bfloat16 target pattern (NaNs, infinities, negatives, subnormals), at even and odd positions and
    in a block's tail, against inputs that are not all 0: each output is the float32 path's on the same
    values rounded once, bit for bit."""
    t = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for shift, n in ((0, len(t)), (1, len(t) - 5)):  # n: a tail of 11 elements after the last full group
        y = t.roll(shift)[:n]
        x = torch.linspace(-3, 0.5, n).bfloat16()
        low = [torch.empty(n, dtype=torch.bfloat16) for _ in range(3)]
        ref = [torch.empty(n) for _ in range(3)]
        pointwise(kind, x, y, None, *low, scale=0.75)
        pointwise(kind, x.float(), y.float(), None, *ref, scale=0.75)
        for name, ours, theirs in zip(("loss", "grad_input", "grad_target"), low, ref):
            assert _same_bits(ours, theirs.bfloat16()), (name, shift)


@pytest.mark.parametrize("kind", [MSE, KL_PROB, KL_LOG])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_thread_count_changes_no_bit(kind, dtype):
    n = 5 * 1024 + 3  # blocks split unevenly over 2 and 3 threads
    x, t = _kl_inputs((n,), kind == KL_LOG, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    results = []
    for threads in (1, 2, 3):
        outs = [torch.empty(n, dtype=dtype) for _ in range(3)]
        total = pointwise(kind, x, t, None, *outs, scale=0.25, acc=acc, threads=threads)
        results.append((total, outs))
    for total, outs in results[1:]:
        assert total == results[0][0] or (total != total and results[0][0] != results[0][0])
        for a, b in zip(outs, results[0][1]):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_wrapper_rejects_bad_operands():
    x, t = torch.randn(6), torch.randn(6)
    bad = {
        "input": dict(x=x[::2]),  # not contiguous
        "target": dict(y=torch.randn(5)),  # wrong size
        "grad_input": dict(gx=torch.empty(6, dtype=torch.int32)),  # not floating
        "loss": dict(loss=torch.empty(6, device="meta")),  # not on the CPU
        "weight": dict(w=torch.ones(5)),  # wrong size
    }
    for name, override in bad.items():
        args = {"x": x, "y": t, "w": None, "loss": None, "gx": None, "gy": None, **override}
        with pytest.raises(ValueError, match=name):
            pointwise(MSE, **args)
    with pytest.raises(ValueError, match="target"):
        pointwise(KL_PROB, x, t.long())  # integer targets: mse only
    with pytest.raises(ValueError, match="weight"):
        pointwise(KL_LOG, x, t, torch.ones(6))
    with pytest.raises(ValueError, match="kind"):
        pointwise(7, x, t)
    with pytest.raises(ValueError, match="acc"):
        pointwise(MSE, x, t, acc=torch.float16)
    with pytest.raises(ValueError, match="input"):
        pointwise(MSE, x.numpy(), t)


def test_extension_rejects_bad_arguments():
    ext = native_pointwise.native.module(native_pointwise.EXTENSION)
    x = torch.randn(4)
    op, none = (x.data_ptr(), 0), (0, 0)
    with pytest.raises(ValueError, match="dtype code"):
        ext.pointwise(MSE, False, 4, (x.data_ptr(), 9), op, none, none, none, none, 1.0, 1)
    with pytest.raises(ValueError, match="invalid"):
        ext.pointwise(MSE, False, -1, op, op, none, none, none, none, 1.0, 1)
    with pytest.raises(ValueError, match="invalid"):
        ext.pointwise(3, False, 4, op, op, none, none, none, none, 1.0, 1)
    with pytest.raises(ValueError, match="invalid"):
        ext.pointwise(KL_PROB, False, 4, op, none, none, none, none, none, 1.0, 1)


# --- a gradient times grad_output (the backward of losskit's precomputed gradients) -------------------

def _bits_equal(a, b):
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(((a.view(ints) == b.view(ints)) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("shape", "go_shape"), [
    ((300, 333), (300, 1)),            # a per-row loss: runs of one scalar (B == 1), rows not a multiple of 8
    ((300, 333), ()),                  # a scalar
    ((300, 333), (300, 333)),          # the full shape: runs along all of it
    ((300, 333), (333,)),              # leading dims broadcast
    ((30, 17, 301), (30, 1, 301)),     # the class dim in the middle: runs of 301 with s alongside
    ((5, 7, 11, 13, 17), (5, 1, 1, 13, 17)),
    ((2, 1, 40000), (2, 1, 1)),        # a size-1 dim either side of the block
])
def test_scale_is_mul_bit_for_bit(dtype, shape, go_shape):
    """native_pointwise.scale_ takes the call and gives mul_'s bits (products in float for bfloat16 and
    float16, rounded once), NaN and infinities included, over several chunks and their tails."""
    g = 3 * torch.randn(shape, generator=_gen(1)).to(dtype)
    go = torch.randn(go_shape, generator=_gen(2)).to(dtype)
    g.view(-1)[::97] = float("nan")
    g.view(-1)[1::89] = float("inf")
    if go.numel() > 1:
        go.view(-1)[::7] = float("nan")
        go.view(-1)[3::11] = 0.0
    ours = g.clone()
    assert native_pointwise.scale_(ours, go)
    assert _bits_equal(ours, g.clone().mul_(go))


def test_scale_reads_a_broadcast_grad_output_in_place():
    # An expanded (stride-0) grad_output counts as broadcast, and a strided one is copied only when small
    g = torch.randn(256, 512, generator=_gen(3))
    for go in (torch.randn(256, generator=_gen(4))[:, None].expand(256, 512), torch.randn(512, 256).t()[:, :1],
               torch.randn(256, 1, generator=_gen(5)).expand(256, 512)):
        ours = g.clone()
        assert native_pointwise.scale_(ours, go)
        assert _bits_equal(ours, g.clone().mul_(go))


@pytest.mark.parametrize("case", ["small", "cuda-like dtype mix", "two blocks", "not contiguous", "not broadcastable",
                                  "big strided grad_output"])
def test_scale_declines_what_it_does_not_take(case):
    """scale_ returns False and leaves the gradient untouched; the caller then runs mul_."""
    g = torch.randn(64, 2048)
    go = {"small": None, "cuda-like dtype mix": torch.randn(64, 1, dtype=torch.float64),
          "two blocks": None, "not contiguous": torch.randn(64, 1), "not broadcastable": torch.randn(3, 1),
          "big strided grad_output": torch.randn(2048, 64).t()}[case]
    if case == "small":
        g, go = torch.randn(8, 100), torch.randn(8, 1)
    elif case == "two blocks":
        g, go = torch.randn(30, 17, 301), torch.randn(17, 1)
    elif case == "not contiguous":
        g = torch.randn(2048, 64).t()
    before = g.clone()
    assert not native_pointwise.scale_(g, go)
    assert torch.equal(g, before)
