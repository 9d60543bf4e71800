"""The C kernels as torch custom ops: ``opcheck`` on each, and torch.compile(fullgraph=True) through them.

(The Triton kernels' custom ops get the same checks in tests/ops/triton/test_library.py, under the
interpreter.)"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import losskit
import losskit.functional as LF
from losskit.ops import _library
from losskit.testing import assert_close


def _row_cases(backend: str) -> list[tuple[str, tuple, dict]]:
    """(operation, args, kwargs) of each row op: odd sizes, strided logits, every output present."""
    g = torch.Generator().manual_seed(0)
    x3 = torch.randn(3, 5, 2, generator=g)  # (N, C, L) = (3, 5, 2)
    xt = torch.randn(3, 2, 5, generator=g).transpose(1, 2)  # a strided class dim
    target = torch.tensor([0, 4, -100, 2, 1, 3])
    probs = torch.rand(3, 5, 2, generator=g).softmax(1)
    w = torch.rand(5, generator=g) + 0.5
    ops = _library._ops(backend)
    out = lambda *shape: torch.empty(*shape)  # noqa: E731
    return [
        ("xent_rows", (xt, target, out(3, 5, 2), None, w, out(3, 2), torch.tensor(0.25), -100, 0.1, 0.0), ops),
        ("xent_rows", (x3, target, out(3, 5, 2), None, None, out(3, 2), torch.tensor(1.0), -100, 0.0, 2.0), ops),
        ("xent_rows", (x3, probs, out(3, 5, 2), out(3, 5, 2), w, out(3, 2), torch.tensor(0.5), -100, 0.2, 0.0), ops),
        ("nll_rows", (x3.log_softmax(1), target, out(3, 5, 2), w, out(3, 2), torch.tensor(0.5), -100), ops),
        ("softmax_rows", (xt, out(3, 5, 2), True), ops),
        ("softmax_backward_rows", (x3.softmax(1), xt, out(3, 5, 2), False), ops),
        ("entropy_rows", (xt, out(3, 2), out(3, 5, 2), True), ops),
    ]


@pytest.mark.parametrize("index", range(7))
def test_c_row_ops_pass_opcheck(index):
    name, args, ops = _row_cases("cpu")[index]
    opcheck(ops[name], args)


@pytest.mark.parametrize("op, kind", [("binary", "bce"), ("binary", "logits"), ("binary", "soft_margin"),
                                      ("binary", "focal"), ("pointwise", "0"), ("pointwise", "1"), ("pointwise", "2")])
@pytest.mark.parametrize("keep", [False, True])
def test_c_elementwise_ops_pass_opcheck(op, kind, keep):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 7, generator=g) * 0.9 + 0.05
    y = torch.rand(4, 7, generator=g)
    operands = [x, y, torch.rand(7, generator=g)] if kind in ("bce", "logits", "soft_margin", "0") else [x, y]
    if kind == "0":
        operands[2] = torch.rand(4, 7, generator=g)  # mse's weight has the input's shape
    args = (kind, 0.25, 2.0, operands, [True, True] + [False] * (len(operands) - 2), torch.float32, torch.float32,
            keep, torch.tensor(0.5), kind == "soft_margin" and keep)
    opcheck(_library._ops("cpu")[op], args)


W5 = torch.linspace(0.5, 1.5, 5)
CASES = {
    "cross_entropy": lambda x, t, impl: LF.cross_entropy(x, t, weight=W5, label_smoothing=0.1, impl=impl),
    "focal_loss": lambda x, t, impl: LF.focal_loss(x, t, gamma=2.0, impl=impl),
    "nll_loss": lambda x, t, impl: LF.nll_loss(x.log_softmax(1), t, impl=impl),
    "log_softmax": lambda x, t, impl: LF.log_softmax(x, 1, impl=impl).square().sum(),
    "entropy": lambda x, t, impl: LF.entropy(x, 1, logits=True, impl=impl).sum(),
    "bce_logits": lambda x, t, impl: LF.binary_cross_entropy_with_logits(x, x.detach().sigmoid(), impl=impl),
    "mse_loss": lambda x, t, impl: LF.mse_loss(x, x.detach().flip(0), impl=impl),
    "rmse_loss": lambda x, t, impl: LF.rmse_loss(x, x.detach().flip(0), impl=impl),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_kernels_trace_in_one_graph(name):
    fn = CASES[name]
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 4, 2, 1])
    compiled = torch.compile(lambda a: fn(a, t, "compiled"), backend="aot_eager", fullgraph=True)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    with losskit.no_sync():  # no target check reading the device: nothing breaks the graph
        out = compiled(a)
    ref = fn(b, t, "compiled")
    out.backward()
    ref.backward()
    assert_close(out, ref)
    assert_close(a.grad, b.grad)


def test_float64_traces_through_the_c_kernels_at_float64_precision():
    # Probability targets: "mean" divides by the 3 positions, a Python scale of 1/3 (inexact in float32).
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    p = torch.rand(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).softmax(1)
    fn = lambda a: LF.cross_entropy(a, p, label_smoothing=0.1, impl="compiled")  # noqa: E731
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    with losskit.no_sync():
        torch.compile(fn, backend="aot_eager", fullgraph=True)(a).backward()
    fn(b).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-15, atol=0)  # a float32 scale: off by 1e-8
