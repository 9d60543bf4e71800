"""The Triton elementwise kernels (losskit.ops.triton.elementwise), through Triton's interpreter: every kind
and option against the reference runner (losskit.ops.reference.elementwise.run with the loss's torch
kernel, same dtypes) and against torch's own losses in float64 (autograd for the gradients), bounded in
eps of the result's dtype; reductions, row sums, broadcast, strided and integer operands, rows split over
tiles, bfloat16 and float16 (both run in the interpreter), a device-tensor grad_scale, and the refusals."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", minversion="3.8")  # the oldest the kernels build with (ops/_dispatch.py)

from _helpers import INTERPRETER_WARNINGS, LOW, assert_identical, refuses_float64

from losskit.ops.reference import elementwise as reference
from losskit.ops.reference import losses
from losskit.ops.reference.elementwise import KL_LOG, KL_PROB, MSE
from losskit.ops.triton import elementwise
from losskit.testing import assert_close, assert_within_eps

pytestmark = INTERPRETER_WARNINGS

F64 = torch.float64
REDUCTIONS = ["none", "mean", "sum"]
POINTWISE = {"mse": MSE, "kl_prob": KL_PROB, "kl_log": KL_LOG}
#: The constants each kind takes after input and target.
CONSTANTS = {"bce": 1, "logits": 2, "soft_margin": 1, "focal": 0, "mse": 1, "kl_prob": 0, "kl_log": 0}
#: Float32 results within this many float32 eps of the float64 truth, relative to max(1, |truth|) (max(s,
#: |truth|) for gradients scaled by s): measured at most 4.5 eps (BCE with logits), 3 (focal), 2 or less
#: (the others) in the interpreter; 16 leaves room for a GPU's exp (ex2.approx: about |x| + 2 ulp).
EPS_F32 = 16
#: bfloat16/float16 results: the float32 value rounded once plus its float32 error. Rounding is half an
#: eps on a GPU, but the interpreter truncates float32 to bfloat16 (its cast ignores the rounding mode):
#: up to one eps, 0.97 measured (float16 is rounded to nearest by numpy: 0.48).
EPS_HALF = 2


def _runner(kind, alpha=0.25, gamma=2.0):
    if kind in POINTWISE:
        return elementwise.pointwise_runner(POINTWISE[kind])
    return elementwise.binary_runner(kind, alpha=alpha, gamma=gamma)


def _kernel(kind, alpha=0.25, gamma=2.0):
    """The torch kernel of ``kind``: the reference runner's expression."""
    return {"bce": losses.bce, "logits": losses.bce_logits, "soft_margin": losses.soft_margin,
            "focal": partial(losses.focal, alpha=alpha, gamma=gamma), "mse": losses.mse,
            "kl_prob": losses.kl_prob_target, "kl_log": losses.kl_log_target}[kind]


def _constant(how, shape, gen):
    """A positive constant of the named broadcast pattern: per class ``C``, per row ``rows``, ``scalar``,
    ``full``; or None."""
    if how is None:
        return None
    cshape = {"C": shape[-1:], "rows": (shape[0], 1), "scalar": (), "full": shape}[how]
    return 0.5 + 2 * torch.rand(cshape, generator=gen, dtype=F64)


def _operands(kind, shape, weight=None, pos_weight=None, seed=0):
    """float64 ``[input, target, *constants]``: probabilities for BCE, logits or log-probabilities
    otherwise; targets in [0, 1] with a third exactly 0 or 1 (normal for mse and kl_log)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand if kind == "bce" else torch.randn)(shape, generator=gen, dtype=F64)
    if kind not in ("bce", "kl_prob"):
        x *= 3
    if kind in ("mse", "kl_log"):
        y = torch.randn(shape, generator=gen, dtype=F64)
    else:
        y = torch.rand(shape, generator=gen, dtype=F64)
        y.view(-1)[::3] = y.view(-1)[::3].round()
    constants = [_constant(weight, shape, gen), _constant(pos_weight, shape, gen)]
    return [x, y, *constants[:CONSTANTS[kind]]]


def _to(ops, dtype):
    return [None if op is None else op.to(dtype) if op.is_floating_point() else op for op in ops]


def _call(run, kind, ops, reduction, *, out_dtype=None, want=None, grad_scale=None, **kw):
    """``(loss, grads[:2])`` of a runner: the unreduced loss (row sums for soft margin), or the sum of the
    partial sums; ``want`` defaults to the floating ones of input and target."""
    x, y = ops[:2]
    want = want or (True, y.is_floating_point())
    if grad_scale is None:
        grad_scale = 1 / max(x.numel(), 1) if reduction == "mean" else 1.0
    out_dtype = out_dtype or torch.promote_types(x.dtype, y.dtype if y.is_floating_point() else x.dtype)
    acc = F64 if out_dtype == F64 else torch.float32
    keep = reduction == "none"
    with torch.no_grad():
        loss, grads = run(_kernel(kind, **kw), ops, (*want, *[False] * (len(ops) - 2)), acc=acc,
                          out_dtype=out_dtype, keep=keep, grad_scale=grad_scale, sum_last_dim=kind == "soft_margin")
    return (loss if keep else loss.sum()), grads[:2]


def _assert_same(actual, expected):
    """Loss and gradients of two runs within the table's tolerance of the actual's dtype, None alike."""
    for name, a, b in zip(("loss", "d/dinput", "d/dtarget"), (actual[0], *actual[1]), (expected[0], *expected[1])):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
            assert_close(a, b, msg=name)


def _torch_loss(kind, x, y, constants, alpha=0.25, gamma=2.0):
    """torch's own unreduced loss (soft margin: per-row sums, torch's row mean times C); the focal loss
    is torchvision's definition, written out."""
    w, p = (*constants, None, None)[:2]
    if kind == "bce":
        return F.binary_cross_entropy(x, y, w, reduction="none")
    if kind == "logits":
        return F.binary_cross_entropy_with_logits(x, y, w, reduction="none", pos_weight=p)
    if kind == "soft_margin":
        return F.multilabel_soft_margin_loss(x, y, w, reduction="none") * x.shape[-1]
    if kind == "focal":
        s = torch.sigmoid(x)
        p_t = s * y + (1 - s) * (1 - y)
        loss = F.binary_cross_entropy_with_logits(x, y, reduction="none") * (1 - p_t) ** gamma
        return loss * (alpha * y + (1 - alpha) * (1 - y)) if alpha >= 0 else loss
    if kind == "mse":
        return F.mse_loss(x, y, reduction="none", weight=w)
    return F.kl_div(x, y, reduction="none", log_target=kind == "kl_log")


def _truth(kind, ops, **kw):
    """``(loss, [d/dinput, d/dtarget])`` of torch's loss in float64, for a grad_output of ones."""
    x = ops[0].to(F64).requires_grad_()
    y = ops[1].to(F64).requires_grad_() if ops[1].is_floating_point() else ops[1].to(F64)
    loss = _torch_loss(kind, x, y, [None if c is None else c.to(F64) for c in ops[2:]], **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), [x.grad, y.grad]


def _assert_near_truth(actual, truth, reduction, n, grad_scale=None, normwise_grads=False):
    """``actual`` (of :func:`_call`) within ``n`` eps of its dtype of the float64 ``truth`` (of
    :func:`_truth`): per element relative to max(1, |value|) (gradients: max(scale, |value|), or with
    ``normwise_grads`` relative to the largest); the total of a reduction relative to the sum of the
    absolute losses."""
    loss, grads = actual
    truth_loss, truth_grads = truth
    numel = max(truth_grads[0].numel(), 1)
    scale = grad_scale if grad_scale is not None else 1 / numel if reduction == "mean" else 1.0
    if reduction == "none":
        assert_within_eps(loss, truth_loss, n, floor=1, msg="loss")
    else:
        assert_within_eps(loss, truth_loss.sum(), n, floor=max(1.0, truth_loss.abs().sum().item()), msg="sum")
    for name, g, t in zip(("d/dinput", "d/dtarget"), grads, truth_grads):
        if g is not None:
            floor = scale * max(1.0, t.abs().max().item()) if normwise_grads else scale
            assert_within_eps(g, t * scale, n, floor=floor, msg=name)


def _cases():
    weights = [None, "C", "rows", "scalar", "full"]
    cases = [(kind, w, None) for kind in ("bce", "logits", "soft_margin") for w in weights]
    cases += [("logits", w, "C") for w in (None, "C", "full")]
    return cases + [("focal", None, None), ("mse", None, None), ("mse", "full", None), ("kl_prob", None, None),
                    ("kl_log", None, None)]


# --- every kind and option, float32 ---------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind, weight, pos_weight", _cases())
def test_matches_reference_runner_and_torch_float64(kind, weight, pos_weight, reduction):
    ops = _operands(kind, (3, 37), weight, pos_weight)
    ops32 = _to(ops, torch.float32)
    actual = _call(_runner(kind), kind, ops32, reduction)
    _assert_same(actual, _call(reference.run, kind, ops32, reduction))
    _assert_near_truth(actual, _truth(kind, ops32), reduction, EPS_F32)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 0.5), (0.6, 0.0), (0.1, 3.0), (0.9, 1.7)])
def test_focal_options(alpha, gamma):
    ops = _to(_operands("focal", (4, 29)), torch.float32)
    for reduction in ("none", "sum"):
        actual = _call(_runner("focal", alpha, gamma), "focal", ops, reduction, alpha=alpha, gamma=gamma)
        _assert_same(actual, _call(reference.run, "focal", ops, reduction, alpha=alpha, gamma=gamma))
        # ce = (1 - y) x - logsigmoid(x), torch's form and the reference's, keeps none of ce's digits below
        # x's ulp where x << 0 and y = 0; for gamma < 1, gamma ce / q carries that into d/dtarget: an error of
        # a few eps of |x| (143 eps of a 0.09 gradient at x = -9.4), within a few eps of the largest gradient.
        _assert_near_truth(actual, _truth("focal", ops, alpha=alpha, gamma=gamma), reduction, EPS_F32,
                           normwise_grads=True)


# --- sizes and tiles ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(CONSTANTS))
@pytest.mark.parametrize("shape", [(1,), (37,), (1007,), (2, 1007)])
def test_odd_sizes_over_several_tiles(kind, shape):
    """1, a prime, 1000 + 7 (four tiles of 256), and rows longer than a tile (soft margin: row sums
    gathered over the tiles of a row)."""
    ops = _to(_operands(kind, shape, "C" if CONSTANTS[kind] else None), torch.float32)
    if kind == "mse" and ops[2] is not None:
        ops[2] = ops[2].expand(shape).contiguous()  # mse_loss's weight has the input's exact shape
    for reduction in ("none", "sum"):
        actual = _call(partial(_runner(kind), tile=256), kind, ops, reduction)
        _assert_same(actual, _call(reference.run, kind, ops, reduction))
        _assert_near_truth(actual, _truth(kind, ops), reduction, EPS_F32)


@pytest.mark.parametrize("shape, tile", [((5, 37), 16), ((64, 3), 16), ((3, 4, 37), 64)])
def test_tile_size_changes_no_element(shape, tile):
    """Rows split over column tiles, or several rows to a tile: the elementwise outputs are the same bits
    as with the default tile, the row sums the same within float32's tolerance."""
    for kind in ("soft_margin", "logits"):
        ops = _to(_operands(kind, shape, "C"), torch.float32)
        small = _call(partial(_runner(kind), tile=tile), kind, ops, "none")
        default = _call(_runner(kind), kind, ops, "none")
        for a, b in zip(small[1], default[1]):
            assert_identical(a, b)
        if kind == "soft_margin":
            assert_close(small[0], default[0])
        else:
            assert_identical(small[0], default[0])


def test_tile_shape():
    """(BLOCK_R, BLOCK_C, num_warps) of (cols, rows), as the runners' launch chooses them."""
    tiling = elementwise._Launch(0, 0.0, 0.0, 1.0, elementwise.TILE).tiling
    assert tiling.shape(10**6, 1) == (1, 2048, 8)  # a long row: tiles of 2048 columns
    assert tiling.shape(3, 10**6) == (512, 4, 8)  # short rows: 512 to a tile (no cap of 128 rows)
    assert tiling.shape(5, 2) == (2, 8, 1)  # a small input: a small tile, one warp
    with pytest.raises(ValueError, match="tile must be a power of two, got 100"):
        _call(partial(_runner("mse"), tile=100), "mse", _to(_operands("mse", (2, 5)), torch.float32), "none")


@pytest.mark.parametrize("kind", list(CONSTANTS))
@pytest.mark.parametrize("shape", [(0,), (0, 5), (4, 0)])
def test_empty_input(kind, shape):
    ops = _to(_operands(kind, shape), torch.float32)
    for reduction in REDUCTIONS:
        loss, grads = _call(_runner(kind), kind, ops, reduction)
        _assert_same((loss, grads), _call(reference.run, kind, ops, reduction))
        if reduction != "none":
            assert loss.item() == 0.0  # no partial sums: a sum over nothing
        assert all(g.shape == shape for g in grads)


# --- layouts -----------------------------------------------------------------------------------------------

def _strided(t, how):
    """``t`` as a non-contiguous view with the same values: transposed, or every other column."""
    if how == "transposed":
        return t.t().contiguous().t()
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("how", ["transposed", "every_other"])
@pytest.mark.parametrize("kind", ["bce", "logits", "soft_margin", "focal", "mse", "kl_prob"])
def test_non_contiguous_operands(kind, how):
    ops = _to(_operands(kind, (6, 37), "full" if kind == "mse" else "C" if CONSTANTS[kind] else None), torch.float32)
    strided = [None if op is None else _strided(op, how) if op.dim() == 2 else op for op in ops]
    assert not strided[0].is_contiguous()
    for reduction in ("none", "mean"):
        actual = _call(_runner(kind), kind, strided, reduction)
        _assert_same(actual, _call(_runner(kind), kind, ops, reduction))
        _assert_same(actual, _call(reference.run, kind, strided, reduction))


def test_five_uncollapsible_dims_walk_the_first_dim():
    """A weight that varies along dims 1 and 3 of a 5-d input leaves five dims after collapsing: a loop of
    launches over the first dim."""
    shape = (2, 3, 2, 3, 2)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(shape, generator=gen), torch.rand(shape, generator=gen)
    w = 0.5 + torch.rand(3, 1, 3, 1, generator=gen)
    for reduction in REDUCTIONS:
        ops = [x, y, w, None]
        actual = _call(_runner("logits"), "logits", ops, reduction)
        _assert_same(actual, _call(reference.run, "logits", ops, reduction))


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("x_shape, t_shape", [((4, 37), (1, 37)), ((4, 37), (4, 1)), ((1, 37), (4, 37)),
                                              ((3, 1, 5), (1, 4, 1))])
def test_kl_broadcast_operands(x_shape, t_shape, log_target):
    """kl_div hands both operands as expanded views of the broadcast shape; the gradients have that shape."""
    kind = "kl_log" if log_target else "kl_prob"
    shape = torch.broadcast_shapes(x_shape, t_shape)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(x_shape, generator=gen)
    t = torch.randn(t_shape, generator=gen) if log_target else torch.rand(t_shape, generator=gen)
    ops = [x.expand(shape), t.expand(shape)]
    for reduction in REDUCTIONS:
        actual = _call(_runner(kind), kind, ops, reduction)
        assert all(g.shape == shape for g in actual[1])
        _assert_same(actual, _call(reference.run, kind, ops, reduction))
        _assert_near_truth(actual, _truth(kind, [op.contiguous() for op in ops]), reduction, EPS_F32)


# --- dtypes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("kind", list(CONSTANTS))
def test_half_precision(kind, dtype):
    """Loaded and computed in float32, stored once rounded: within an eps of the dtype of float64."""
    ops = _to(_operands(kind, (3, 37), "full" if CONSTANTS[kind] else None), dtype)
    for reduction in ("none", "mean"):
        actual = _call(_runner(kind), kind, ops, reduction)
        _assert_same(actual, _call(reference.run, kind, ops, reduction))
        loss, grads = actual
        if reduction == "none":  # the sum of partial sums is float32, bounded in the float32 test
            _assert_near_truth((loss, grads), _truth(kind, ops), reduction, EPS_HALF)


def test_mixed_dtypes_store_each_output_in_its_own():
    """bfloat16 logits, float32 targets and a float16 weight: the loss in the promoted float32, each
    gradient in its operand's dtype."""
    ops = _operands("logits", (3, 37), "C")
    ops = [ops[0].bfloat16(), ops[1].float(), ops[2].half(), None]
    actual = _call(_runner("logits"), "logits", ops, "none")
    assert [actual[0].dtype, *(g.dtype for g in actual[1])] == [torch.float32, torch.bfloat16, torch.float32]
    _assert_same(actual, _call(reference.run, "logits", ops, "none"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("kind", ["soft_margin", "mse"])
def test_integer_targets(kind, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 37, generator=gen)
    y = (torch.randint(0, 2, (4, 37), generator=gen) if kind == "soft_margin"
         else torch.randint(0, 5, (4, 37), generator=gen)).to(dtype)
    ops = [x, y, 0.5 + torch.rand(37 if kind == "soft_margin" else (4, 37), generator=gen)]
    for reduction in REDUCTIONS:
        actual = _call(_runner(kind), kind, ops, reduction)
        assert actual[1][1] is None
        _assert_same(actual, _call(reference.run, kind, ops, reduction))
        _assert_near_truth(actual, _truth(kind, ops), reduction, EPS_F32)


@pytest.mark.parametrize("kind", list(CONSTANTS))
def test_float64_is_refused(kind):
    ops = _operands(kind, (2, 5), "full" if CONSTANTS[kind] else None)
    with refuses_float64("input"):
        _call(_runner(kind), kind, ops, "none", out_dtype=torch.float32)
    with refuses_float64("out_dtype"):
        _call(_runner(kind), kind, _to(ops, torch.float32), "none", out_dtype=F64)
    if CONSTANTS[kind]:
        ops32 = _to(ops, torch.float32)
        ops32[2] = ops32[2].double()
        with refuses_float64("weight"):
            _call(_runner(kind), kind, ops32, "none", out_dtype=torch.float32)
    with pytest.raises(ValueError, match="acc must be torch.float32"):
        _runner(kind)(_kernel(kind), _to(ops, torch.float32), (True, True), acc=F64, out_dtype=torch.float32,
                      keep=True)


def test_unknown_kind_and_constant_gradient_are_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        elementwise.binary_runner("hinge")
    with pytest.raises(ValueError, match="kind must be one of"):
        elementwise.pointwise_runner(7)
    ops = _to(_operands("bce", (2, 5), "C"), torch.float32)
    with pytest.raises(ValueError, match="no gradient of a constant"):
        _runner("bce")(losses.bce, ops, (True, True, True), acc=torch.float32, out_dtype=torch.float32, keep=True)


# --- the gradient scale ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(CONSTANTS))
def test_tensor_grad_scale_is_read_in_the_kernel(kind):
    """A 0-dim tensor grad_scale (a weighted mean's 1 / sum(w), rmse's factor) gives the float's bits."""
    ops = _to(_operands(kind, (3, 37), "full" if CONSTANTS[kind] else None), torch.float32)
    as_float = _call(_runner(kind), kind, ops, "mean", grad_scale=0.375)
    as_tensor = _call(_runner(kind), kind, ops, "mean", grad_scale=torch.tensor(0.375))
    for a, b in zip(as_float[1], as_tensor[1]):
        assert_identical(a, b)
    _assert_same(as_tensor, _call(reference.run, kind, ops, "mean", grad_scale=torch.tensor(0.375)))


# --- edge values ------------------------------------------------------------------------------------------

def _grid(xs, ys):
    x = torch.tensor(xs, dtype=torch.float32)
    y = torch.tensor(ys, dtype=torch.float32)
    return x.repeat_interleave(len(ys)), y.repeat(len(xs))


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("kind, xs, ys", [
    ("bce", [0.0, 1e-30, 1e-7, 0.5, 1 - 2**-24, 1.0, NAN, -0.5, 1.5], [0.0, 0.3, 1.0]),  # clamps; bad values
    ("logits", [-INF, -100.0, -20.0, -1e-3, 0.0, 20.0, 100.0, INF, NAN], [0.0, 0.3, 1.0]),
    ("soft_margin", [-INF, -100.0, -20.0, 0.0, 20.0, 100.0, INF, NAN], [0.0, 0.3, 1.0]),
    ("focal", [-INF, -100.0, -20.0, 0.0, 20.0, 100.0, INF, NAN], [0.0, 0.3, 1.0]),
    ("mse", [-INF, -1.0, 0.0, 3.0, INF, NAN], [-INF, 0.0, 2.0, INF, NAN]),
    ("kl_prob", [-INF, -3.0, 0.0, NAN], [0.0, 1e-30, 0.5, 1.0, INF, NAN, -0.5]),
    ("kl_log", [-INF, -3.0, 0.0, NAN], [-INF, -100.0, -1.0, 0.0, 50.0, 100.0, INF, NAN]),
])
def test_edge_values_as_the_reference(kind, xs, ys):
    """Infinities, NaN, saturated logits and BCE's clamps: the reference's values, NaN where it has NaN
    (BCE's values outside [0, 1] are refused by the caller before; the kernel still runs on them)."""
    x, y = _grid(xs, ys)
    ops = [x, y, *[None] * CONSTANTS[kind]]
    for alpha, gamma in ((0.25, 2.0), (-1.0, 0.5)) if kind == "focal" else ((0.25, 2.0),):
        for reduction in ("none", "sum"):
            actual = _call(_runner(kind, alpha, gamma), kind, ops, reduction, alpha=alpha, gamma=gamma)
            _assert_same(actual, _call(reference.run, kind, ops, reduction, alpha=alpha, gamma=gamma))
