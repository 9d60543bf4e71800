"""The compiled binary-loss kernels (``impl="compiled"``, losskit.ops.cpu.native_binary) against the
pure-torch path (``impl="torch"``, the reference) and torch: values and gradients, every option, odd and
large sizes, strided and broadcast operands, thread counts, edge values, and invalid operands."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import losskit.functional as LF
import losskit.ops.reference.elementwise as elementwise
import losskit.nn as LN
from losskit.ops import _dispatch
from losskit.ops.cpu import native_binary
from losskit.testing import (TOLERANCES, assert_matches_reference, assert_same_results, assert_within_eps,
                             loss_and_grads)

REDUCTIONS = ["none", "mean", "sum"]
LOSSES = ["bce", "logits", "soft_margin", "focal"]
# 1 element, primes, sizes that are not multiples of the 8 lanes or of a 1024-element block
SHAPES = [(1,), (13,), (7, 1031), (3, 5, 11)]
WEIGHTS = [None, "scalar", "last", "rows", "full", "middle", "outer_inner"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(loss, shape, dtype=torch.float64, seed=0):
    """Probabilities in (0, 1) for BCE, logits otherwise; soft labels with a third exactly 0 or 1."""
    g = _gen(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) if loss == "bce" else 3 * torch.randn(
        shape, generator=g, dtype=torch.float64)
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    t.view(-1)[::3] = t.view(-1)[::3].round()
    return x.to(dtype), t.to(dtype)


def _weight(kind, shape, dtype=torch.float64, seed=5):
    """A positive constant broadcast to ``shape`` in the given way (None where the shape lacks the dims):
    ``middle`` varies along one inner dim (periodic), ``outer_inner`` along the first and last dims at once
    (not periodic: the kernel is fed pieces)."""
    nd = len(shape)
    wshape = {None: None, "scalar": (), "last": shape[-1:], "full": shape,
              "rows": shape[:1] + (1,) * (nd - 1) if nd >= 2 else None,
              "middle": (shape[1], 1) if nd == 3 else None,
              "outer_inner": (shape[0], 1, shape[2]) if nd == 3 else None}[kind]
    if wshape is None:
        return None
    return (0.5 + 2 * torch.rand(wshape, generator=_gen(seed), dtype=torch.float64)).to(dtype)


def _call(loss, impl, reduction="mean", weight=None, pos_weight=None, alpha=0.25, gamma=2.0):
    """``fn(input, target)`` of one loss with its options."""
    if loss == "bce":
        return lambda a, b: LF.binary_cross_entropy(a, b, weight, reduction=reduction, impl=impl)
    if loss == "logits":
        return lambda a, b: LF.binary_cross_entropy_with_logits(a, b, weight, reduction=reduction,
                                                                pos_weight=pos_weight, impl=impl)
    if loss == "soft_margin":
        return lambda a, b: LF.multilabel_soft_margin_loss(a, b, weight, reduction=reduction, impl=impl)
    return lambda a, b: LF.sigmoid_focal_loss(a, b, alpha, gamma, reduction, impl=impl)


def _torch(loss, reduction, weight=None, pos_weight=None):
    """torch's own loss (None for the focal loss, which torch lacks: the torch path is its reference,
    itself tested against torchvision's definition in tests/functional/test_binary.py)."""
    if loss == "bce":
        return lambda a, b: F.binary_cross_entropy(a, b, weight, reduction=reduction)
    if loss == "logits":
        return lambda a, b: F.binary_cross_entropy_with_logits(a, b, weight, reduction=reduction,
                                                               pos_weight=pos_weight)
    if loss == "soft_margin":
        return lambda a, b: F.multilabel_soft_margin_loss(a, b, weight, reduction=reduction)
    return None


def _assert_same(actual, expected):
    """Results of loss_and_grads equal within the dtype's tolerance, NaN where the expected has NaN."""
    for a, b in zip(actual, expected):
        assert (a is None) == (b is None)
        if a is not None:
            tol = TOLERANCES[a.dtype]
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=tol.rtol, atol=tol.atol, equal_nan=True)


# --- agreement, every option ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compiled_matches_torch_path_and_torch(dtype, loss, shape, reduction):
    x, t = _inputs(loss, shape, dtype)
    for kind in WEIGHTS if loss != "focal" else [None]:
        w = _weight(kind, shape, dtype)
        if kind is not None and w is None:
            continue
        p = _weight(kind, shape, dtype, seed=9) if loss == "logits" else None
        for weight, pos_weight in ((w, None), (None, p), (w, p)) if loss == "logits" else ((w, None),):
            compiled = loss_and_grads(_call(loss, "compiled", reduction, weight, pos_weight), x, t)
            assert_same_results(compiled, loss_and_grads(_call(loss, "torch", reduction, weight, pos_weight), x, t))
            reference = _torch(loss, reduction, weight, pos_weight)
            if reference is not None:
                assert_same_results(compiled, loss_and_grads(reference, x, t))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 0.5), (0.6, 0.0), (0.1, 3.0), (0.9, 1.7)])
def test_focal_options_match_torch_path(dtype, alpha, gamma):
    x, t = _inputs("focal", (9, 37), dtype)
    for reduction in REDUCTIONS:
        assert_same_results(loss_and_grads(_call("focal", "compiled", reduction, alpha=alpha, gamma=gamma), x, t),
                            loss_and_grads(_call("focal", "torch", reduction, alpha=alpha, gamma=gamma), x, t))


def test_focal_targets_outside_unit_interval_match_torch_path():
    # q = 1 - p_t leaves [0, 1] with such targets: pow of it as torch's (NaN for a negative base and a
    # non-integer gamma, a real number for an integer one)
    x = torch.linspace(-6, 6, 41, dtype=torch.float64)
    t = torch.linspace(-1.5, 2.5, 41, dtype=torch.float64)
    for gamma in (2.0, 1.5):
        _assert_same(loss_and_grads(_call("focal", "compiled", "none", gamma=gamma), x, t),
                     loss_and_grads(_call("focal", "torch", "none", gamma=gamma), x, t))


def test_mixed_dtypes_and_integer_labels():
    x, t = _inputs("logits", (6, 19), torch.float32)
    for tt in (t.double(), t.bfloat16(), t.half()):
        assert_same_results(loss_and_grads(_call("logits", "compiled", "none"), x, tt),
                            loss_and_grads(_call("logits", "torch", "none"), x, tt))
    labels = t.round().long()
    w = _weight("last", (6, 19), torch.float64)  # a float64 weight promotes the result to float64
    for reduction in REDUCTIONS:
        assert_same_results(loss_and_grads(_call("soft_margin", "compiled", reduction, w), x, labels),
                            loss_and_grads(_call("soft_margin", "torch", reduction, w), x, labels))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("weighted", [True, False])  # bfloat16 without a weight: the kernel's pair path
def test_low_precision_within_eps_of_float64(dtype, loss, weighted):
    shape = (33, 257)
    x, t = (v.to(dtype) for v in _inputs(loss, shape))
    w = _weight("last", shape, dtype) if weighted and loss != "focal" else None
    w64 = None if w is None else w.double()
    for reduction in ("none", "sum"):
        loss_shape = () if reduction == "sum" else shape[:1] if loss == "soft_margin" else shape
        go = torch.randn(loss_shape, generator=_gen(9), dtype=torch.float64).to(dtype)
        ours = loss_and_grads(_call(loss, "compiled", reduction, w), x, t, grad_output=go)
        # the focal loss's truth: the torch path (its reference) in float64
        ref = _call(loss, "torch", reduction) if loss == "focal" else _torch(loss, reduction, w64)
        truth = loss_and_grads(ref, x.double(), t.double(), grad_output=go.double())
        # loss: float32 values rounded once to dtype, 0.5 eps, bound 1 relative per element; the sum of
        # 8481 positive terms adds float32's error (at most 8481 * 2^-24 = 0.52 eps of float16 summed
        # naively): bound 1.5. The logits' and focal losses are (1 - t) x + softplus(-x), torch's formula,
        # which cancels in float32 where the loss is small (2.9 eps of bfloat16, 8.2 of float16 at x = -10.75,
        # t = 0, a loss of 2e-5): bounded in eps times max(1, |loss|). Gradients: rounded when stored, then
        # times grad_output: two roundings, 1 eps, bound 2 relative per element for bce (x - t and 1 - x
        # exact in float32, logs relative), 1.5 normwise for the others, as sigmoid(x) - t cancels.
        for name, a, c in zip(("loss", "d/dinput", "d/dtarget"), ours, truth):
            assert a.dtype == dtype
            c = c.where(c.to(dtype).isfinite(), c.to(dtype).double())  # beyond dtype's range: inf, as rounded
            if name == "loss":
                n, floor = 1.5 if reduction == "sum" else 1, 1.0 if loss in ("logits", "focal") else None
            else:
                n, floor = (2, None) if loss == "bce" else (1.5, c.abs().max().item())
            assert_within_eps(a, c, n, floor=floor, msg=f"{loss} {reduction} {name}")


def _bf16_call(loss, x, t, *, row_len=0, scale=0.25, want_loss=True, constants=()):
    """native_binary.binary on x, t (their dtype) with both gradients and, unless row_len, the per-element
    loss: ``(total, out, gx, gy)``; ``constants``: the kernel's (weight, pos_weight) operands."""
    n = x.numel()
    gx, gy = torch.empty_like(x), torch.empty_like(t)
    out = None
    if row_len:
        out = torch.zeros(n // row_len, dtype=torch.float32)
    elif want_loss:
        out = torch.empty_like(x)
    total = native_binary.binary(loss, x, t, gx, gy, out, list(constants), row_len=row_len, scale=scale,
                                 acc=torch.float32,
                                 alpha=0.25, gamma=2.0, threads=1)
    return total, out, gx, gy


def _assert_bf16_rounds(actual, expected32):
    """bfloat16 ``actual`` is float32 ``expected32`` rounded to nearest even, bit for bit; NaN where it is NaN."""
    nan = expected32.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(actual[~nan].view(torch.int16), expected32[~nan].to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1024, 1039, 3 * 1024 + 29])
def test_bfloat16_pairs_round_the_float32_path(loss, n):
    # bfloat16 without weights goes through the pair path (16 elements as 8 words, the n % 16 tail of a
    # block through the float loop): each element's loss and gradients are the float32 path's on the same
    # values, rounded once; sums agree to float32's tolerance
    x, t = (v.to(torch.bfloat16) for v in _inputs(loss, (n,), seed=n))
    low = _bf16_call(loss, x, t)
    ref = _bf16_call(loss, x.float(), t.float())
    for a, b in zip(low[1:], ref[1:]):
        _assert_bf16_rounds(a, b)
    assert low[0] == 0 and ref[0] == 0  # the per-element loss was asked for
    total, ref_total = _bf16_call(loss, x, t, want_loss=False)[0], _bf16_call(loss, x.float(), t.float(),
                                                                              want_loss=False)[0]
    assert total == pytest.approx(ref_total, rel=1e-5, abs=1e-5)
    if n % 17 == 0 or n == 1039:  # rows (soft margin's per-row sums), of an odd length: blocks start mid-word
        row_len = 17 if n % 17 == 0 else 1039
        rows, rows32 = _bf16_call(loss, x, t, row_len=row_len), _bf16_call(loss, x.float(), t.float(), row_len=row_len)
        torch.testing.assert_close(rows[1], rows32[1], rtol=1e-5, atol=1e-5)
        for a, b in zip(rows[2:], rows32[2:]):
            _assert_bf16_rounds(a, b)


@pytest.mark.parametrize(("loss", "weighted"), [(loss, False) for loss in LOSSES] +
                         [(loss, True) for loss in LOSSES if loss != "focal"])  # focal takes no weight
def test_bfloat16_tables_cover_every_bit_pattern(loss, weighted):
    # A bfloat16 x's functions (log1p(exp(-|x|)) and the sigmoid pair; BCE's log x and log1p(-x)) are read
    # from tables over its 65536 bit patterns, on the pair path and (weighted: a weight, and pos_weight for
    # the logits, of period 7) on the float block path: every pattern (BCE: those in [0, 1], and the NaNs),
    # at even and odd positions, against targets 0, 1 and one in between, rounds the float32 path's value,
    # bit for bit, a zero's sign aside (soft margin's per-element loss is -0 on the pair path
    # where the float path gives +0, as before the tables: there the weight is the constant 1, and
    # w * -(...) compiles differently; the row sums that multilabel_soft_margin_loss uses add it as 0)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.bfloat16)
    if loss == "bce":
        x = x[x.isnan() | ((x >= 0) & (x <= 1))]
    w = torch.linspace(0.5, 2.0, 7)
    constants = [(w, 0, 1), (w.flip(0), 3, 1)][:2 if loss == "logits" else 1 if loss != "focal" else 0]
    for y_value, shift in ((0.0, 0), (1.0, 1), (0.3, 0), (0.3, 1)):  # shift: each pattern at the other parity
        xs = x.roll(shift)
        t = torch.full_like(xs, y_value)
        kw = {"constants": constants} if weighted else {}
        low, ref = _bf16_call(loss, xs, t, **kw), _bf16_call(loss, xs.float(), t.float(), **kw)
        for a, b in zip(low[1:], ref[1:]):
            _assert_bf16_rounds(a + 0, (b.to(torch.bfloat16) + 0).float())  # -0 + 0 is +0


def test_bfloat16_pairs_nan_and_inf():
    # NaN and inf at even and odd positions, in the 16-element groups and in the tail: a block with a NaN or
    # an infinite output is rounded again with the NaN fix-up; the other blocks keep the fast rounding
    g = _gen(3)
    for loss in LOSSES:
        x, t = (v.to(torch.bfloat16) for v in _inputs(loss, (2 * 1024 + 21,), seed=4))
        specials = [float("nan"), float("inf"), float("-inf")] if loss != "bce" else [float("nan"), 0.0, 1.0]
        for k, pos in enumerate(torch.randint(0, 1024, (6,), generator=g).tolist() + [2 * 1024 + 3, 2 * 1024 + 20]):
            x[pos] = specials[k % 3]
        t[1024 + 7] = float("nan")
        low = _bf16_call(loss, x, t)
        ref = _bf16_call(loss, x.float(), t.float())
        for a, b in zip(low[1:], ref[1:]):
            _assert_bf16_rounds(a, b)
        assert math.isnan(_bf16_call(loss, x, t, want_loss=False)[0])


def test_bfloat16_pairs_thread_counts_agree_exactly():
    # 64 x 4099 = 262336 elements: two threads take them (one per 64K elements); per-block sums in pair order
    for loss in LOSSES:
        x, t = (v.to(torch.bfloat16) for v in _inputs(loss, (64, 4099)))
        gx1, gx2 = torch.empty_like(x), torch.empty_like(x)
        sums = [native_binary.binary(loss, x, t, g, None, None, [], row_len=0, scale=1.0, acc=torch.float32,
                                     alpha=0.25, gamma=2.0, threads=k) for k, g in ((1, gx1), (2, gx2))]
        assert sums[0] == sums[1] and torch.equal(gx1, gx2)


# --- layouts: strided, sliced, broadcast, long rows ----------------------------------------------------

@pytest.mark.parametrize("loss", LOSSES)
def test_non_contiguous_operands(loss):
    x, t = _inputs(loss, (12, 10), torch.float32)
    views = [(x.t(), t.t()), (x[:, ::3], t[:, ::3]), (x[1:-1, 2:], t[1:-1, 2:]),
             (x[:, :5], t[0, :5].expand(12, 5))]  # a target broadcast along the rows (stride 0)
    for a, b in views:
        w = _weight("last", tuple(a.shape), torch.float32)
        for reduction in REDUCTIONS:
            weight = w if loss != "focal" else None
            assert_same_results(loss_and_grads(_call(loss, "compiled", reduction, weight), a, b),
                                loss_and_grads(_call(loss, "torch", reduction, weight), a, b))


def test_rows_longer_than_caches_and_pieces(monkeypatch):
    # soft margin sums over the last dim: 150001 float32 entries per row (586 KiB, above a 512 KiB L2);
    # transposed, the row is also longer than a piece, whose sums are added to the row's entry
    x, t = _inputs("soft_margin", (2, 150001), torch.float32)
    w = _weight("last", (2, 150001), torch.float32)
    for a, b in ((x, t), (x.t().contiguous().t(), t)):
        for reduction in REDUCTIONS:
            assert_same_results(loss_and_grads(_call("soft_margin", "compiled", reduction, w), a, b),
                                loss_and_grads(_call("soft_margin", "torch", reduction, w), a, b))
    monkeypatch.setattr(elementwise, "CHUNK", 1000)  # many pieces, some in the middle of a row
    for loss in LOSSES:
        x, t = _inputs(loss, (3, 4001), torch.float32)
        a, weight = x.t().contiguous().t(), w[:4001] if loss != "focal" else None
        assert_same_results(loss_and_grads(_call(loss, "compiled", "none", weight), a, t),
                            loss_and_grads(_call(loss, "torch", "none", weight), a, t))


def test_thread_counts_agree_exactly():
    # 64 x 4099 = 262336 elements: two threads take them (one per 64K elements), split mid-block
    saved = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for loss in LOSSES:
                x, t = _inputs(loss, (64, 4099), torch.float32)
                w = _weight("last", (64, 4099), torch.float32) if loss != "focal" else None
                for reduction in ("none", "sum"):
                    results[threads, loss, reduction] = loss_and_grads(_call(loss, "compiled", reduction, w), x, t)
    finally:
        torch.set_num_threads(saved)
    for (threads, loss, reduction), res in results.items():
        if threads == 2:
            for a, b in zip(res, results[1, loss, reduction]):
                assert torch.equal(a, b), (loss, reduction)


# --- edge values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_edge_values_like_torch_path(dtype):
    # BCE at the clamps (log 0 -> -100, (1 - x) x floored at 1e-12) and NaN; logits at +-inf, large, NaN
    p = torch.tensor([0.0, 1.0, 0.0, 1.0, 1e-30, 1 - 1e-7, 0.5, float("nan"), 0.3], dtype=dtype)
    tp = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.5, float("nan"), 0.5, 1.0], dtype=dtype)
    x = torch.tensor([float("inf"), float("-inf"), float("inf"), float("-inf"), 200.0, -200.0, 90.0, -90.0,
                      float("nan"), 0.0, 1e-8], dtype=dtype)
    tx = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, float("nan"), 0.5], dtype=dtype)
    for reduction in REDUCTIONS:
        _assert_same(loss_and_grads(_call("bce", "compiled", reduction), p, tp),
                     loss_and_grads(_call("bce", "torch", reduction), p, tp))
        for loss in ("logits", "soft_margin", "focal"):
            _assert_same(loss_and_grads(_call(loss, "compiled", reduction), x, tx),
                         loss_and_grads(_call(loss, "torch", reduction), x, tx))
    for a, b in ((p, tp), (x, tx)):  # the unweighted and pos_weight forms of BCE with logits too
        pw = torch.full_like(b, 3.0)
        _assert_same(loss_and_grads(_call("logits", "compiled", "none", pos_weight=pw), a, b),
                     loss_and_grads(_call("logits", "torch", "none", pos_weight=pw), a, b))


def test_empty_and_modules():
    for shape in ((0,), (3, 0), (0, 4)):
        for loss in LOSSES:
            x, t = _inputs(loss, shape)
            for reduction in REDUCTIONS:
                _assert_same(loss_and_grads(_call(loss, "compiled", reduction), x, t),
                             loss_and_grads(_call(loss, "torch", reduction), x, t))
    x, t = _inputs("logits", (4, 6))
    w = _weight("last", (4, 6))
    modules = [(LN.BCEWithLogitsLoss(w, pos_weight=w, impl="compiled"), "logits"),
               (LN.MultiLabelSoftMarginLoss(w, impl="compiled"), "soft_margin"),
               (LN.SigmoidFocalLoss(0.3, 1.5, reduction="mean", impl="compiled"), "focal")]
    for module, loss in modules:
        functional = _call(loss, "compiled", module.reduction, w if loss != "focal" else None,
                           w if loss == "logits" else None, 0.3, 1.5)
        assert_same_results(loss_and_grads(module, x, t), loss_and_grads(functional, x, t))
    p = x.sigmoid()
    assert_matches_reference(LN.BCELoss(w, impl="compiled"), _call("bce", "torch", "mean", w), p, t)


# --- errors ----------------------------------------------------------------------------------------------

def test_bad_input_is_an_exception():
    x = torch.full((3, 5), 0.5)
    bad = x.clone()
    bad[2, 4] = 1.5
    with pytest.raises(ValueError, match=r"input must have all elements in \[0, 1\], found 1.5"):
        LF.binary_cross_entropy(bad, x, impl="compiled")
    with pytest.raises(ValueError, match=r"target must have all elements in \[0, 1\], found -0.25"):
        LF.binary_cross_entropy(x, torch.full_like(x, -0.25), impl="compiled")
    for fn in (LF.binary_cross_entropy_with_logits, LF.multilabel_soft_margin_loss):
        with pytest.raises(ValueError, match="impl"):
            fn(x, x, impl="fast")
    with pytest.raises(ValueError, match="impl"):
        LF.sigmoid_focal_loss(x, x, impl="fast")
    with pytest.raises(ValueError, match="CPU tensors"):
        LF.binary_cross_entropy_with_logits(x.to("meta"), x.to("meta"), impl="compiled")
    # a floating dtype the kernel does not store: the composite under "auto", an error under "compiled"
    x8 = x.to(torch.float8_e4m3fn)
    assert _dispatch.backend("binary", "auto", x8, x) == "composite"
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        _dispatch.backend("binary", "compiled", x8, x)


def test_wrapper_rejects_operands_it_cannot_take():
    x = torch.rand(4, 6)
    call = native_binary.binary
    kw = {"row_len": 0, "scale": 1.0, "acc": torch.float32}
    with pytest.raises(ValueError, match="operand x"):
        call("logits", x.t(), x, None, None, None, [], **kw)
    with pytest.raises(ValueError, match="operand y"):
        call("logits", x, x[:2], None, None, None, [], **kw)
    with pytest.raises(ValueError, match="operand gx"):
        call("logits", x, x, torch.empty(24, dtype=torch.float64), None, None, [], **kw)
    with pytest.raises(ValueError, match="operand out"):
        call("logits", x, x, None, None, torch.empty(4, dtype=torch.float64), [], **{**kw, "row_len": 6})
    with pytest.raises(ValueError, match="row_len"):
        call("logits", x, x, None, None, torch.empty(4), [], **{**kw, "row_len": 5})
    with pytest.raises(ValueError, match="operand weight"):
        call("logits", x, x, None, None, None, [(torch.ones(6, dtype=torch.float64), 0, 1)], **kw)
    with pytest.raises(ValueError, match="operand pos_weight"):
        call("logits", x, x, None, None, None, [None, (torch.ones(6), 0, 0)], **kw)
    with pytest.raises(ValueError, match="kind"):
        call("hinge", x, x, None, None, None, [], **kw)
    with pytest.raises(ValueError, match="acc"):
        call("logits", x, x, None, None, None, [], **{**kw, "acc": torch.float16})
