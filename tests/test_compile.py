"""torch.compile and CPU autocast: every exported loss and module against eager.

Compilation is the slow part of this file, so it is kept to what each check needs:

* every function of ``losskit.functional`` is compiled with the ``aot_eager`` backend, which runs
  dynamo's capture and AOTAutograd's joint forward/backward tracing (where a custom autograd.Function,
  its saved gradients and their scaling by ``grad_output`` must trace) but skips inductor's C++ code
  generation;
  ``fullgraph=True`` wherever the function allows it (see ``GRAPH_BREAKS`` for the rest and why);
* a few representative losses also go through the default inductor backend, end to end;
* every module of ``losskit.nn`` is compiled with the ``eager`` backend (dynamo capture of the module's
  one-call shell; its functional's tracing is covered above).

Each compiled call is compared with the eager call in value and in the gradient for a non-trivial
``grad_output``. The second half runs every function under CPU autocast with bfloat16 against torch's
autocast result.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import losskit.functional as LF
import losskit.nn as LN
from losskit.testing import assert_close

N, C = 4, 5


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(), dtype=torch.float32)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


_INDEX = torch.tensor([0, 3, 1, 4])  # (N,) class targets
D = 3  # in_features of linear_cross_entropy's head, a (C, D) weight
_BINARY = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]] * N)  # (N, C) multi-label targets


@dataclass
class Case:
    """How to call one function: ``make()`` returns fresh (args, kwargs); tensors requiring grad are checked."""

    make: Callable[[], tuple[tuple, dict]]
    module: Callable[[], torch.nn.Module] | None = None
    module_args: Callable[[tuple], tuple] = lambda args: args  # the module's forward arguments


CASES: dict[str, Case] = {
    "binary_cross_entropy": Case(lambda: ((_leaf(_randn(N, C).sigmoid()), _leaf(torch.rand(N, C, generator=_gen()))),
                                          {}), LN.BCELoss),
    "binary_cross_entropy_with_logits": Case(lambda: ((_leaf(_randn(N, C)), _BINARY),
                                                      {"pos_weight": torch.full((C,), 2.0)}), LN.BCEWithLogitsLoss),
    "cross_entropy": Case(lambda: ((_leaf(_randn(N, C)), _INDEX), {"label_smoothing": 0.1}), LN.CrossEntropyLoss),
    "entropy": Case(lambda: ((_leaf(_randn(N, C)),), {"logits": True}), lambda: LN.Entropy(logits=True)),
    "focal_loss": Case(lambda: ((_leaf(_randn(N, C)), _INDEX), {"gamma": 2.0}), LN.FocalLoss),
    # reduction="mean" would be torch's deprecation warning, a graph break of its own.
    "linear_cross_entropy": Case(lambda: ((_leaf(_randn(N, D)), _leaf(_randn(C, D)), _INDEX), {}),
                                 lambda: LN.LinearCrossEntropyLoss(D, C), lambda args: (args[0], args[2])),
    "linear_cross_entropy_with_stats": Case(lambda: ((_leaf(_randn(N, D)), _leaf(_randn(C, D)), _INDEX), {})),
    "kl_div": Case(lambda: ((_leaf(_randn(N, C).log_softmax(1)), _leaf(_randn(N, C).softmax(1))),
                            {"reduction": "batchmean"}), lambda: LN.KLDivLoss(reduction="batchmean")),
    "log_softmax": Case(lambda: ((_leaf(_randn(N, C)),), {"dim": 1}), lambda: LN.LogSoftmax(dim=1)),
    "mse_loss": Case(lambda: ((_leaf(_randn(N, C)), _leaf(_randn(N, C) + 1)), {}), LN.MSELoss),
    "multilabel_soft_margin_loss": Case(lambda: ((_leaf(_randn(N, C)), _BINARY), {}), LN.MultiLabelSoftMarginLoss),
    "nll_loss": Case(lambda: ((_leaf(_randn(N, C).log_softmax(1)), _INDEX), {}), LN.NLLLoss),
    "rmse_loss": Case(lambda: ((_leaf(_randn(N, C)), _leaf(_randn(N, C) + 1)), {}), LN.RMSELoss),
    "sigmoid_focal_loss": Case(lambda: ((_leaf(_randn(N, C)), _BINARY), {"reduction": "sum"}),
                               lambda: LN.SigmoidFocalLoss(reduction="sum")),
    "softmax": Case(lambda: ((_leaf(_randn(N, C)),), {"dim": 1}), lambda: LN.Softmax(dim=1)),
}

#: Functions that compile only with graph breaks, and why. Each break is a check that reads tensor
#: values to keep a later index or domain safe (a data-dependent Python branch, which fullgraph refuses;
#: inside losskit.no_sync() they are skipped, see tests/ops/test_library.py). Under torch.compile,
#: impl="auto" runs the composite (torch's own loss), which the compiler fuses.
_TARGET_CHECK = "the target range check that keeps indexing in bounds (_checks.class_targets)"
GRAPH_BREAKS = {
    "binary_cross_entropy": "the [0, 1] domain check of input and target (_checks.in_unit_interval)",
    "cross_entropy": _TARGET_CHECK,
    "focal_loss": _TARGET_CHECK,
    "linear_cross_entropy": _TARGET_CHECK,
    "linear_cross_entropy_with_stats": _TARGET_CHECK,
    "nll_loss": _TARGET_CHECK,
}

#: Losses also compiled end to end with inductor: a fused elementwise loss, and the fused linear head
#: (a graph break at its target check; gradients that are views of its accumulators).
INDUCTOR = ["mse_loss", "linear_cross_entropy"]


def _call(fn: Callable, case: Case, module: bool = False) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Every tensor of the result and the gradients of the first (the loss), for a grad_output that is
    neither ones nor uniform."""
    args, kwargs = case.make()
    if module:
        args, kwargs = case.module_args(args), {}
    out = fn(*args, **kwargs)
    values = list(out) if isinstance(out, tuple) else [out]  # a NamedTuple of results: the loss first
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grad_output = torch.linspace(0.5, 1.5, values[0].numel()).view(values[0].shape)
    return [v.detach() for v in values], torch.autograd.grad(values[0], leaves, grad_output)


def _compare(compiled: Callable, eager: Callable, case: Case, module: bool = False) -> None:
    values, grads = _call(compiled, case, module)
    ref_values, ref_grads = _call(eager, case, module)
    for value, ref in zip(values, ref_values, strict=True):
        if value.is_floating_point():
            assert_close(value, ref)
        else:
            assert torch.equal(value, ref)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert_close(g, ref)


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _functions() -> set[str]:
    """The exported loss functions (not the result types exported beside them)."""
    return {name for name in LF.__all__ if inspect.isfunction(getattr(LF, name))}


def test_every_export_has_a_case():
    missing = sorted(_functions() - set(CASES))
    assert not missing, f"add a Case for {missing} to tests/test_compile.py"
    modules = {case.module().__class__.__name__ for case in CASES.values() if case.module is not None}
    missing = sorted(set(LN.__all__) - modules)
    assert not missing, f"give the Case of {missing}'s functional a module in tests/test_compile.py"


@pytest.mark.parametrize("name", sorted(CASES))
def test_functional_compiles(name):
    fn, case = getattr(LF, name), CASES[name]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=name not in GRAPH_BREAKS)
    _compare(compiled, fn, case)


@pytest.mark.parametrize("name", INDUCTOR)
def test_functional_compiles_with_inductor(name):
    fn, case = getattr(LF, name), CASES[name]
    _compare(torch.compile(fn, fullgraph=name not in GRAPH_BREAKS), fn, case)


@pytest.mark.parametrize("name", sorted(name for name, case in CASES.items() if case.module is not None))
def test_module_compiles(name):
    case = CASES[name]
    module = case.module()
    compiled = torch.compile(module, backend="eager", fullgraph=name not in GRAPH_BREAKS)
    _compare(compiled, module, case, module=True)


# -- CPU autocast with bfloat16 -----------------------------------------------------------------------

_PROB = torch.rand(N, C, generator=_gen())  # (N, C) probabilities in [0, 1)
_HEAD = torch.randn(7, C, generator=_gen())  # (7, C): a head from the Linear's C outputs to 7 classes

#: Each loss applied to the (N, C) output ``x`` of a Linear; ``f`` is losskit's function or torch's.
AUTOCAST: dict[str, Callable[[Callable, torch.Tensor], torch.Tensor]] = {
    "binary_cross_entropy": lambda f, x: f(x.sigmoid(), _PROB.to(x.dtype)),
    "binary_cross_entropy_with_logits": lambda f, x: f(x, _BINARY.to(x.dtype)),
    "cross_entropy": lambda f, x: f(x, _INDEX, label_smoothing=0.1),
    "entropy": lambda f, x: f(x, logits=True),
    "focal_loss": lambda f, x: f(x, _INDEX),
    "kl_div": lambda f, x: f(x.log_softmax(1), _PROB.softmax(1).to(x.dtype), reduction="batchmean"),
    "linear_cross_entropy": lambda f, x: f(x, _HEAD.to(x.dtype), _INDEX),
    "linear_cross_entropy_with_stats": lambda f, x: f(x, _HEAD.to(x.dtype), _INDEX).loss,
    "log_softmax": lambda f, x: f(x, 1),
    "mse_loss": lambda f, x: f(x, _PROB.to(x.dtype)),
    "multilabel_soft_margin_loss": lambda f, x: f(x, _BINARY.to(x.dtype)),
    "nll_loss": lambda f, x: f(x.log_softmax(1), _INDEX),
    "rmse_loss": lambda f, x: f(x, _PROB.to(x.dtype)),
    "sigmoid_focal_loss": lambda f, x: f(x, _BINARY.to(x.dtype), reduction="sum"),
    "softmax": lambda f, x: f(x, 1),
}


def _through_linear(loss: Callable[[torch.Tensor], torch.Tensor]):
    """The loss of a Linear's output under autocast, and the Linear's gradients."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, C)
    h = torch.randn(N, 8, generator=_gen())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(linear(h))  # the Linear's output is bfloat16
    grad_output = torch.linspace(0.5, 1.5, out.numel()).view(out.shape)
    grads = torch.autograd.grad(out, (linear.weight, linear.bias), grad_output.to(out.dtype))
    return out.detach(), grads


def test_every_export_has_an_autocast_case():
    assert not sorted(_functions() - set(AUTOCAST)), "add an AUTOCAST entry in tests/test_compile.py"


@pytest.mark.parametrize("name", sorted(AUTOCAST))
def test_autocast_bfloat16(name):
    """Under CPU autocast a loss reads bfloat16 activations, and torch's autocast computes its losses in
    float32 from them. The reference is that: torch's own function under autocast where torch has it,
    else losskit's on the activations cast to float32 (what autocast's float32 policy does, following the
    closest torch relative: see losskit._autocast). The result dtype must be the reference's. The bfloat16
    row of the tolerance table applies because the activations are bfloat16 (and where torch rounds more of
    its intermediates to bfloat16, linear_cross_entropy's logits say, or the float32 reference reads a
    target not rounded to bfloat16); tests/test_autocast.py compares float32 results to float32's."""
    ours = _through_linear(lambda x: AUTOCAST[name](getattr(LF, name), x))
    torch_fn = getattr(torch.nn.functional, name, None)
    if torch_fn is not None:
        ref = _through_linear(lambda x: AUTOCAST[name](torch_fn, x))
    else:
        ref = _through_linear(lambda x: AUTOCAST[name](getattr(LF, name), x.float()))
    assert ours[0].dtype == ref[0].dtype
    assert_close(ours[0].float(), ref[0].float(), dtype=torch.bfloat16, msg="value")
    for g, r in zip(ours[1], ref[1]):
        assert_close(g, r, dtype=torch.bfloat16, msg="gradient")
