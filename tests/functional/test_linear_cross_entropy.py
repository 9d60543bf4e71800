"""linear_cross_entropy against its reference expression cross_entropy(linear(input, W, b), target) and
against torch's own F.linear_cross_entropy; chunking, memory, bad input, the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import losskit.functional as LF
import losskit.functional._linear_cross_entropy as lce_module
import losskit.nn as LN
from losskit.ops import linear_xent
from losskit.ops.linear_xent import (ALIGN_ROWS, CHUNK_BYTES, CUDA_CHUNK_BYTES, MIN_ROWS, chunk_budget, chunk_rows,
                                     class_buffers, products_dtype)
from losskit.ops.cpu import native as cpu_native
from losskit.ops.cpu.native import available as native_available
from losskit.ops.reference.rows import RowSpec
from losskit.testing import assert_close, assert_within_eps, gradcheck

N, D, C = 7, 5, 11  # N is not a multiple of the chunk sizes used below
REDUCTIONS = ["none", "mean", "sum"]
FLOATS = [torch.float64, torch.float32]
#: Option sets: torch's own options, then losskit's extras, alone and all together.
EXTRAS = {
    "plain": {},
    "torch": {"label_smoothing": 0.2, "weight": True},
    "z_softcap": {"z_loss": 1e-2, "softcap": 3.0},
    "all": {"label_smoothing": 0.1, "weight": True, "z_loss": 1e-3, "softcap": 2.5},
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(dtype=torch.float64, *, n=N, d=D, c=C, k=(), bias=True, probabilities=False, batched=True, seed=0,
             ignore=True):
    """(input, linear_weight, target, linear_bias) in ``dtype``; every third class target ignored."""
    g = _gen(seed)
    x = torch.randn(*((n,) if batched else ()), d, generator=g, dtype=torch.float64)
    w = torch.randn(c, *k, d, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(c, *k, generator=g, dtype=torch.float64) if bias else None
    lead = (n,) if batched else ()
    if probabilities:
        t = torch.randn(*lead, c, *k, generator=g, dtype=torch.float64).softmax(len(lead)).to(dtype)
    else:
        t = torch.randint(0, c, (*lead, *k), generator=g)
        if ignore and t.numel() > 1:
            t.view(-1)[::3] = -100
    cast = (lambda v: None if v is None else v.to(dtype))
    return cast(x), cast(w), t, cast(b)


def _class_weight(dtype, c=C):
    return (torch.rand(c, generator=_gen(9), dtype=torch.float64) + 0.5).to(dtype)


def reference(x, w, t, b=None, *, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
              z_loss=0.0, softcap=None):
    """The reference expression, in plain torch ops on the materialised logits."""
    c, k = w.shape[0], w.shape[1:-1]
    logits = F.linear(x, w.reshape(-1, w.shape[-1]), None if b is None else b.reshape(-1))
    logits = logits.reshape(*x.shape[:-1], c, *k)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    cd = 0 if x.dim() == 1 else 1
    probabilities = t.shape == logits.shape
    kw = {} if probabilities else {"ignore_index": ignore_index}
    per = F.cross_entropy(logits, t, weight, reduction="none", label_smoothing=label_smoothing, **kw)
    valid = torch.ones_like(per, dtype=torch.bool) if probabilities else t != ignore_index
    if z_loss:
        per = per + z_loss * torch.logsumexp(logits, cd).square() * valid
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if probabilities or weight is None:
        return per.sum() / valid.sum()
    return per.sum() / (weight[t.masked_fill(~valid, 0)] * valid).sum()


def _loss_and_grads(fn, x, w, t, b, grad_seed=3, **kwargs):
    """Loss and the gradients of (x, w, b) for a random grad_output of the loss's shape."""
    leaves = [v.detach().clone().requires_grad_() for v in (x, w, b) if v is not None]
    loss = fn(leaves[0], leaves[1], t, leaves[2] if b is not None else None, **kwargs)
    go = torch.rand(loss.shape, generator=_gen(grad_seed), dtype=torch.float64).add(0.5).to(loss.dtype)
    return loss.detach(), torch.autograd.grad(loss, leaves, go)


def _ours(x, w, t, b=None, **kwargs):
    return LF.linear_cross_entropy(x, w, t, linear_bias=b, **kwargs)


def _ref(x, w, t, b=None, **kwargs):
    kwargs.pop("chunk_size", None)
    return reference(x, w, t, b, **kwargs)


def _torch(x, w, t, b=None, **kwargs):
    return F.linear_cross_entropy(x, w, t, linear_bias=b, **kwargs)


def _kwargs(extras, dtype):
    kw = dict(EXTRAS[extras])
    if kw.pop("weight", False):
        kw["weight"] = _class_weight(dtype)
    return kw


def _compare(ours, ref, dtype=None, msg=""):
    (lo, go), (lr, gr) = ours, ref
    assert lo.dtype == lr.dtype and lo.shape == lr.shape, msg
    assert_close(lo, lr, dtype=dtype, msg=f"{msg} loss")
    for name, a, r in zip(("input", "linear_weight", "linear_bias"), go, gr):
        assert a.dtype == r.dtype and a.shape == r.shape, f"{msg} d/d{name}"
        assert_close(a, r, dtype=dtype, msg=f"{msg} d/d{name}")


# --- values and gradients -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("k", [(), (3,)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("extras", sorted(EXTRAS))
def test_matches_reference(dtype, probabilities, k, reduction, extras):
    x, w, t, b = _problem(dtype, k=k, probabilities=probabilities)
    kw = dict(_kwargs(extras, dtype), reduction=reduction, chunk_size=3)
    _compare(_loss_and_grads(_ours, x, w, t, b, **kw), _loss_and_grads(_ref, x, w, t, b, **kw),
             msg=f"{dtype} {extras}")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("k", [(), (2, 3)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_torch_linear_cross_entropy(dtype, probabilities, k, reduction):
    """Same call, same arguments (torch's ignore_index=None default included), torch's own function."""
    x, w, t, b = _problem(dtype, k=k, probabilities=probabilities)
    kw = {"weight": _class_weight(dtype), "label_smoothing": 0.1, "reduction": reduction}
    ref = _loss_and_grads(_torch, x, w, t, b, **kw)
    _compare(_loss_and_grads(_ours, x, w, t, b, **kw), ref)
    # torch's chunking options are accepted and change nothing but the chunk size.
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2)
    _compare(_loss_and_grads(_ours, x, w, t, b, options=options, **kw), ref)


@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unbatched_input(probabilities, reduction):
    x, w, t, b = _problem(batched=False, probabilities=probabilities)
    kw = {"reduction": reduction, "z_loss": 0.01, "softcap": 4.0}
    _compare(_loss_and_grads(_ours, x, w, t, b, **kw), _loss_and_grads(_ref, x, w, t, b, **kw))


@pytest.mark.parametrize("chunk", [1, 2, 3, N, 100, None])
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_chunk_size_invariance(chunk, probabilities, reduction):
    """Chunks of one sample, chunks that do not divide N, one chunk and more than N agree (float64)."""
    x, w, t, b = _problem(probabilities=probabilities, k=(2,))
    kw = dict(_kwargs("torch", torch.float64), softcap=3.0, reduction=reduction)
    _compare(_loss_and_grads(_ours, x, w, t, b, chunk_size=chunk, **kw), _loss_and_grads(_ref, x, w, t, b, **kw))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_subset_of_gradients(reduction):
    """A frozen head (input only), a linear probe on frozen features (weight and/or bias), ..."""
    x, w, t, b = _problem()
    go = torch.rand(N if reduction == "none" else (), generator=_gen(5), dtype=torch.float64) + 0.5
    for mask in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 1)]:
        ours = [v.clone().requires_grad_(bool(m)) for v, m in zip((x, w, b), mask)]
        ref = [v.clone().requires_grad_(bool(m)) for v, m in zip((x, w, b), mask)]
        _ours(ours[0], ours[1], t, ours[2], reduction=reduction, softcap=3.0).backward(go)
        reference(ref[0], ref[1], t, ref[2], reduction=reduction, softcap=3.0).backward(go)
        for a, r, m in zip(ours, ref, mask):
            assert (a.grad is None) == (not m), mask
            if m:
                assert_close(a.grad, r.grad)
    loss = _ours(x, w, t, b)  # nothing requires grad: a plain tensor
    assert loss.grad_fn is None and not loss.requires_grad


def test_probability_target_gradient():
    x, w, t, b = _problem(probabilities=True)
    for fn in (_ours, _ref):
        tt = t.clone().requires_grad_()
        fn(x, w, tt, b, reduction="sum", label_smoothing=0.1, z_loss=0.1).backward()
        if fn is _ours:
            ours = tt.grad
    assert_close(ours, tt.grad)


def test_all_targets_ignored():
    x, w, t, b = _problem(dtype=torch.float32)
    t = torch.full_like(t, -100)
    for reduction in REDUCTIONS:
        _compare(_loss_and_grads(_ours, x, w, t, b, reduction=reduction),
                 _loss_and_grads(_torch, x, w, t, b, reduction=reduction), msg=reduction)
    assert torch.isnan(_ours(x, w, t, b))  # mean over no target, as torch


def test_empty_batch():
    x, w, t, b = _problem(n=0)
    for reduction in REDUCTIONS:
        _compare(_loss_and_grads(_ours, x, w, t, b, reduction=reduction),
                 _loss_and_grads(_torch, x, w, t, b, reduction=reduction), msg=reduction)


# --- bfloat16: products in bfloat16 where the hardware multiplies it, in float32 where it emulates ------

#: The two ways a bfloat16 call runs on a CPU, forced whatever this CPU is by replacing the capability
#: probe: "native" multiplies in bfloat16 (AMX, AVX512-BF16), "upcast" in float32 (AVX2 emulates it).
PRODUCTS = {"native": True, "upcast": False}
#: bfloat16 errors are judged normwise (relative to the truth's largest magnitude), in bfloat16 eps. The
#: loss is returned in bfloat16: its rounding, half an eps, and a float32 computation's error. A gradient
#: is a bfloat16 GEMM of the bfloat16-rounded logits' gradient, rounded once: about one eps normwise
#: (measured 0.4-0.84 eps for eager and both paths at the sizes below); 2 leaves room for another seed.
LOSS_EPS, GRAD_EPS = 1.0, 2.0
#: Ours against eager bfloat16's own error. With bfloat16 products the CPU's GEMM has no float32 output,
#: so GEMM 3 rounds each chunk's product to bfloat16 before the float32 sum, which is rounded once more
#: at the end: an element that one chunk dominates carries two roundings where eager's carries one.
#: Hence up to 2x eager's error, plus 0.05 eps so that two results at rounding level do not fail on the
#: order of the exp and the sums. (Measured below: 0.67 eps against eager's 0.84 for the weight.)
EAGER_FACTOR, EAGER_SLACK = 2.0, 0.05


@pytest.fixture(params=sorted(PRODUCTS))
def products(request, monkeypatch):
    monkeypatch.setattr(linear_xent, "cpu_multiplies_bfloat16", lambda: PRODUCTS[request.param])
    return request.param


def test_cpu_probe_reads_amx_and_avx512_bf16(monkeypatch):
    for caps, native in [({"amx_bf16": True, "avx512_bf16": True}, True), ({"avx512_bf16": True}, True),
                         ({"amx_bf16": True}, True), ({"avx2": True, "avx512_f": True}, False), ({}, False)]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert linear_xent.cpu_multiplies_bfloat16.__wrapped__() is native, caps


def test_products_run_in_bfloat16_only_where_the_hardware_multiplies_it(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(linear_xent, "cpu_multiplies_bfloat16", lambda native=native: native)
        assert products_dtype(torch.bfloat16, cpu) == (torch.bfloat16 if native else torch.float32)
        assert products_dtype(torch.float16, cpu) == torch.float32  # no CPU measured with float16 products
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            assert products_dtype(dtype, cuda) == dtype  # tensor cores
        for dtype in (torch.float32, torch.float64):
            assert products_dtype(dtype, cpu) == dtype


def test_bfloat16_call_runs_its_products_in_the_chosen_dtype(products, monkeypatch):
    """The weight gradient's product gets bfloat16 operands and a float32 accumulator (native), or
    float32 operands (upcast); the C row kernel reads the bfloat16 logits where it is built."""
    seen, rows = [], []
    add, xent_rows = linear_xent.WeightGradSum.add_, cpu_native.xent_rows
    monkeypatch.setattr(linear_xent.WeightGradSum, "add_",
                        lambda self, l, grad, x, **kw: seen.append((self.out.dtype, grad.dtype, x.dtype)) or
                        add(self, l, grad, x, **kw))
    monkeypatch.setattr(cpu_native, "xent_rows",
                        lambda x3, *a, **kw: rows.append(x3.dtype) or xent_rows(x3, *a, **kw))
    x, w, t, b = _problem(torch.bfloat16, n=20, d=8, c=30)
    loss, grads = _loss_and_grads(_ours, x, w, t, b, chunk_size=7)
    mm = torch.bfloat16 if products == "native" else torch.float32
    assert seen and set(seen) == {(torch.float32, mm, mm)}
    assert set(rows) == ({torch.bfloat16} if products == "native" and native_available() else set())
    assert loss.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)


def test_weight_grad_cuda_forms_on_meta_tensors(monkeypatch):
    """CUDA's GEMM 3 cannot run on a CPU; on meta tensors its calls check their signatures, shapes and
    dtypes: the fused form (one GEMM with ``out_dtype`` accumulating into the float32 sum) and the
    blockwise form (a torch without ``out_dtype``), at a position of a K-dimensional head."""
    grad = torch.empty(3, 10, dtype=torch.bfloat16, device="meta")  # (r, C)
    x = torch.empty(3, 4, dtype=torch.bfloat16, device="meta")  # (r, D)
    for fused in (True, False):
        monkeypatch.setattr(linear_xent, "float32_output_gemm", lambda device, fused=fused: fused)
        monkeypatch.setattr(linear_xent, "WEIGHT_BLOCK_BYTES", 4 * 4 * 2)  # 4 classes a block: 3, the last short
        out = torch.empty(10, 2, 4, device="meta")  # (C, L, D) float32 sum
        gw = linear_xent.WeightGradSum(out, torch.bfloat16)
        assert gw.mode == ("fused" if fused else "blocks")
        for first in (True, False):
            gw.add_(1, grad, x, first=first)
        assert out.dtype == torch.float32 and out.shape == (10, 2, 4)


def _emulated_float32_gemm(out, a, b, *, accumulate):
    """What cuBLAS does for :func:`linear_xent.gemm_float32_`: the float32 product of the low-precision
    operands, added to ``out`` (``accumulate``) or written over it."""
    product = a.float() @ b.float()
    out.add_(product) if accumulate else out.copy_(product)


def test_float32_output_probe(monkeypatch):
    """The probe says yes only where the fused GEMM runs and gives the right sum (a NaN left in ``out``
    by the first product, or an ``accumulate`` that overwrites, is a no); never on a CPU."""
    probe = linear_xent._float32_output_gemm_runs.__wrapped__
    cpu = torch.device("cpu")
    assert linear_xent.float32_output_gemm(cpu) is False

    def raises(out, a, b, *, accumulate):
        raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")  # torch 2.4

    def overwrites(out, a, b, *, accumulate):
        _emulated_float32_gemm(out, a, b, accumulate=False)

    def keeps_nan(out, a, b, *, accumulate):
        _emulated_float32_gemm(out, a, b, accumulate=True)

    for gemm, runs in ((_emulated_float32_gemm, True), (raises, False), (overwrites, False), (keeps_nan, False)):
        monkeypatch.setattr(linear_xent, "gemm_float32_", gemm)
        assert probe(cpu) is runs, gemm.__name__
    # On CUDA the cached check runs, except while a CUDA graph is captured (its sync would break the capture).
    cuda, probed = torch.device("cuda"), []
    monkeypatch.setattr(linear_xent, "_float32_output_gemm_runs", lambda device: probed.append(device) or True)
    for capturing in (True, False):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda capturing=capturing: capturing)
        assert linear_xent.float32_output_gemm(cuda) is not capturing
    assert probed == [cuda]


def test_fused_weight_grad_sum_matches_float64(monkeypatch):
    """The CUDA form of GEMM 3 (one GEMM per chunk accumulating into the float32 sum, emulated here as
    cuBLAS computes it) over several chunks and the positions of a K-dimensional head: the gradients
    are within the fixed eps of the float64 truth and equal the blockwise form's up to its roundings."""
    monkeypatch.setattr(linear_xent, "cpu_multiplies_bfloat16", lambda: True)
    x, w, t, b = _problem(torch.bfloat16, n=20, d=8, c=30, k=(3,))
    blocks = _loss_and_grads(_ours, x, w, t, b, chunk_size=7)
    monkeypatch.setattr(linear_xent, "float32_output_gemm", lambda device: True)
    monkeypatch.setattr(linear_xent, "gemm_float32_", _emulated_float32_gemm)
    fused = _loss_and_grads(_ours, x, w, t, b, chunk_size=7)
    truth = _loss_and_grads(_ref, x.double(), w.double(), t, b.double())
    for name, a, tr in zip(("d/dinput", "d/dlinear_weight", "d/dlinear_bias"), fused[1], truth[1]):
        assert_within_eps(a, tr, GRAD_EPS, floor=tr.abs().max().item(), msg=name)
    assert torch.equal(fused[0], blocks[0]) and torch.equal(fused[1][0], blocks[1][0])
    # The blockwise form rounds each chunk's product to bfloat16 before the float32 sum; the fused one
    # does not: at most one bfloat16 rounding per chunk apart (3 chunks), normwise.
    assert _bfloat16_eps_normwise(fused[1][1], blocks[1][1].double()) <= 3


def _confident_problem(n=512, d=64, c=3000, seed=0, confident_classes=8):
    """bfloat16 (input, linear_weight, linear_bias, target) as Cut Cross-Entropy tests: a quarter of the
    positions confident (the target's logit is the row's largest + 10), 20% of targets ignored. The
    confident classes each get a feature of their own (a column of ones), which the confident rows set
    to lift their target's logit."""
    g = _gen(seed)
    x = torch.zeros(n, d + confident_classes, dtype=torch.float64)
    w = torch.zeros(c, d + confident_classes, dtype=torch.float64)
    x[:, :d] = torch.randn(n, d, generator=g, dtype=torch.float64)
    w[:, :d] = torch.randn(c, d, generator=g, dtype=torch.float64) * (2 / d**0.5)
    b = torch.randn(c, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, c, (n,), generator=g)
    classes = torch.randperm(c, generator=g)[:confident_classes]
    w[classes, d + torch.arange(confident_classes)] = 1.0
    rows = torch.arange(1, n, 4)
    feature = rows % confident_classes
    t[rows] = classes[feature]
    logits = x @ w.T + b
    others = logits[rows].scatter(1, t[rows, None], -torch.inf).amax(1)
    x[rows, d + feature] = others + 10 - logits[rows, t[rows]]
    t[torch.randperm(n, generator=g)[:n // 5]] = -100
    return x.bfloat16(), w.bfloat16(), b.bfloat16(), t


def _bfloat16_eps_normwise(actual, truth):
    """The largest error of ``actual`` (any dtype) against ``truth``, in bfloat16 eps of ``max |truth|``."""
    return (actual.double() - truth).abs().max().item() / truth.abs().max().item() / torch.finfo(torch.bfloat16).eps


def test_bfloat16_accuracy_no_worse_than_eager(products):
    """Against the float64 truth from the same bfloat16 numbers: the loss and the input, weight and bias
    gradients within fixed bfloat16 eps, and no worse than eager bfloat16
    ``F.cross_entropy((x @ W.T + b).float(), t)``. Several chunks (chunk_size 100 of 512 rows)."""
    x, w, b, t = _confident_problem()
    logits = x.double() @ w.double().T + b.double()
    confident = (logits.gather(1, t.clamp_min(0)[:, None]).squeeze(1) - logits.amax(1) == 0) & (t != -100)
    assert confident.sum() >= 0.2 * len(t)  # the construction did what it says (bfloat16 rounding aside)

    def loss_and_grads(fn, *tensors):
        leaves = [v.detach().clone().requires_grad_() for v in tensors]
        loss = fn(*leaves)
        return (loss.detach(), *torch.autograd.grad(loss, leaves))

    truth = loss_and_grads(lambda x, w, b: F.cross_entropy(x @ w.T + b, t), x.double(), w.double(), b.double())
    eager = loss_and_grads(lambda x, w, b: F.cross_entropy((x @ w.T + b).float(), t), x, w, b)
    ours = loss_and_grads(lambda x, w, b: _ours(x, w, t, b, chunk_size=100), x, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same call, its loss left in float32
        ours32 = loss_and_grads(lambda x, w, b: _ours(x, w, t, b, chunk_size=100), x, w, b)
    assert ours[0].dtype == torch.bfloat16 and ours32[0].dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in ours[1:])
    assert_within_eps(ours[0], truth[0], LOSS_EPS, floor=truth[0].abs().item(), msg="loss")
    for name, a, tr in zip(("d/dinput", "d/dlinear_weight", "d/dlinear_bias"), ours[1:], truth[1:]):
        assert_within_eps(a, tr, GRAD_EPS, floor=tr.abs().max().item(), msg=name)
    # Against eager: the float32 loss (eager's is float32 too) and the gradients, in bfloat16 eps.
    for name, a, e, tr in zip(("loss", "d/dinput", "d/dlinear_weight", "d/dlinear_bias"), (ours32[0], *ours[1:]),
                              eager, truth):
        err, base = _bfloat16_eps_normwise(a, tr), _bfloat16_eps_normwise(e, tr)
        assert err <= EAGER_FACTOR * base + EAGER_SLACK, f"{name}: {err:.3g} eps against eager's {base:.3g}"


@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bfloat16_options_within_eps_of_float64(products, probabilities, reduction):
    """bfloat16 with label smoothing, class weights, probability targets and "none" (the torch row
    step's paths as well as the C kernel's), several chunks: within the fixed eps of the float64 truth
    computed from the same bfloat16 numbers."""
    x, w, t, b = _problem(torch.bfloat16, n=48, d=32, c=300, probabilities=probabilities, seed=1)
    kw = {"reduction": reduction, "label_smoothing": 0.1, "weight": _class_weight(torch.bfloat16, 300)}
    ours = _loss_and_grads(_ours, x, w, t, b, chunk_size=5, **kw)
    kw64 = dict(kw, weight=kw["weight"].double())
    truth = _loss_and_grads(_ref, x.double(), w.double(), t.double() if probabilities else t, b.double(), **kw64)
    assert ours[0].dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in ours[1])
    # "none": each position's loss within LOSS_EPS of its own value (floor: the largest, as normwise).
    assert_within_eps(ours[0], truth[0], LOSS_EPS, floor=truth[0].abs().max().item(), msg="loss")
    for name, a, tr in zip(("d/dinput", "d/dlinear_weight", "d/dlinear_bias"), ours[1], truth[1]):
        assert_within_eps(a, tr, GRAD_EPS, floor=tr.abs().max().item(), msg=name)


def test_bfloat16_compiles(products):
    """torch.compile of a bfloat16 call equals the eager call (inside the trace the torch row step runs
    where eager uses the C kernel) and is within the fixed eps of float64."""
    x, w, t, b = _problem(torch.bfloat16, n=20, d=8, c=30)
    def fn(x, w, b):
        return _ours(x, w, t, b, chunk_size=7)

    torch._dynamo.reset()
    try:
        compiled = _loss_and_grads(lambda x, w, t, b: torch.compile(fn, backend="aot_eager")(x, w, b), x, w, t, b)
    finally:
        torch._dynamo.reset()
    eager = _loss_and_grads(lambda x, w, t, b: fn(x, w, b), x, w, t, b)
    _compare(compiled, eager)
    truth = _loss_and_grads(_ref, x.double(), w.double(), t, b.double())
    assert_within_eps(compiled[0], truth[0], LOSS_EPS, floor=truth[0].abs().item(), msg="loss")
    for name, a, tr in zip(("d/dinput", "d/dlinear_weight", "d/dlinear_bias"), compiled[1], truth[1]):
        assert_within_eps(a, tr, GRAD_EPS, floor=tr.abs().max().item(), msg=name)


def test_gradcheck_float64():
    x, w, t, b = _problem(n=4, d=3, c=5, k=(2,))
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    for reduction in REDUCTIONS:
        assert gradcheck(lambda x, w, b: _ours(x, w, t, b, reduction=reduction, z_loss=0.05, softcap=2.0,
                                               label_smoothing=0.1, chunk_size=3), leaves)


# --- identities -----------------------------------------------------------------------------------------

def test_reduction_identities_and_ignored_rows_equal_dropped_rows():
    x, w, t, b = _problem()
    none = _ours(x, w, t, b, reduction="none", z_loss=0.01)
    assert_close(_ours(x, w, t, b, reduction="sum", z_loss=0.01), none.sum())
    keep = t != -100
    assert (none[~keep] == 0).all()
    assert_close(_ours(x, w, t, b, z_loss=0.01), _ours(x[keep], w, t[keep], b, z_loss=0.01))
    ones = torch.ones(C, dtype=torch.float64)
    assert_close(_ours(x, w, t, b, weight=ones), _ours(x, w, t, b))


def test_stats_from_the_same_pass():
    x, w, t, b = _problem(k=(2,))
    kw = {"softcap": 2.0, "z_loss": 0.01, "label_smoothing": 0.1, "chunk_size": 2}
    out = LF.linear_cross_entropy_with_stats(x, w, t, linear_bias=b, **kw)
    assert isinstance(out, LF.LinearCrossEntropyResult)
    assert_close(out.loss, _ours(x, w, t, b, **kw))
    logits = 2.0 * torch.tanh(torch.einsum("nd,ckd->nck", x, w).add(b) / 2.0)
    assert_close(out.lse, torch.logsumexp(logits, 1))
    assert torch.equal(out.argmax, logits.argmax(1))
    scored = t != -100
    assert_close(out.accuracy, ((logits.argmax(1) == t) & scored).sum().double() / scored.sum())
    # Probability targets are scored against their most probable class, every position.
    x, w, tp, b = _problem(probabilities=True)
    out = LF.linear_cross_entropy_with_stats(x, w, tp, linear_bias=b, reduction="none")
    assert_close(out.accuracy, (out.argmax == tp.argmax(1)).double().mean())
    assert out.loss.shape == out.lse.shape == out.argmax.shape == (N,)


def test_stats_loss_is_differentiable_and_stats_are_not():
    x, w, t, b = _problem()
    w = w.clone().requires_grad_()
    out = LF.linear_cross_entropy_with_stats(x, w, t, linear_bias=b)
    assert out.loss.requires_grad and not out.lse.requires_grad
    out.loss.backward()
    ref = w.detach().clone().requires_grad_()
    reference(x, ref, t, b).backward()
    assert_close(w.grad, ref.grad)


def test_second_backward():
    x, w, t, b = _problem()
    w = w.clone().requires_grad_()
    loss = _ours(x, w, t, b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
    # torch's allow_retain_graph=True: backward may run twice (it recomputes), as in torch.
    w.grad = None
    loss = _ours(x, w, t, b, options=torch.nn.LinearCrossEntropyOptions(allow_retain_graph=True))
    loss.backward(retain_graph=True)
    once = w.grad.clone()
    loss.backward()
    assert_close(w.grad, 2 * once)
    # reduction="none" recomputes in backward, so it too may run twice.
    w.grad = None
    loss = _ours(x, w, t, b, reduction="none")
    loss.sum().backward(retain_graph=True)
    loss.sum().backward()
    assert_close(w.grad, 2 * once * (t != -100).sum())


def test_in_place_change_before_recomputing_backward_is_refused():
    x, w, t, b = _problem()
    w = w.clone().requires_grad_()
    loss = _ours(x, w, t, b, reduction="none")
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), d=st.integers(1, 6), c=st.integers(1, 9), chunk=st.integers(1, 10),
       k=st.sampled_from([(), (2,)]), probabilities=st.booleans(), reduction=st.sampled_from(REDUCTIONS),
       extras=st.sampled_from(sorted(EXTRAS)), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_property_matches_reference(n, d, c, chunk, k, probabilities, reduction, extras, bias, seed):
    x, w, t, b = _problem(n=n, d=d, c=c, k=k, bias=bias, probabilities=probabilities, seed=seed)
    kw = dict(EXTRAS[extras], reduction=reduction)
    if kw.pop("weight", False):
        kw["weight"] = _class_weight(torch.float64, c)
    _compare(_loss_and_grads(_ours, x, w, t, b, chunk_size=chunk, **kw), _loss_and_grads(_ref, x, w, t, b, **kw))


# --- chunk size and memory ------------------------------------------------------------------------------

def _check_rows(n, bytes_per_row, rows, budget=CHUNK_BYTES):
    """``rows`` fits the budget, is a multiple of ALIGN_ROWS (or all of N, or MIN_ROWS), and takes no
    more chunks than the budget's own row count would."""
    fit = budget // bytes_per_row
    assert rows <= max(fit, MIN_ROWS) and (rows == n or rows % ALIGN_ROWS == 0), (n, fit, rows)
    assert -(-n // rows) == -(-n // max(MIN_ROWS, fit - fit % ALIGN_ROWS)), (n, fit, rows)


def test_chunk_rows_follows_the_budget():
    # (rows, V) float32 logits within the budget; never fewer than MIN_ROWS or more than N; spread evenly
    # over the chunks, in multiples of ALIGN_ROWS (2048 at 448: 5 chunks, the last 256).
    assert chunk_rows(2048, 32768, 1024, torch.float32) == CHUNK_BYTES // (32768 * 4) == 448
    assert chunk_rows(10, 32768, 1024, torch.float32) == 10
    assert chunk_rows(0, 32768, 1024, torch.float32) >= 1
    assert chunk_rows(1 << 20, 1 << 22, 1024, torch.float32) == MIN_ROWS
    _check_rows(2048, 32768 * 8, chunk_rows(2048, 32768, 1024, torch.float64))
    # bfloat16 input: the upcast input row and its gradient count too; so do extra (rows, C) buffers.
    n, bf16 = (1 << 20) + 1, torch.bfloat16
    _check_rows(n, 4 * 3000, chunk_rows(n, 1000, 1000, bf16))
    _check_rows(n, 4 * 3000, chunk_rows(n, 1000, 10, torch.float32, buffers=3))
    # bfloat16 products: the logits and the torch row step's float32 rows, or, with a row kernel, the
    # logits alone (turned into their gradient in place): 896 rows fit, 3 chunks of 704 (the last 640).
    _check_rows(n, 1000 * (2 + 8), chunk_rows(n, 1000, 10, bf16, buffers=2, products=bf16))
    assert chunk_rows(2048, 32768, 1024, bf16, 3, products=bf16, kernel=True) == 704
    # CUDA's budget: 2048 rows of 128256 bfloat16 logits, 4 chunks for 8192 tokens.
    assert chunk_budget(torch.device("cuda")) == CUDA_CHUNK_BYTES and chunk_budget(torch.device("cpu")) == CHUNK_BYTES
    assert chunk_rows(8192, 128256, 4096, bf16, budget=CUDA_CHUNK_BYTES, products=bf16, kernel=True) == 2048
    plain, capped = RowSpec(), RowSpec(label_smoothing=0.1, weight=torch.ones(3))
    assert class_buffers(plain, None, False) == 1
    assert class_buffers(capped, 30.0, False) == 3
    assert class_buffers(plain, None, True) > class_buffers(plain, 30.0, False)


_MEMORY_CHILD = textwrap.dedent("""
    import json, sys, torch
    import losskit.functional as LF
    from losskit.ops import linear_xent
    from losskit.testing import peak_memory_above
    torch.set_num_threads(1)
    dtype, native = getattr(torch, sys.argv[1]), sys.argv[2] == "native"
    linear_xent.cpu_multiplies_bfloat16 = lambda: native
    d, v, chunk = 64, 8192, 512
    out = {}
    for n in (1024, 4096):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(v, d, generator=g) * 0.1).to(dtype).requires_grad_()
        t = torch.randint(0, v, (n,), generator=g)
        def step():
            LF.linear_cross_entropy(x, w, t, chunk_size=chunk).backward()
            return x.grad, w.grad
        step()  # warm-up: lazy imports and allocator state
        x.grad = w.grad = None
        out[n] = peak_memory_above(step)
        x.grad = w.grad = None
    print(json.dumps(out))
""")


@pytest.mark.parametrize("dtype, products", [("float32", "native"), ("bfloat16", "native"), ("bfloat16", "upcast")])
def test_peak_memory_is_gradients_plus_one_chunk_and_flat_in_n(dtype, products):
    """Measured in a child process (VmHWM), at two N: the peak above the inputs, minus the gradients,
    stays within one (chunk, V) chunk plus small scratch, and does not grow with N (the materialised
    float32 logits would be 32 MiB and 128 MiB). float32: the float32 logits, which the torch row step
    turns into their gradient in place. bfloat16 adds the weight gradient's float32 sum; with bfloat16
    products the chunk is the bfloat16 logits alone (the C row kernel writes their gradient in place)
    plus one block of the weight gradient's product (WEIGHT_BLOCK_BYTES or the whole (V, D) product, if
    smaller) and its float32 copy; upcast, the float32 logits and a float32 copy of the head.
    Measured here: 15.9, 11.9 and 19.0-19.1 MiB against bounds of 20, 17 and 24."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, dtype, products], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    peaks = {int(n): p for n, p in json.loads(run.stdout).items()}
    d, v, chunk, mib = 64, 8192, 512, 1 << 20
    size = getattr(torch, dtype).itemsize
    low = dtype == "bfloat16" and products == "native"
    # 16 MiB of float32 logits; bfloat16 logits, 8 MiB, turned into their gradient in place by the C
    # kernel or, without it, copied to float32 for the torch row step
    chunk_bytes = chunk * v * ((2 if native_available() else 6) if low else 4)
    if dtype == "bfloat16":
        chunk_bytes += v * d * 4  # the weight gradient's float32 sum
        # native: a block of the product and the float32 copy torch's mixed-dtype add may make of it;
        # upcast: the head's float32 copy
        chunk_bytes += 3 * min(v * d * size, linear_xent.WEIGHT_BLOCK_BYTES) if products == "native" else v * d * 4
    # Scratch beyond the chunk: per-position vectors, the in-cache sub-block temporaries of
    # ops.reference.rows, and the allocator's and interpreter's slack; less than the 8 MiB that a second
    # (chunk, V) bfloat16 buffer would add.
    slack = 4 * mib
    extra = {n: p - (n * d + v * d) * size for n, p in peaks.items()}  # minus grad_input and grad_weight
    for n, e in extra.items():
        assert e <= chunk_bytes + slack, f"N={n}: {e / mib:.1f} MiB above the gradients"
    assert extra[4096] - extra[1024] <= 2 * mib, f"grows with N: {extra}"


# --- bad input ------------------------------------------------------------------------------------------

def _bad_cases():
    x, w, t, b = _problem(dtype=torch.float32)
    meta = torch.empty(C, D, device="meta")
    cases = [
        ("target", ValueError, dict(target=torch.full((N,), C))),
        ("target", ValueError, dict(target=torch.full((N,), -3))),
        ("in_features", ValueError, dict(linear_weight=torch.randn(C, D + 1))),
        ("linear_weight", TypeError, dict(linear_weight=w.double())),
        ("linear_weight", ValueError, dict(linear_weight=meta)),
        ("linear_bias", ValueError, dict(linear_bias=torch.randn(C + 1))),
        ("linear_bias", TypeError, dict(linear_bias=b.double())),
        ("input", TypeError, dict(input=x.long())),
        ("input", ValueError, dict(input=x.view(1, N, D))),
        ("linear_weight", ValueError, dict(linear_weight=torch.randn(D))),
        ("target", ValueError, dict(target=t[:-1])),
        ("target", TypeError, dict(target=t.float())),
        ("target", TypeError, dict(target=torch.zeros(N, C, dtype=torch.long))),
        ("weight", ValueError, dict(weight=torch.ones(C + 1))),
        ("reduction", ValueError, dict(reduction="avg")),
        ("label_smoothing", ValueError, dict(label_smoothing=1.5)),
        ("z_loss", ValueError, dict(z_loss=-1.0)),
        ("softcap", ValueError, dict(softcap=0.0)),
        ("chunk_size", ValueError, dict(chunk_size=0)),
        ("chunk_size", TypeError, dict(chunk_size=2.0)),
        ("options", TypeError, dict(options={"batch_chunk_size": 2})),
        ("batch_chunk_size", ValueError,
         dict(chunk_size=3, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2))),
        ("ignore_index", ValueError, dict(target=torch.rand(N, C), ignore_index=-100)),
        ("batched", ValueError, dict(input=x[0], linear_weight=torch.randn(C, 2, D), target=t[0],
                                     linear_bias=None)),
    ]
    return [(name, err, dict(dict(input=x, linear_weight=w, target=t, linear_bias=b), **kw))
            for name, err, kw in cases]


@pytest.mark.parametrize("name, error, kwargs", _bad_cases(), ids=[f"{c[0]}-{i}" for i, c in enumerate(_bad_cases())])
def test_bad_input_is_refused_before_any_chunk(name, error, kwargs, monkeypatch):
    def no_sweep(*args, **kw):
        raise AssertionError("a chunk ran before the input was validated")
    monkeypatch.setattr(lce_module, "sweep", no_sweep)
    args = (kwargs.pop("input"), kwargs.pop("linear_weight"), kwargs.pop("target"))
    with pytest.raises(error, match=name):
        LF.linear_cross_entropy(*args, **kwargs)


def test_class_weight_requiring_grad_is_refused():
    x, w, t, b = _problem()
    with pytest.raises(ValueError, match="weight"):
        _ours(x, w, t, b, weight=_class_weight(torch.float64).requires_grad_())


# --- module ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_features, bias", [((), False), ((), True), ((2, 3), True)])
def test_module_is_drop_in_for_torch(out_features, bias):
    kw = dict(out_features=out_features, bias=bias, dtype=torch.float64, label_smoothing=0.1,
              weight=_class_weight(torch.float64))
    torch.manual_seed(0)
    ours = LN.LinearCrossEntropyLoss(D, C, **kw)
    torch.manual_seed(0)
    ref = torch.nn.LinearCrossEntropyLoss(D, C, **kw)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    x = torch.randn(N, D, generator=_gen(1), dtype=torch.float64)
    t = torch.randint(0, C, (N, *out_features), generator=_gen(2))
    lo, lr = ours(x, t), ref(x, t)
    assert_close(lo, lr)
    lo.backward()
    lr.backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, msg=name)


def test_module_equals_functional_with_extras():
    m = LN.LinearCrossEntropyLoss(D, C, bias=True, dtype=torch.float64, reduction="sum", z_loss=0.01, softcap=3.0,
                                  chunk_size=2)
    x, _, t, _ = _problem()
    expected = LF.linear_cross_entropy(x, m.linear.weight.detach(), t, linear_bias=m.linear.bias.detach(),
                                       reduction="sum", z_loss=0.01, softcap=3.0)
    assert_close(m(x, t).detach(), expected)
    assert "softcap=3.0" in repr(m)
    with pytest.raises(ValueError, match="weight"):
        LN.LinearCrossEntropyLoss(D, C, weight=torch.ones(C + 1))


def test_autocast_mixed_dtypes_as_torch():
    """Under CPU autocast torch's linear casts a float32 head to the bfloat16 activations' dtype and runs
    cross_entropy in float32; ours accepts the mixed dtypes and returns float32, its products in the
    input's dtype (the head cast to it) where bfloat16 products are native, else in float32.
    Tolerance: bfloat16's, since torch rounds the head and the logits to bfloat16 and we may not."""
    x, w, t, b = _problem(torch.float32, n=16, d=8, c=20)
    x = x.bfloat16()
    results = []
    for fn in (_ours, _torch):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(leaves[0], leaves[1], t, leaves[2])
        loss.backward()
        results.append((loss, [v.grad for v in leaves]))
    (lo, go), (lr, gr) = results
    assert lo.dtype == lr.dtype == torch.float32
    assert_close(lo, lr, dtype=torch.bfloat16)
    for a, r in zip(go, gr):
        assert a.dtype == r.dtype
        assert_close(a.float(), r.float(), dtype=torch.bfloat16)
