"""The Triton softmax-family row kernels (through the interpreter) against torch and a float64 truth.

softmax / log_softmax forward against ``torch.softmax`` / ``torch.log_softmax``, backward against torch's
autograd, entropy against ``losskit.functional.entropy(..., impl="torch")`` and its autograd gradient;
each also within fixed bounds (eps of the result's dtype) of the float64 formula on the same inputs.
Every (N, C, L) layout: L = 1 and L > 1, transposed, sliced and expanded (stride 0) inputs, C = 1, prime
C, rows of several blocks (``block=16``), -inf entries, rows of only -inf, offsets of +1000.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", minversion="3.8")  # the oldest the kernels build with (ops/_dispatch.py)

import torch
from _helpers import (DTYPES, INF, INTERPRETER_WARNINGS, assert_identical, gen, normwise, refuses_block,
                      refuses_float64)

import losskit.functional as LF
from losskit.ops.triton import softmax as TS
from losskit.testing import assert_close, assert_within_eps

pytestmark = INTERPRETER_WARNINGS

#: name -> (contiguous base shape, the non-contiguous (N, C, L) view taken of it or None, BLOCK_C or None
#: for the default). Tiles hold up to 128 rows: "many_rows" and "many_positions" take two tiles, the
#: second with 2 rows in range.
LAYOUTS = {
    "rows": ((6, 37, 1), None, None),
    "rows_of_three_blocks": ((6, 37, 1), None, 16),
    "many_rows": ((130, 37, 1), None, 16),
    "positions": ((2, 37, 5), None, 16),
    "positions_one_block": ((3, 11, 7), None, None),
    "many_positions": ((2, 37, 130), None, 16),
    "c1": ((5, 1, 3), None, None),
    "prime_c": ((3, 131, 1), None, None),
    "transposed": ((37, 6), lambda t: t.t().unsqueeze(-1), 16),  # entries 6 apart, rows 1 apart
    "sliced": ((8, 74, 9), lambda t: t[::2, ::2, ::3], 16),
    "channels_last": ((2, 5, 13), lambda t: t.permute(0, 2, 1), None),  # entries contiguous, positions 13 apart
    "expanded": ((1, 37, 1), lambda t: t.expand(4, 37, 3), 16),  # strides 0 along N and L
}
#: (layout, dtype): float32 in every layout; bfloat16 and float16, whose loads and stores are the only
#: dtype-dependent code, in one of each kind (to keep the interpreter's run short).
CASES = [(name, torch.float32) for name in LAYOUTS] + [
    (name, dtype) for name in ("rows_of_three_blocks", "many_positions", "c1", "sliced", "channels_last")
    for dtype in DTYPES[1:]]

#: Bounds in eps of the result's dtype against the float64 truth, (value, gradient). float32: exp of
#: x - max rounded once, float32 sums, so a few eps; normwise (floor: the largest |truth|) for softmax and
#: the gradients, whose small entries carry the rounding of x - max times |x - max|, and with floor 1
#: for log_softmax (measured: at most 1.6, 1.8 and 2.7 eps). Low precision: computed in float32 and
#: rounded once, the float32 error far below an eps: half an eps on the GPU and for float16 here, under
#: one eps for bfloat16 in the interpreter, which truncates (measured 0.98 for log_softmax); 1.25 leaves
#: room for a truncation across a power of two. The entropy ``h`` is float32 whatever the input dtype.
F32_BOUNDS = (4, 8)
LOW_BOUNDS = (1.25, 1.25)


def _values(shape, kind, seed=0):
    """float64 values of ``shape``: logits (normal, scale 3) or nonnegative probabilities, every fifth 0
    (the entropy formula is applied as written; rows need not sum to 1)."""
    if kind == "probs":
        p = torch.rand(shape, generator=gen(seed), dtype=torch.float64)
        p.view(-1)[::5] = 0.0
        return p
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64) * 3


def _layout(name, dtype, kind="logits", seed=0):
    """(x3, block) of layout ``name`` in ``dtype``."""
    shape, view, block = LAYOUTS[name]
    x3 = _values(shape, kind, seed).to(dtype)
    if view is not None:
        x3 = view(x3)
        assert x3.dim() == 3 and not x3.is_contiguous(), name
    return x3, block


def _special_logits(c=37):
    """Four rows of ``c`` (block 16: three blocks): the first 20 entries -inf (a whole first block), -inf
    every third entry, all -inf (NaN, as torch), and finite logits offset by +1000."""
    x = _values((4, c), "logits", seed=5)
    x[0, :20] = -INF
    x[1, ::3] = -INF
    x[2] = -INF
    x[3] += 1000
    return x.unsqueeze(-1)


def _softmax(x3, log, dtype=None, block=None):
    out = torch.empty(x3.shape, dtype=dtype or x3.dtype)
    TS.softmax_rows(x3, out, log=log, block=block)
    return out


def _softmax_truth(x, log):
    return (torch.log_softmax if log else torch.softmax)(x.double(), 1)


def _bounds(dtype):
    return F32_BOUNDS if dtype == torch.float32 else LOW_BOUNDS


def _check_forward(x3, log, block, dtype=None):
    """softmax_rows == torch.softmax(x, 1, dtype) and within bounds of the float64 truth."""
    out_dtype = dtype or x3.dtype
    ours = _softmax(x3, log, out_dtype, block)
    assert ours.dtype == out_dtype and ours.is_contiguous()
    assert_close(ours, (torch.log_softmax if log else torch.softmax)(x3, 1, dtype=out_dtype))
    truth = _softmax_truth(x3.to(out_dtype), log)
    floor = 1.0 if log else normwise(truth)
    assert_within_eps(ours, truth, _bounds(out_dtype)[0], floor=floor, msg="log_softmax" if log else "softmax")


def _check_backward(x3, log, block, seed=1):
    """softmax_backward_rows(y, g) == torch's autograd, and within bounds of the float64 formula on y and g;
    g is transposed in memory, its own layout."""
    x = x3.detach().clone().requires_grad_()
    y = (torch.log_softmax if log else torch.softmax)(x, 1)
    g = _values(x3.shape[::-1], "logits", seed).to(x3.dtype).permute(2, 1, 0)
    (expected,) = torch.autograd.grad(y, x, g)
    y = y.detach()
    ours = torch.empty(x3.shape, dtype=x3.dtype)
    TS.softmax_backward_rows(y, g, ours, log=log, block=block)
    assert_close(ours, expected)
    yd, gd = y.double(), g.double()
    truth = gd - yd.exp() * gd.sum(1, keepdim=True) if log else yd * (gd - (gd * yd).sum(1, keepdim=True))
    assert_within_eps(ours, truth, _bounds(x3.dtype)[1], floor=normwise(truth), msg="backward")


def _entropy(x3, logits, block=None, grad=True):
    n, _, length = x3.shape
    h = torch.empty(n, length, dtype=torch.float32)
    g = torch.empty(x3.shape, dtype=x3.dtype) if grad else None
    TS.entropy_rows(x3, h, g, logits=logits, block=block)
    return h, g


def _entropy_truth(x3, logits):
    """(H, dH/dx) by the float64 formula: H = -sum xlogy(p, p); gradient p (-H - log p) of logits,
    -(log p + 1) of probabilities, 0 where p == 0."""
    x = x3.double()
    p = x.softmax(1) if logits else x
    h = -torch.xlogy(p, p).sum(1)
    if logits:
        grad = p * (-h.unsqueeze(1) - x.log_softmax(1))
    else:
        grad = -(p.log() + 1)
    return h, grad.masked_fill(p == 0, 0.0)


def _check_entropy(x3, logits, block):
    """entropy_rows == LF.entropy(impl="torch") and its autograd gradient, and within bounds of float64."""
    h, grad = _entropy(x3, logits, block)
    x = x3.detach().clone().requires_grad_()
    h_ref = LF.entropy(x, 1, logits=logits, impl="torch")
    (grad_ref,) = torch.autograd.grad(h_ref.sum(), x)
    assert_close(h.to(x3.dtype), h_ref)
    assert_close(grad, grad_ref)
    h_truth, grad_truth = _entropy_truth(x3, logits)
    assert_within_eps(h, h_truth, F32_BOUNDS[1], floor=normwise(h_truth), msg="entropy")
    assert_within_eps(grad, grad_truth, _bounds(x3.dtype)[1], floor=normwise(grad_truth), msg="entropy gradient")
    h_alone, none = _entropy(x3, logits, block, grad=False)  # no gradient: the same entropy
    assert none is None
    assert_identical(h_alone, h)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("layout,dtype", CASES, ids=str)
def test_softmax_forward_and_backward(layout, dtype, log):
    x3, block = _layout(layout, dtype)
    _check_forward(x3, log, block)
    _check_backward(x3, log, block)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("block", [16, None], ids=["blocks", "one_block"])
def test_softmax_of_minus_inf_rows_and_large_offsets(block, log, dtype):
    x3 = _special_logits().to(dtype)
    _check_forward(x3, log, block)
    _check_backward(x3, log, block)
    out = _softmax(x3, log, block=block)
    assert out[2].isnan().all() and not out[[0, 1, 3]].isnan().any()


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, torch.float16), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float32)], ids=str)
def test_softmax_output_dtype_converts_the_input_as_torch(x_dtype, out_dtype, log):
    # torch.softmax(x, dtype=...) casts x first: float32 -> float16 rounds x before the max. Not float32
    # -> bfloat16: the interpreter truncates float32 to bfloat16 (the GPU rounds to nearest even), so its x
    # is not torch's.
    for block in (16, None):
        _check_forward(_layout("positions", x_dtype)[0], log, block, dtype=out_dtype)


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("layout,dtype", CASES, ids=str)
def test_entropy(layout, dtype, logits):
    x3, block = _layout(layout, dtype, "logits" if logits else "probs")
    _check_entropy(x3, logits, block)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [16, None], ids=["blocks", "one_block"])
def test_entropy_of_minus_inf_logits_and_large_offsets(block, dtype):
    x3 = _special_logits().to(dtype)
    _check_entropy(x3, True, block)
    h, grad = _entropy(x3, True, block)
    assert h[2].isnan().all() and grad[2].isnan().all() and not h[[0, 1, 3]].isnan().any()
    assert (grad[0, :20] == 0).all() and (grad[1, ::3] == 0).all()  # -inf logits: probability 0, gradient 0


def test_entropy_of_probabilities_zero_and_negative_entries():
    # 0 log 0 = 0 with gradient 0; a negative entry makes its row NaN (log of a negative number)
    p = torch.tensor([[0.5, 0.0, 0.5], [0.2, -0.1, 0.9]]).unsqueeze(-1)
    h, grad = _entropy(p, False)
    assert h[0].item() == pytest.approx(0.6931471805599453) and h[1].isnan().all()
    assert grad[0, 1].item() == 0 and grad[1, 1].isnan().all()


def test_blocks_agree_with_one_block():
    # chunked equals unchunked: the online max/sum over 2..64-column blocks gives the one-block result
    x3 = _layout("positions", torch.float32)[0]
    for log in (False, True):
        whole = _softmax(x3, log)
        for block in (2, 8, 64):
            assert_close(_softmax(x3, log, block=block), whole)
    h, grad = _entropy(x3, True)
    for block in (2, 8):
        h_b, grad_b = _entropy(x3, True, block)
        assert_close(h_b, h)
        assert_close(grad_b, grad)


def test_float64_and_bad_block_raise():
    x = torch.randn(2, 5, 1, dtype=torch.float64)
    x32, h = x.float(), torch.empty(2, 1)
    calls = {
        "x3": lambda: TS.softmax_rows(x, torch.empty_like(x32), log=False),
        "out3": lambda: TS.softmax_rows(x32, torch.empty_like(x), log=True),
        "y3": lambda: TS.softmax_backward_rows(x, x32, torch.empty_like(x32), log=False),
        "grad3": lambda: TS.entropy_rows(x32, h, torch.empty_like(x), logits=True),
    }
    for name, call in calls.items():
        with refuses_float64(name):
            call()
    with pytest.raises(ValueError, match="h must be float32, got torch.float64"):
        TS.entropy_rows(x32, h.double(), None, logits=False)
    with refuses_block(12):
        TS.softmax_rows(x32, torch.empty_like(x32), log=False, block=12)
