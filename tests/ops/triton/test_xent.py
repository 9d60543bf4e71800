"""The Triton cross-entropy and nll_loss row kernels (through the interpreter) against losskit's torch path
and a float64 truth.

``xent_rows`` against ``losskit.functional.cross_entropy`` / ``focal_loss(..., reduction="none",
impl="torch")`` and their autograd gradients (input and probability target), and within fixed bounds (eps
of the result's dtype) of ``torch.nn.functional.cross_entropy`` in float64 (the focal loss: its formula in
float64) on the same inputs; ``nll_rows`` likewise against ``nll_loss``. Every option (ignore_index,
class weights, label smoothing, focal gamma 0 / 2 / 0.5, probability targets with their gradient, a
scale as a float and as a 0-dim tensor) on every (N, C, L) layout (L = 1 and L > 1, transposed and
channels-last views, C = 1, prime C, rows of several blocks with ``block=16``), in float32, bfloat16 and
float16; the in-place step (``grad3`` is ``x3``), special rows (-inf, NaN), out-of-range targets and
float64 input.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", minversion="3.8")  # the oldest the kernels build with (ops/_dispatch.py)

import torch
import torch.nn.functional as F
from _helpers import INF, INTERPRETER_WARNINGS, LOW, gen, normwise, refuses_block, refuses_float64

import losskit.functional as LF
from losskit.ops.triton import xent as TX
from losskit.ops.triton._tiles import RowTiles
from losskit.testing import assert_close, assert_within_eps

pytestmark = INTERPRETER_WARNINGS

#: name -> (contiguous base shape, the (N, C, L) view taken of it, BLOCK_C or None for the default).
LAYOUTS = {
    "rows": ((6, 37, 1), lambda t: t, None),
    "rows_of_three_blocks": ((6, 37, 1), lambda t: t, 16),
    "prime_c": ((3, 257, 1), lambda t: t, None),
    "prime_c_of_17_blocks": ((3, 257, 1), lambda t: t, 16),
    "positions": ((2, 37, 5), lambda t: t, 16),  # L > 1: classes 5 apart
    "positions_one_block": ((3, 11, 7), lambda t: t, None),
    "transposed": ((37, 6), lambda t: t.t().unsqueeze(-1), 16),  # classes 6 apart, rows adjacent
    "channels_last": ((2, 5, 13), lambda t: t.permute(0, 2, 1), None),  # classes adjacent, positions 13 apart
    "c1": ((5, 1, 3), lambda t: t, None),
}
LOW_LAYOUTS = ["rows_of_three_blocks", "positions", "transposed"]

#: name -> (loss, options, target kind). "index_ignored": every third position has ignore_index.
CASES = {
    "plain": (LF.cross_entropy, {}, "index"),
    "weight_ignored": (LF.cross_entropy, {"weight": True}, "index_ignored"),
    "smoothing_ignored": (LF.cross_entropy, {"label_smoothing": 0.15}, "index_ignored"),
    "weight_smoothing_ignored": (LF.cross_entropy, {"weight": True, "label_smoothing": 0.3}, "index_ignored"),
    "ignore_index_in_range": (LF.cross_entropy, {"ignore_index": 2}, "index"),
    "focal_gamma_0": (LF.focal_loss, {"gamma": 0.0}, "index_ignored"),
    "focal_gamma_2": (LF.focal_loss, {"gamma": 2.0, "weight": True}, "index_ignored"),
    "focal_gamma_half": (LF.focal_loss, {"gamma": 0.5}, "index"),
    "probabilities": (LF.cross_entropy, {}, "prob"),
    "probabilities_smoothing_weight": (LF.cross_entropy, {"weight": True, "label_smoothing": 0.2}, "prob"),
}

#: The cases run in bfloat16 and float16 too: between them, every option.
LOW_CASES = ["weight_ignored", "weight_smoothing_ignored", "focal_gamma_2", "probabilities_smoothing_weight"]

#: Bounds in eps of the result's dtype against the float64 truth on the same inputs: (loss per element,
#: gradient normwise, i.e. relative to its largest |entry|). float32: exp of x - max rounded once and
#: float32 sums, every loss a sum of terms >= 0 (module docstring): a few eps. Low precision: the float32
#: result rounded once to the dtype (the interpreter truncates to bfloat16): under one eps of it; the loss
#: stays float32.
F32_BOUNDS = (4, 4)
LOW_GRAD_BOUND = 1


def _operands(layout, kind, *, dtype=torch.float32, seed=0, ignore_index=-100):
    """(x3, target, weight) for ``layout``: float logits (normal, scale 3) viewed as (N, C, L); index targets
    (N*L,) int64 (every third position ``ignore_index`` for "index_ignored") or probabilities viewed as x3
    is (float32); class weights in [0.5, 1.5)."""
    base, view, _ = LAYOUTS[layout]
    x3 = view((torch.randn(base, generator=gen(seed)) * 3).to(dtype))
    n, c, length = x3.shape
    if kind == "prob":
        target = view(torch.rand(base, generator=gen(seed + 1)) + 0.1)
        target.div_(target.sum(1, keepdim=True))  # each position's classes sum to 1; the view's strides kept
    else:
        target = torch.randint(0, c, (n * length,), generator=gen(seed + 1))
        if kind == "index_ignored":
            target[::3] = ignore_index
    weight = torch.rand(c, generator=gen(seed + 2)) + 0.5
    return x3, target, weight


def _options(kw, weight):
    return {**kw, "weight": weight} if kw.get("weight") is True else kw


def _ours(x3, target, *, weight=None, ignore_index=-100, label_smoothing=0.0, gamma=0.0, scale=1.0, block=None):
    """(loss (N, L) float32, d/dx3 in x3's dtype, d/dtarget or None) from ``xent_rows``."""
    n, _, length = x3.shape
    loss = torch.empty(n, length)
    grad = torch.empty(x3.shape, dtype=x3.dtype)
    tgrad = torch.empty(target.shape, dtype=target.dtype) if target.is_floating_point() else None
    TX.xent_rows(x3, target, grad, tgrad, weight, loss, ignore_index=ignore_index, label_smoothing=label_smoothing,
                 gamma=gamma, scale=scale, block=block)
    return loss, grad, tgrad


def _autograd(fn, x3, target, scale, dtype, **kwargs):
    """(loss, d/dx, d/dtarget or None) of ``fn(x3, target) * scale`` (the (N, L) loss), x3 and probability
    targets converted to ``dtype``, index targets viewed (N, L)."""
    n, _, length = x3.shape
    x = x3.detach().to(dtype).requires_grad_()
    prob = target.is_floating_point()
    t = target.detach().to(dtype).requires_grad_() if prob else target.view(n, length)
    loss = fn(x, t, reduction="none", **kwargs)
    loss.backward(torch.full_like(loss, float(scale)))
    return loss.detach(), x.grad, t.grad if prob else None


def _focal64(x, t, *, reduction, weight=None, gamma, ignore_index=-100):
    """The focal loss's formula, -w_y (1 - p_y)^gamma log p_y (0 where ignored), per position."""
    assert reduction == "none"
    kept = t != ignore_index
    safe = t.masked_fill(~kept, 0)
    logp = x.log_softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
    w = weight[safe] if weight is not None else torch.ones_like(logp)
    q = (-torch.expm1(logp)).clamp_min(1e-300)  # q^gamma's derivative at q = 0 (C = 1) is 0 * inf in autograd
    return torch.where(kept, -w * q**gamma * logp, 0.0)


def _truth(fn, x3, target, scale, **kwargs):
    """The float64 truth of ``_autograd``: F.cross_entropy, or the focal loss's formula."""
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return _autograd(_focal64 if fn is LF.focal_loss else F.cross_entropy, x3, target, scale, torch.float64, **kw64)


def _xent_kwargs(fn, kw):
    """xent_rows's options for a call of ``fn`` with ``kw``."""
    return {"weight": kw.get("weight"), "ignore_index": kw.get("ignore_index", -100),
            "label_smoothing": kw.get("label_smoothing", 0.0), "gamma": kw.get("gamma", 0.0) if fn is LF.focal_loss
            else 0.0}


def _check(ours, reference, truth):
    """``ours`` (loss, grad, tgrad) against the torch path's ``reference`` (table tolerance) and within the
    bounds of the float64 ``truth`` (by the dtype of each result: the loss is float32, the gradients have
    the input's and the target's dtypes)."""
    for name, a, ref, tru in zip(("loss", "d/dinput", "d/dtarget"), ours, reference, truth):
        if tru is None:
            assert a is None, name
            continue
        assert a.shape == tru.shape, name
        assert_close(a, ref.to(a.dtype).view(a.shape), msg=name)
        if name == "loss":
            assert_within_eps(a, tru.view(a.shape), F32_BOUNDS[0], msg=name)
        else:
            bound = LOW_GRAD_BOUND if a.dtype in LOW else F32_BOUNDS[1]
            # C = 1: the gradient is 0, as a difference of terms near 1 (a few eps of 1, not exactly 0)
            assert_within_eps(a, tru, bound, floor=normwise(tru) or 1.0, msg=name)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_xent_float32_matches_torch_path_and_float64(layout, case):
    fn, kw, kind = CASES[case]
    x3, target, weight = _operands(layout, kind, ignore_index=kw.get("ignore_index", -100))
    kw = _options(kw, weight)
    ours = _ours(x3, target, **_xent_kwargs(fn, kw), block=LAYOUTS[layout][2])
    reference = _autograd(fn, x3, target, 1.0, torch.float32, impl="torch", **kw)
    _check(ours, reference, _truth(fn, x3, target, 1.0, **kw))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("layout", LOW_LAYOUTS)
@pytest.mark.parametrize("case", LOW_CASES)
def test_xent_low_precision_matches_the_float32_computation(layout, case, dtype):
    """bfloat16/float16 logits: the same computation on their float32 values, the gradient rounded once."""
    fn, kw, kind = CASES[case]
    x3, target, weight = _operands(layout, kind, dtype=dtype, ignore_index=kw.get("ignore_index", -100))
    kw = _options(kw, weight)
    ours = _ours(x3, target, **_xent_kwargs(fn, kw), block=LAYOUTS[layout][2])
    assert ours[1].dtype == dtype
    reference = _autograd(fn, x3.float(), target, 1.0, torch.float32, impl="torch", **kw)
    _check(ours, reference, _truth(fn, x3, target, 1.0, **kw))


@pytest.mark.parametrize("layout", ["rows_of_three_blocks", "positions"])
@pytest.mark.parametrize("case", ["weight_smoothing_ignored", "focal_gamma_2", "probabilities_smoothing_weight"])
def test_xent_scale_as_float_or_0dim_tensor(layout, case):
    """The gradients are ``scale * dloss/d...``; a 0-dim tensor scale (read by the kernel) gives the same
    bits as the float."""
    fn, kw, kind = CASES[case]
    x3, target, weight = _operands(layout, kind, seed=3)
    kw = _options(kw, weight)
    scale = 0.37
    ours = _ours(x3, target, **_xent_kwargs(fn, kw), scale=scale, block=LAYOUTS[layout][2])
    from_tensor = _ours(x3, target, **_xent_kwargs(fn, kw), scale=torch.tensor(scale), block=LAYOUTS[layout][2])
    for a, b in zip(ours, from_tensor):
        assert (a is None and b is None) or torch.equal(a, b)
    reference = _autograd(fn, x3, target, scale, torch.float32, impl="torch", **kw)
    _check(ours, reference, _truth(fn, x3, target, scale, **kw))


@pytest.mark.parametrize("layout", ["rows", "rows_of_three_blocks", "positions", "transposed"])
@pytest.mark.parametrize("case", ["weight_smoothing_ignored", "focal_gamma_2", "probabilities_smoothing_weight"])
def test_xent_in_place_gradient_equals_separate_output(layout, case):
    """``grad3`` is ``x3`` (same storage and strides): the logits become exactly the gradient that a
    separate output receives."""
    fn, kw, kind = CASES[case]
    x3, target, weight = _operands(layout, kind, seed=5)
    kwargs = {**_xent_kwargs(fn, _options(kw, weight)), "scale": 0.5, "block": LAYOUTS[layout][2]}
    loss, grad, tgrad = _ours(x3, target, **kwargs)
    work = x3.clone()  # the layout's strides are kept: clone preserves them for dense views
    assert work.stride() == x3.stride()
    in_place_loss = torch.empty_like(loss)
    in_place_tgrad = torch.empty_like(tgrad) if tgrad is not None else None
    TX.xent_rows(work, target, work, in_place_tgrad, kwargs["weight"], in_place_loss,
                 **{k: v for k, v in kwargs.items() if k != "weight"})
    assert torch.equal(in_place_loss, loss)
    assert torch.equal(work, grad)
    assert tgrad is None or torch.equal(in_place_tgrad, tgrad)


def test_xent_loss_near_zero_keeps_its_relative_accuracy():
    """p_y = 1 - 4e-6: the loss (about 4e-6) within 4 float32 eps of float64, as are the others; a float32
    ``log(sum exp)`` would round 1 + 4e-6 to a multiple of 1.2e-7 and be off by up to 1.5%."""
    x = torch.full((3, 37), -16.0)
    x[:, 5] = 0.0
    x[1, 6] = -4.0  # p_y = 0.98
    x[2, :20] = torch.linspace(-20, -1, 20)
    x3 = x.unsqueeze(-1)
    target = torch.tensor([5, 5, 5])
    for kw in ({}, {"label_smoothing": 1e-3}):
        loss, grad, _ = _ours(x3, target, **kw)
        t_loss, t_grad, _ = _truth(LF.cross_entropy, x3, target, 1.0, **kw)
        assert_within_eps(loss, t_loss.view(loss.shape), 4, msg=f"loss {kw}")
        assert_within_eps(grad, t_grad, 4, floor=normwise(t_grad), msg=f"d/dinput {kw}")
    # the focal loss is about (-log p_y)^3 there: three times the relative error of -log p_y
    loss, _, _ = _ours(x3, target, gamma=2.0)
    assert_within_eps(loss, _truth(LF.focal_loss, x3, target, 1.0, gamma=2.0)[0].view(loss.shape), 12,
                      msg="focal loss near 0")


@pytest.mark.parametrize("n_classes", [32768, 128256, 262144])
def test_xent_accuracy_holds_over_a_large_vocabulary(n_classes):
    """Rows of many blocks (the default 4096-column blocks: 8 to 64 per row), with and without a +1000
    offset: the loss within 4 float32 eps of float64, the gradient within 4 eps normwise (measured here:
    at most 1.05 and 0.45). Per element the gradient is off by up to 20 eps where ``x - max`` is rounded
    before the exp (``|x - max|`` about 18 rounds to 2^-20): torch's own float32 rows do the same, and
    the elementwise bound stays the C kernel's (tests/ops/cpu/test_row_accuracy.py)."""
    g = gen(n_classes)
    x = torch.randn(3, n_classes, generator=g) * 2
    x[1] += 1000
    target = torch.randint(0, n_classes, (3,), generator=g)
    for kw in ({}, {"label_smoothing": 0.1}):
        loss, grad, _ = _ours(x.unsqueeze(-1), target, **kw)
        t_loss, t_grad, _ = _truth(LF.cross_entropy, x.unsqueeze(-1), target, 1.0, **kw)
        assert_within_eps(loss, t_loss.view(loss.shape), 4, msg=f"loss {kw}")
        assert_within_eps(grad, t_grad, 4, floor=normwise(t_grad), msg=f"d/dinput {kw}")


def test_focal_gamma_beyond_the_products():
    """gamma = 11.5: 8 products of q (the kernel's cap) and one exp2 for q^3.5, within the same bounds
    (the exp2 adds |3.5 ln q| / 2 eps, about 1 where p_y is not near 1)."""
    x3, target, weight = _operands("rows_of_three_blocks", "index_ignored", seed=17)
    kw = {"gamma": 11.5, "weight": weight}
    ours = _ours(x3, target, **kw, block=16)
    truth = _truth(LF.focal_loss, x3, target, 1.0, **kw)
    assert_within_eps(ours[0], truth[0], F32_BOUNDS[0], msg="loss")
    assert_within_eps(ours[1], truth[1], F32_BOUNDS[1], floor=normwise(truth[1]), msg="d/dinput")


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("kind", ["index", "smoothing", "prob"])
def test_xent_special_rows_as_torch(block, kind):
    """Rows of only -inf and rows with a NaN: NaN loss and gradient; -inf entries beside a finite max:
    p = 0 there (an infinite loss where the target or the smoothing reads them, NaN for 0 * -inf)."""
    x = torch.randn(5, 37, generator=gen(7)) * 3
    x[0] = -INF
    x[1, 20] = float("nan")
    x[2, :18] = -INF  # the first block of 16 is all -inf, the max comes later
    x[3, 30] = -INF  # the target's logit
    x3 = x.unsqueeze(-1)
    if kind == "prob":
        target = torch.rand(5, 37, generator=gen(8)).unsqueeze(-1)
        target[2, :18] = 0.0  # 0 * -inf: NaN, as torch
        kw = {}
    else:
        target = torch.tensor([3, 3, 25, 30, 1])
        kw = {"label_smoothing": 0.1} if kind == "smoothing" else {}
    ours = _ours(x3, target, **kw, block=block)
    truth = _truth(LF.cross_entropy, x3, target, 1.0, **kw)
    for name, a, t in zip(("loss", "d/dinput", "d/dtarget"), ours, truth):
        if t is not None:
            assert_within_eps(a, t.view(a.shape), 4, floor=1.0, msg=name)  # NaN and infinities where torch's


@pytest.mark.parametrize("layout", ["rows_of_three_blocks", "positions"])
def test_out_of_range_targets_give_nan_rows_not_a_crash(layout):
    """A target neither in [0, C) nor ignore_index is never an address: its loss and gradient row are
    NaN, every other position as without it."""
    x3, target, weight = _operands(layout, "index_ignored", seed=11)
    n, c, length = x3.shape
    bad = target.clone()
    bad[1], bad[4], bad[-1] = c, -5, 10**12
    rows = torch.tensor([1, 4, n * length - 1])
    good = torch.ones(n * length, dtype=torch.bool)
    good[rows] = False
    block = LAYOUTS[layout][2]

    def per_row(g):  # (N, C, L) -> (N*L, C), the gradient row of each position
        return g.permute(0, 2, 1).reshape(n * length, c)

    for kw in ({"weight": weight}, {"label_smoothing": 0.2}, {"gamma": 2.0}):
        loss, grad, _ = _ours(x3, bad, **kw, block=block)
        ok_loss, ok_grad, _ = _ours(x3, target, **kw, block=block)
        assert loss.view(-1)[rows].isnan().all() and per_row(grad)[rows].isnan().all(), kw
        assert torch.equal(loss.view(-1)[good], ok_loss.view(-1)[good])
        assert torch.equal(per_row(grad)[good], per_row(ok_grad)[good])
    loss = torch.empty(n, length)
    grad = torch.empty(x3.shape)
    TX.nll_rows(x3, bad, grad, weight, loss, ignore_index=-100, scale=1.0, block=block)
    ok_loss = torch.empty(n, length)
    ok_grad = torch.empty(x3.shape)
    TX.nll_rows(x3, target, ok_grad, weight, ok_loss, ignore_index=-100, scale=1.0, block=block)
    assert loss.view(-1)[rows].isnan().all() and per_row(grad)[rows].isnan().all()
    assert torch.equal(loss.view(-1)[good], ok_loss.view(-1)[good])
    assert torch.equal(per_row(grad)[good], per_row(ok_grad)[good])


def test_float64_input_and_bad_block_are_refused():
    x3 = torch.randn(2, 5, 1, dtype=torch.float64)
    target = torch.tensor([0, 1])
    with refuses_float64("x3"):
        TX.xent_rows(x3, target, None, None, None, torch.empty(2, 1), ignore_index=-100, label_smoothing=0.0,
                     gamma=0.0, scale=1.0)
    with refuses_float64("x3"):
        TX.nll_rows(x3, target, None, None, torch.empty(2, 1), ignore_index=-100, scale=1.0)
    with refuses_block(12):
        TX.nll_rows(x3.float(), target, None, None, torch.empty(2, 1), ignore_index=-100, scale=1.0, block=12)


@pytest.mark.parametrize(("shape", "view", "tiles"), [
    ((32768, 262144, 1), None, ((32768,), 1, 4096, 16)),  # an LM head: one row per program, 64 blocks
    ((32768, 10, 1), None, ((256,), 128, 16, 8)),  # short rows share a tile, at most 128 of them
    ((8, 19, 512 * 512), None, ((16384,), 128, 32, 16)),  # segmentation: 128 adjacent positions per class
    ((256, 1000, 49), None, ((512,), 32, 128, 16)),  # positions strided: 32 of them, 128 classes a step
    ((1000, 4096), "t", ((128,), 32, 128, 16)),  # an (N, C) view of (C, N): 32 adjacent rows
])
def test_tiles_follow_the_row_length_and_the_class_stride(shape, view, tiles):
    """The launch of real GPU sizes (meta tensors: only shapes and strides are read), as ``Tiling`` and
    ``RowTiles`` say: (grid, BLOCK_R, BLOCK_C, num_warps)."""
    x3 = torch.empty(shape, device="meta", dtype=torch.bfloat16)
    if view == "t":
        x3 = x3.t().unsqueeze(-1)
    geo = RowTiles.of(x3, TX._TILING)
    assert (geo.grid, *geo.options.values()) == tiles


def test_loss_only_writes_no_gradient():
    """Without gradient outputs the loss is the same (pass 2 skipped)."""
    x3, target, weight = _operands("rows_of_three_blocks", "index_ignored", seed=13)
    loss = torch.empty(6, 1)
    TX.xent_rows(x3, target, None, None, weight, loss, ignore_index=-100, label_smoothing=0.1, gamma=0.0, scale=1.0,
                 block=16)
    assert torch.equal(loss, _ours(x3, target, weight=weight, label_smoothing=0.1, block=16)[0])


# ---- nll_loss ---------------------------------------------------------------------------------------

NLL_CASES = {
    "plain": ({}, "index"),
    "weight_ignored": ({"weight": True}, "index_ignored"),
    "ignore_index_in_range": ({"ignore_index": 2}, "index"),
}


def _nll_ours(x3, target, *, weight=None, ignore_index=-100, scale=1.0, block=None):
    n, _, length = x3.shape
    loss = torch.empty(n, length)
    grad = torch.empty(x3.shape, dtype=x3.dtype)
    TX.nll_rows(x3, target, grad, weight, loss, ignore_index=ignore_index, scale=scale, block=block)
    return loss, grad


@pytest.mark.parametrize(("layout", "dtype"), [(layout, torch.float32) for layout in LAYOUTS]
                         + [(layout, dtype) for layout in LOW_LAYOUTS for dtype in LOW], ids=str)
@pytest.mark.parametrize("case", list(NLL_CASES))
def test_nll_matches_torch_path_and_float64(case, layout, dtype):
    """loss = -w_y x[y] (one product: within an eps of float64) and the gradient -w_y * scale at y, zeros
    elsewhere (exact in float32; rounded once to the dtype), with a 0-dim tensor scale."""
    kw, kind = NLL_CASES[case]
    x3, target, weight = _operands(layout, kind, dtype=dtype, ignore_index=kw.get("ignore_index", -100))
    logp = x3.float().log_softmax(1).to(dtype)  # log-probabilities, in x3's layout (strides kept)
    logp = torch.empty_strided(x3.shape, x3.stride(), dtype=dtype).copy_(logp)
    kw = _options(kw, weight)
    scale = torch.tensor(0.25)
    loss, grad = _nll_ours(logp, target, **kw, scale=scale, block=LAYOUTS[layout][2])
    ref_loss, ref_grad, _ = _autograd(LF.nll_loss, logp.float(), target, 0.25, torch.float32, impl="torch", **kw)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad.to(dtype))
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    t_loss, t_grad, _ = _autograd(F.nll_loss, logp, target, 0.25, torch.float64, **kw64)
    assert_within_eps(loss, t_loss, 1, msg="loss")
    assert_within_eps(grad, t_grad, 1, msg="d/dinput")
