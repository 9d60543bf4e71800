"""losskit.ops.composite: every loss agrees with losskit's reference path (``impl="torch"``) in value and
gradient, and a call issues a number of aten ops that does not grow with the input's size."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import losskit.functional as LF
from losskit.ops import composite
from losskit.testing import (
    assert_close,
    assert_matches_reference,
    assert_same_results,
    assert_within_eps,
    loss_and_grads,
)

REDUCTIONS = ("none", "mean", "sum")
_NO_TARGET = torch.zeros((), dtype=torch.long)  # for loss_and_grads, where a loss takes no target


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype=torch.float64, seed=0, scale=2.0):
    return (scale * torch.randn(shape, generator=_gen(seed), dtype=torch.float64)).to(dtype)


def _rand(shape, dtype=torch.float64, seed=1):
    return torch.rand(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _pair(name: str) -> tuple[Callable, Callable]:
    """(composite.<name>, LF.<name>(..., impl="torch")), the second the reference path."""
    return getattr(composite, name), partial(getattr(LF, name), impl="torch")


def _check(name: str, x, t, *args, dtype=None, **kwargs) -> None:
    """composite.<name> against the reference path: loss, d/dinput, d/dtarget (of a floating target)."""
    try:
        assert_matches_reference(*_pair(name), x, t, *args, dtype=dtype, **kwargs)
    except AssertionError as e:
        options = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        raise AssertionError(f"{name} {options}: {e}") from None


def _class_dim(shape) -> int:
    return 0 if len(shape) == 1 else 1


def _index_target(shape, ignore_index: int, seed: int = 2):
    """Class indices for logits of ``shape``; with ignore_index -100, every third position is ignored."""
    cd = _class_dim(shape)
    t = torch.randint(0, shape[cd], shape[:cd] + shape[cd + 1:], generator=_gen(seed))
    if ignore_index == -100 and t.dim():
        t.view(-1)[::3] = ignore_index
    return t


CLASS_SHAPES = [(5,), (6, 5), (3, 5, 4)]


# --- softmax classification ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", CLASS_SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_index_targets(shape, weighted, ignore_index, label_smoothing):
    w = _rand(shape[_class_dim(shape)], seed=3) + 0.5 if weighted else None
    for reduction in REDUCTIONS:
        _check("cross_entropy", _randn(shape), _index_target(shape, ignore_index), w, ignore_index=ignore_index,
               reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("shape", CLASS_SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_probability_targets(shape, weighted, label_smoothing):
    w = _rand(shape[_class_dim(shape)], seed=3) + 0.5 if weighted else None
    t = _randn(shape, seed=4).softmax(_class_dim(shape))
    for reduction in REDUCTIONS:
        _check("cross_entropy", _randn(shape), t, w, ignore_index=-100, reduction=reduction,
               label_smoothing=label_smoothing)


@pytest.mark.parametrize("shape", CLASS_SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss(shape, weighted, ignore_index, gamma):
    w = _rand(shape[_class_dim(shape)], seed=3) + 0.5 if weighted else None
    for reduction in REDUCTIONS:
        _check("focal_loss", _randn(shape), _index_target(shape, ignore_index), w, gamma=gamma,
               ignore_index=ignore_index, reduction=reduction)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_loss_where_p_y_rounds_to_one(gamma):
    # Row 0: p_y == 1 exactly (1 - p_y == 0), where pow's gradient is inf for gamma < 1; the documented
    # gradient is its limit, 0. Row 1: an ignored row whose class-0 logit is -inf.
    x = torch.tensor([[800.0, 0.0, -1.0], [-math.inf, 1.0, 2.0], [0.3, -0.2, 1.5]], dtype=torch.float64)
    t = torch.tensor([0, -100, 2])
    _check("focal_loss", x, t, None, gamma=gamma, ignore_index=-100, reduction="sum")
    _, grad, _ = loss_and_grads(composite.focal_loss, x, t, None, gamma=gamma, ignore_index=-100, reduction="sum")
    assert bool(grad.isfinite().all()) and bool((grad[:2] == 0).all())


@pytest.mark.parametrize("shape", CLASS_SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_nll_loss(shape, weighted, ignore_index):
    w = _rand(shape[_class_dim(shape)], seed=3) + 0.5 if weighted else None
    logp = _randn(shape).log_softmax(_class_dim(shape))
    for reduction in REDUCTIONS:
        _check("nll_loss", logp, _index_target(shape, ignore_index), w, ignore_index=ignore_index, reduction=reduction)


def test_class_targets_of_any_integer_dtype():
    # torch's kernels take int64 (or uint8) indices only; the functionals accept any integer dtype.
    x, t = _randn((6, 5)), _index_target((6, 5), 2).to(torch.int32)
    _check("cross_entropy", x, t, None, ignore_index=2, reduction="mean", label_smoothing=0.0)
    _check("focal_loss", x, t, None, gamma=2.0, ignore_index=2, reduction="mean")
    _check("nll_loss", x.log_softmax(1), t, None, ignore_index=2, reduction="mean")


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize(("shape", "dim"), [((5,), 0), ((4, 6), 1), ((4, 6), 0), ((2, 3, 4), 1)])
@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_softmax(log, shape, dim, dtype):
    name = "log_softmax" if log else "softmax"
    x = _randn(shape, dtype=torch.float32)
    assert_matches_reference(lambda x, _: getattr(composite, name)(x, dim, dtype),
                             lambda x, _: getattr(LF, name)(x, dim, dtype, impl="torch"), x, _NO_TARGET)


# --- divergences ---------------------------------------------------------------------------------------

def _entropy_pair(dim: int, logits: bool) -> tuple[Callable, Callable]:
    """(composite, reference) entropy along ``dim`` as losses of (input, unused target)."""
    return (lambda x, _: composite.entropy(x, dim, logits=logits),
            lambda x, _: LF.entropy(x, dim, logits=logits, impl="torch"))


def _entropy_check(x, dim: int, logits: bool) -> None:
    assert_matches_reference(*_entropy_pair(dim, logits), x, _NO_TARGET)


@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize(("shape", "dim"), [((7,), 0), ((4, 6), 1), ((4, 6), 0), ((2, 5, 3), 1)])
def test_entropy(logits, shape, dim):
    x = _randn(shape)
    _entropy_check(x if logits else x.softmax(dim), dim, logits)


def test_entropy_of_probabilities_with_zeros():
    # 0 log 0 = 0, and the documented gradient at p = 0 is 0 (-(log p + 1) = inf there).
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]], dtype=torch.float64)
    _entropy_check(p, 1, False)
    _, grad, _ = loss_and_grads(lambda x, _: composite.entropy(x, 1, logits=False), p, _NO_TARGET)
    assert bool(grad.isfinite().all()) and bool((grad[p == 0] == 0).all())
    # negative entries give NaN, as the formula does
    assert composite.entropy(torch.tensor([-0.1, 1.1]), 0, logits=False).isnan()


def test_entropy_of_logits_with_minus_inf():
    # A -inf logit is a class of probability 0: no term, gradient 0. A row of -inf is NaN, as softmax.
    x = torch.tensor([[0.0, 0.0, -math.inf], [1.0, -math.inf, -2.0], [800.0, 0.0, 1.0]], dtype=torch.float64)
    _entropy_check(x, 1, True)
    _, grad, _ = loss_and_grads(lambda x, _: composite.entropy(x, 1, logits=True), x, _NO_TARGET)
    assert bool(grad.isfinite().all()) and bool((grad[x == -math.inf] == 0).all())
    assert composite.entropy(torch.full((2, 3), -math.inf), 1, logits=True).isnan().all()


@pytest.mark.parametrize("reduction", ("none", "mean", "sum", "batchmean"))
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("target_shape", [(4, 6), (1, 6)])
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # the reference functional warns for "mean"
def test_kl_div(reduction, log_target, target_shape):
    x = _randn((4, 6)).log_softmax(1)
    t = _randn(target_shape, seed=5).log_softmax(1)
    if not log_target:
        t = t.exp()
        t[..., 0] = 0.0  # 0 log 0 = 0; the target's gradient is NaN there, as torch's autograd gives
    _check("kl_div", x, t, reduction=reduction, log_target=log_target)


def test_kl_div_does_not_warn():
    # The functional warns once for "mean"; the composite must not repeat torch's warning.
    x, t = _randn((3, 4)).log_softmax(1), _rand((3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        composite.kl_div(x, t, reduction="mean", log_target=False)


# --- binary losses -------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_shape", [None, (5,), (3, 5)])
def test_binary_cross_entropy(weight_shape):
    x = _rand((3, 5))
    x[0, :3] = torch.tensor([0.0, 1.0, 1e-13], dtype=torch.float64)  # clamped logs; torch's 1e-12 floor
    w = None if weight_shape is None else _rand(weight_shape, seed=3)
    for reduction in REDUCTIONS:
        _check("binary_cross_entropy", x, _rand((3, 5), seed=4), w, reduction=reduction)


def test_binary_cross_entropy_propagates_nan():
    # torch's kernel raises on NaN (a device-side assert on CUDA); losskit documents NaN propagating.
    x = torch.tensor([0.3, math.nan, 0.8], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    _check("binary_cross_entropy", x, y, None, reduction="none")
    assert composite.binary_cross_entropy(x, y, None, reduction="mean").isnan()


@pytest.mark.parametrize("weight_shape", [None, (5,)])
@pytest.mark.parametrize("pos_weight", [False, True])
def test_binary_cross_entropy_with_logits(weight_shape, pos_weight):
    w = None if weight_shape is None else _rand(weight_shape, seed=3)
    p = _rand(5, seed=6) * 3 if pos_weight else None
    for reduction in REDUCTIONS:
        _check("binary_cross_entropy_with_logits", _randn((4, 5)), _rand((4, 5), seed=4), w, reduction=reduction,
               pos_weight=p)


@pytest.mark.parametrize("shape", [(6,), (4, 6), (2, 3, 6)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("integer_target", [False, True])
def test_multilabel_soft_margin_loss(shape, weighted, integer_target):
    t = torch.randint(0, 2, shape, generator=_gen(4))
    w = _rand(shape[-1], seed=3) if weighted else None
    for reduction in REDUCTIONS:
        _check("multilabel_soft_margin_loss", _randn(shape), t if integer_target else t.double(), w,
               reduction=reduction)


@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_sigmoid_focal_loss(alpha, gamma):
    x = _randn((4, 5))
    x[0, :2] = torch.tensor([800.0, -800.0])  # saturated and right: 1 - p_t == 0 exactly
    t = _rand((4, 5), seed=4)
    t[0, :2] = torch.tensor([1.0, 0.0])
    for reduction in REDUCTIONS:
        _check("sigmoid_focal_loss", x, t, alpha=alpha, gamma=gamma, reduction=reduction)
        _, grad, _ = loss_and_grads(composite.sigmoid_focal_loss, x, t, alpha=alpha, gamma=gamma, reduction=reduction)
        assert bool(grad.isfinite().all())


# --- regression ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("integer_target", [False, True])
def test_mse_loss(weighted, integer_target):
    t = torch.randint(-2, 3, (4, 5), generator=_gen(4))
    w = _rand((4, 5), seed=3) if weighted else None
    for reduction in REDUCTIONS:
        _check("mse_loss", _randn((4, 5)), t if integer_target else t.double(), reduction=reduction, weight=w)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("zero", [False, True])
def test_rmse_loss(weighted, zero):
    x = _randn((4, 5))
    t = x.clone() if zero else _randn((4, 5), seed=4)  # an exact zero loss: gradient 0, not NaN
    w = _rand((4, 5), seed=3) if weighted else None
    _check("rmse_loss", x, t, weight=w)
    if zero:
        loss, dx, dt = loss_and_grads(composite.rmse_loss, x, t, weight=w)
        assert loss == 0 and bool((dx == 0).all()) and bool((dt == 0).all())


def test_rmse_loss_of_nan_is_nan():
    # the zero test of the gradient trick is m == 0, not m > 0, which would turn a NaN mean into 0
    assert composite.rmse_loss(torch.tensor([math.nan]), torch.tensor([0.0]), weight=None).isnan()
    assert composite.rmse_loss(torch.ones(2), torch.zeros(2), weight=torch.zeros(2)).isnan()  # 0 / 0


# --- low precision: output dtypes, and errors in the dtype's eps ----------------------------------------

def _low_precision_cases(dtype: torch.dtype) -> list[tuple[str, tuple[Callable, Callable], tuple, dict]]:
    """One option set of every loss, every tensor in ``dtype``: (label, (composite, reference), args, kwargs)."""
    x, p = _randn((6, 5), dtype), _rand((6, 5), dtype, seed=4)
    logp, idx = _randn((6, 5)).log_softmax(1).to(dtype), _index_target((6, 5), -100)
    w = _rand(5, dtype, seed=3) + 0.5
    return [
        ("cross_entropy", _pair("cross_entropy"), (x, idx, w),
         {"ignore_index": -100, "reduction": "mean", "label_smoothing": 0.1}),
        ("cross_entropy probabilities", _pair("cross_entropy"), (x, _randn((6, 5), seed=4).softmax(1).to(dtype), w),
         {"ignore_index": -100, "reduction": "none", "label_smoothing": 0.0}),
        ("focal_loss", _pair("focal_loss"), (x, idx, w), {"gamma": 2.0, "ignore_index": -100, "reduction": "none"}),
        ("nll_loss", _pair("nll_loss"), (logp, idx, w), {"ignore_index": -100, "reduction": "mean"}),
        ("entropy", _entropy_pair(1, False), (x.double().softmax(1).to(dtype), _NO_TARGET), {}),
        ("entropy logits", _entropy_pair(1, True), (x, _NO_TARGET), {}),
        ("kl_div", _pair("kl_div"), (logp, p), {"reduction": "sum", "log_target": False}),
        ("binary_cross_entropy", _pair("binary_cross_entropy"), (_rand((6, 5), dtype), p, w), {"reduction": "none"}),
        ("binary_cross_entropy_with_logits", _pair("binary_cross_entropy_with_logits"), (x, p, w),
         {"reduction": "mean", "pos_weight": w.flip(0)}),
        ("multilabel_soft_margin_loss", _pair("multilabel_soft_margin_loss"), (x, p, w), {"reduction": "none"}),
        ("sigmoid_focal_loss", _pair("sigmoid_focal_loss"), (x, p), {"alpha": 0.25, "gamma": 2.0, "reduction": "none"}),
        ("mse_loss", _pair("mse_loss"), (x, p), {"reduction": "none", "weight": None}),
        ("rmse_loss", _pair("rmse_loss"), (x, p), {"weight": p.flip(0)}),
    ]


def _float64(a: object) -> object:
    return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


#: Normwise bound (eps of the dtype, relative to the largest entry of the float64 truth) of every result
#: below; the largest measured is 1.7 (float32 cross_entropy with probability targets, d/dinput). Not the
#: table's elementwise tolerance: torch's own losses round intermediates to the storage dtype (bfloat16
#: log-probabilities, then a product with grad_output), so a small entry of a bfloat16 d/dtarget can be off
#: by a few percent of itself while the error stays within one eps of the largest entry.
LOW_PRECISION_EPS = 3.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_eps_of_float64(dtype):
    for label, (fn, reference), args, kwargs in _low_precision_cases(dtype):
        go = torch.randn(fn(*args, **kwargs).shape, generator=_gen(0), dtype=torch.float64).to(dtype)
        actual = loss_and_grads(fn, *args, grad_output=go, **kwargs)
        truth = loss_and_grads(reference, *map(_float64, args), grad_output=go.double(), **kwargs)
        for result, a, t in zip(("loss", "d/dinput", "d/dtarget"), actual, truth):
            assert (a is None) == (t is None), f"{label} {result}"
            if a is not None:
                assert a.dtype == dtype and a.shape == t.shape, f"{label} {result}: {a.dtype} {tuple(a.shape)}"
                assert_within_eps(a, t, LOW_PRECISION_EPS, floor=t.abs().max().item(), msg=f"{label} {result}")


def test_mixed_dtypes_give_the_documented_output_dtype():
    # float32 input, float64 targets and weights: torch promotes its result to float64, the functionals
    # document the input's dtype (cross_entropy) or the input's and target's (the binary losses). Compared
    # in float32's tolerance: the float32 input bounds the accuracy of either.
    x32 = _randn((4, 5), torch.float32)
    t64, w64 = _randn((4, 5), seed=4).softmax(1), _rand(5, seed=3)
    _check("cross_entropy", x32, t64, w64, ignore_index=-100, reduction="none", label_smoothing=0.0,
           dtype=torch.float32)
    _check("cross_entropy", x32, _index_target((4, 5), -100), w64, ignore_index=-100, reduction="mean",
           label_smoothing=0.0)
    _check("binary_cross_entropy_with_logits", x32, t64, w64.float(), reduction="none", pos_weight=w64,
           dtype=torch.float32)
    _check("sigmoid_focal_loss", x32, t64, alpha=0.25, gamma=2.0, reduction="none", dtype=torch.float32)


# --- the number of ops does not grow with the size -----------------------------------------------------

class _CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched (forward and backward) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _op_count(name: str, args: tuple, kwargs: dict) -> int:
    """aten ops of ``composite.<name>(*args, **kwargs)`` and its backward; the first two floating
    arguments (input and a probability target) require grad."""
    args = tuple(a.requires_grad_() if i < 2 and isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for i, a in enumerate(args))
    with _CountOps() as mode:
        loss = getattr(composite, name)(*args, **kwargs)
        loss.backward(torch.ones_like(loss))
    return mode.count


def _op_case(n: int, c: int) -> dict[str, tuple[str, tuple, dict]]:
    """A representative option set of every loss (the ones with the most ops: weights, smoothing,
    pos_weight, ...) on (n, c) inputs: case -> (function, args, kwargs)."""
    g = _gen(0)
    x, p, w = torch.randn(n, c, generator=g), torch.rand(n, c, generator=g), torch.rand(c, generator=g) + 0.5
    idx = torch.randint(0, c, (n,), generator=g)
    idx[::3] = -100
    return {
        "cross_entropy": ("cross_entropy", (x, idx, w),
                          {"ignore_index": -100, "reduction": "mean", "label_smoothing": 0.1}),
        "cross_entropy_probabilities": ("cross_entropy", (x, p.softmax(1), w),
                                        {"ignore_index": -100, "reduction": "sum", "label_smoothing": 0.1}),
        "focal_loss": ("focal_loss", (x, idx, w), {"gamma": 0.5, "ignore_index": -100, "reduction": "mean"}),
        "nll_loss": ("nll_loss", (x.log_softmax(1), idx, w), {"ignore_index": -100, "reduction": "mean"}),
        "softmax": ("softmax", (x, 1, None), {}),
        "log_softmax": ("log_softmax", (x, 1, torch.float64), {}),
        "entropy": ("entropy", (p, 1), {"logits": False}),
        "entropy_logits": ("entropy", (x, 1), {"logits": True}),
        "kl_div": ("kl_div", (x.log_softmax(1), p), {"reduction": "batchmean", "log_target": False}),
        "binary_cross_entropy": ("binary_cross_entropy", (p, p.flip(0), w), {"reduction": "mean"}),
        "binary_cross_entropy_with_logits": ("binary_cross_entropy_with_logits", (x, p, w),
                                             {"reduction": "mean", "pos_weight": w.flip(0)}),
        "multilabel_soft_margin_loss": ("multilabel_soft_margin_loss", (x, p, w), {"reduction": "mean"}),
        "sigmoid_focal_loss": ("sigmoid_focal_loss", (x, p), {"alpha": 0.25, "gamma": 2.0, "reduction": "mean"}),
        "mse_loss": ("mse_loss", (x, p), {"reduction": "mean", "weight": p.flip(0)}),
        "rmse_loss": ("rmse_loss", (x, p), {"weight": None}),
    }


#: Forward + backward, views, casts and scalar wrappers included, with torch 2.13: from 4 (nll_loss) to 58
#: (sigmoid_focal_loss with input and target gradients; focal_loss 50). A block-wise loop issues
#: thousands at (512, 3000), caught by the equality; the bound keeps the composites short.
MAX_OPS = 64


@pytest.mark.parametrize("case", list(_op_case(1, 1)))
def test_op_count_is_small_and_independent_of_size(case):
    small, large = (_op_count(*_op_case(n, c)[case]) for n, c in ((8, 10), (512, 3000)))
    assert small == large, f"{case}: {small} ops at (8, 10), {large} at (512, 3000)"
    assert small <= MAX_OPS, f"{case}: {small} ops"


def test_transforms_and_compile():
    # The dispatcher sends torch.func transforms and torch.compile tracing here: the one custom Function
    # (binary_cross_entropy's) runs under grad, vmap and compile, as the plain composites do.
    x, y, w = _rand((4, 5)), _rand((4, 5), seed=4), _rand(5, seed=3)

    def bce(x, y, reduction="sum"):
        return composite.binary_cross_entropy(x, y, w, reduction=reduction)

    one = torch.tensor(1.0, dtype=torch.float64)
    expected = loss_and_grads(bce, x, y, grad_output=one)
    assert_same_results((bce(x, y), *torch.func.grad(bce, argnums=(0, 1))(x, y)), expected)
    assert_close(torch.func.vmap(partial(bce, reduction="mean"))(x, y), bce(x, y, "none").mean(1))
    compiled = torch.compile(bce, backend="aot_eager", fullgraph=True)
    assert_same_results(loss_and_grads(compiled, x, y, grad_output=one), expected)
