"""Every loss with ``impl="triton"``, end to end through its functional, against the reference.

The kernels' own tests (test_xent.py, test_softmax.py, test_elementwise.py, test_shard.py) cover their
options one by one; this file checks the wiring: the dispatch table, the drivers' arguments, the
gradients attached, the custom ops (``opcheck``, torch.compile through them), the linear
cross-entropy's chunk step and the vocab-parallel loss on one rank. Shapes are small and odd (C = 1, a
prime C, an (N, C, d) input) because the interpreter runs each program in numpy.
"""

from __future__ import annotations

import pytest
import torch

import losskit
import losskit.functional as LF
from losskit.ops import _dispatch, _library
from losskit.testing import assert_close

pytest.importorskip("triton", minversion="3.8")  # the oldest the kernels build with (ops/_dispatch.py)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads(fn, *tensors):
    """The result of ``fn(*tensors)`` and the gradients of its sum weighted by a fixed non-uniform
    grad_output, for every floating tensor."""
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in tensors]
    out = fn(*leaves)
    go = torch.linspace(0.5, 1.5, out.numel()).view(out.shape)
    wrt = [t for t in leaves if t.is_floating_point()]
    return [out.detach(), *torch.autograd.grad(out, wrt, go)]


X = torch.randn(6, 37, generator=_g(1))  # (N, C), C prime
X3 = torch.randn(3, 7, 5, generator=_g(2))  # (N, C, d)
T = torch.randint(0, 37, (6,), generator=_g(3))
T[2] = -100
T3 = torch.randint(0, 7, (3, 5), generator=_g(4))
P = torch.rand(6, 37, generator=_g(5)).softmax(1)
W37 = torch.rand(37, generator=_g(6)) + 0.5
B = torch.rand(6, 37, generator=_g(7))
LABELS = (torch.rand(6, 37, generator=_g(8)) > 0.5).float()

CASES = {
    "cross_entropy": (lambda x, impl: LF.cross_entropy(x, T, W37, label_smoothing=0.1, impl=impl), X),
    "cross_entropy_nd": (lambda x, impl: LF.cross_entropy(x, T3, reduction="none", impl=impl), X3),
    "cross_entropy_c1": (lambda x, impl: LF.cross_entropy(x, torch.zeros(6, dtype=torch.long), impl=impl),
                         X[:, :1]),
    "cross_entropy_probs": (lambda x, p, impl: LF.cross_entropy(x, p, label_smoothing=0.05, impl=impl), X, P),
    "focal_loss": (lambda x, impl: LF.focal_loss(x, T, gamma=2.0, reduction="sum", impl=impl), X),
    "nll_loss": (lambda x, impl: LF.nll_loss(x, T, W37, impl=impl), X.log_softmax(1)),
    "softmax": (lambda x, impl: LF.softmax(x, 1, impl=impl), X3),
    "log_softmax": (lambda x, impl: LF.log_softmax(x, -1, impl=impl), X),
    "entropy_logits": (lambda x, impl: LF.entropy(x, 1, logits=True, impl=impl), X3),
    "entropy_probs": (lambda x, impl: LF.entropy(x, impl=impl), P),
    "kl_div": (lambda x, t, impl: LF.kl_div(x, t, reduction="batchmean", impl=impl), X.log_softmax(1), P),
    "kl_div_log": (lambda x, t, impl: LF.kl_div(x, t, reduction="none", log_target=True, impl=impl),
                   X.log_softmax(1), P.log()),
    "bce": (lambda x, t, impl: LF.binary_cross_entropy(x, t, W37, impl=impl), B * 0.98 + 0.01, LABELS),
    "bce_logits": (lambda x, t, impl: LF.binary_cross_entropy_with_logits(x, t, pos_weight=W37, impl=impl), X, B),
    "soft_margin": (lambda x, impl: LF.multilabel_soft_margin_loss(x, LABELS, W37, reduction="none", impl=impl), X),
    "sigmoid_focal": (lambda x, t, impl: LF.sigmoid_focal_loss(x, t, 0.25, 2.0, "mean", impl=impl), X, LABELS),
    "mse_loss": (lambda x, t, impl: LF.mse_loss(x, t, weight=B, impl=impl), X, B),
    "rmse_loss": (lambda x, t, impl: LF.rmse_loss(x, t, impl=impl), X, B),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_equals_the_reference(name):
    fn, *tensors = CASES[name]
    ours = _grads(lambda *t: fn(*t, "triton"), *tensors)
    ref = _grads(lambda *t: fn(*t, "torch"), *tensors)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b)


def test_triton_gives_bfloat16_results_of_bfloat16_grade():
    x = X.to(torch.bfloat16)
    ours = _grads(lambda a: LF.cross_entropy(a, T, impl="triton"), x)
    ref = _grads(lambda a: LF.cross_entropy(a, T, impl="torch"), x)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype == torch.bfloat16
        assert_close(a, b)


def test_linear_cross_entropy_chunk_step_runs_on_triton():
    x = torch.randn(9, 8, generator=_g(9))
    w = torch.randn(37, 8, generator=_g(10))
    t = torch.randint(0, 37, (9,), generator=_g(11))
    t[4] = -100
    fn = lambda a, b, impl: LF.linear_cross_entropy(a, b, t, label_smoothing=0.1, chunk_size=4, impl=impl)  # noqa: E731
    for a, b in zip(_grads(lambda a, b: fn(a, b, "triton"), x, w), _grads(lambda a, b: fn(a, b, "torch"), x, w),
                    strict=True):
        assert_close(a, b)


def test_triton_custom_ops_pass_opcheck():
    from torch.library import opcheck

    x3 = torch.randn(3, 5, 2, generator=_g(12))
    target = torch.tensor([0, 4, -100, 2, 1, 3])
    ops = _library._ops("triton")
    opcheck(ops["xent_rows"], (x3, target, torch.empty(3, 5, 2), None, torch.rand(5) + 0.5, torch.empty(3, 2),
                               torch.tensor(0.5), -100, 0.1, 0.0))
    opcheck(ops["nll_rows"], (x3.log_softmax(1), target, torch.empty(3, 5, 2), None, torch.empty(3, 2),
                              torch.tensor(0.5), -100))
    opcheck(ops["softmax_rows"], (x3, torch.empty(3, 5, 2), False))
    opcheck(ops["softmax_backward_rows"], (x3.log_softmax(1), x3, torch.empty(3, 5, 2), True))
    opcheck(ops["entropy_rows"], (x3, torch.empty(3, 2), torch.empty(3, 5, 2), True))
    x, y = torch.randn(4, 7, generator=_g(13)), torch.rand(4, 7, generator=_g(14))
    opcheck(ops["binary"], ("logits", 0.0, 0.0, [x, y, None, None], [True, True, False, False], torch.float32,
                            torch.float32, False, torch.tensor(0.5), False))
    opcheck(ops["pointwise"], ("1", 0.0, 0.0, [x.log_softmax(1), y], [True, True], torch.float32, torch.float32,
                               True, torch.tensor(0.5), False))


def test_torch_compile_traces_through_the_triton_kernel_in_one_graph():
    fn = lambda a: LF.cross_entropy(a, T, W37, impl="triton")  # noqa: E731
    with losskit.no_sync():  # no target check: nothing reads device values, fullgraph holds
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        for a, b in zip(_grads(compiled, X), _grads(fn, X), strict=True):
            assert_close(a, b)


def test_out_of_range_targets_are_nan_not_an_address_without_checks():
    t = T.clone()
    t[0] = 37
    with losskit.no_sync():
        loss = LF.cross_entropy(X, t, reduction="none", impl="triton")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all()
    with pytest.raises(ValueError, match="class index 37"):
        LF.cross_entropy(X, t, impl="triton")


def test_the_table_reaches_triton_for_every_kernel_operation():
    for op in _dispatch._TABLE:
        assert _dispatch.backend(op, "triton", X) == "triton"
        assert callable(_dispatch.kernel(op, "triton"))


def test_vocab_parallel_cross_entropy_on_one_rank_runs_the_shard_kernels():
    from losskit.distributed import vocab_parallel_cross_entropy

    fn = lambda x, impl: vocab_parallel_cross_entropy(x, T, weight=W37, label_smoothing=0.1, impl=impl)  # noqa: E731
    for a, b in zip(_grads(lambda x: fn(x, "triton"), X), _grads(lambda x: fn(x, "torch"), X), strict=True):
        assert_close(a, b)
