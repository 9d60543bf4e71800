"""CPU autocast: losskit's losses follow torch's float32 policy (losskit._autocast).

tests/test_compile.py checks every export through a Linear under autocast; this file checks the policy
itself: bfloat16 (and float16) tensors given directly, weights and mixed target dtypes included, the
input gradient in the input's own dtype, and nothing changed (no copy) when autocast is off.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import losskit.functional as LF
from losskit._autocast import enabled, float32_under_autocast
from losskit.testing import assert_close

N, C = 6, 5


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


_X = torch.randn(N, C, generator=_gen())  # (N, C) logits
_PROB = torch.rand(N, C, generator=_gen()) * 0.98 + 0.01  # (N, C) in (0, 1)
_INDEX = torch.tensor([0, 3, 1, 4, 2, 0])  # (N,) class targets
_CLASS_WEIGHT = torch.linspace(0.5, 1.5, C)  # (C,)
_PROB_BF16 = _PROB.bfloat16()  # the float32 reference of a bfloat16 run reads the same rounded values

#: Each loss of torch.nn.functional, called as ``f(x, d)`` with ``x`` the (N, C) input (requires grad)
#: and ``d`` the low-precision dtype for its other tensors.
TORCH_CASES: dict[str, Callable[[Callable, torch.Tensor, torch.dtype], torch.Tensor]] = {
    "binary_cross_entropy": lambda f, x, d: f(x.sigmoid(), _PROB.to(d), _PROB.to(d)),
    "binary_cross_entropy_with_logits": lambda f, x, d: f(x, _PROB.to(d), _PROB.to(d), pos_weight=_CLASS_WEIGHT.to(d)),
    "cross_entropy": lambda f, x, d: f(x, _INDEX, _CLASS_WEIGHT.to(d), label_smoothing=0.1),
    "cross_entropy_probabilities": lambda f, x, d: f(x, _PROB.softmax(1).to(d)),
    "kl_div": lambda f, x, d: f(x.log_softmax(1), _PROB.to(d), reduction="batchmean"),
    "mse_loss": lambda f, x, d: f(x, _PROB.to(d)),
    "mse_loss_weighted": lambda f, x, d: f(x, _PROB.to(d), weight=_PROB.to(d), reduction="sum"),
    "mse_loss_integer_target": lambda f, x, d: f(x, _INDEX.view(N, 1).expand(N, C)),
    "multilabel_soft_margin_loss": lambda f, x, d: f(x, _PROB.round().to(d), _CLASS_WEIGHT.to(d)),
    "nll_loss": lambda f, x, d: f(x.log_softmax(1), _INDEX, _CLASS_WEIGHT.to(d)),
}

#: Cases whose torch composite has no op on CPU autocast's float32 list, so the result keeps the input's
#: dtype on CPU (losskit._autocast's except_on=("cpu",)); every other case is float32.
CPU_KEEPS_INPUT_DTYPE = {"mse_loss_weighted", "multilabel_soft_margin_loss"}


def _torch_name(case: str) -> str:
    return next(name for name in ("binary_cross_entropy_with_logits", "binary_cross_entropy", "cross_entropy",
                                  "kl_div", "mse_loss", "multilabel_soft_margin_loss", "nll_loss")
                if case.startswith(name))


def _run(call: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of ``call`` on a ``dtype`` copy of _X under CPU autocast to ``dtype``, and its input gradient."""
    x = _X.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = call(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_matches_torch_under_autocast(case, dtype):
    """torch's result dtype. For a float32 result both cast the same low-precision values to float32 and
    compute in float32, so the values agree to float32's tolerance (else to the input dtype's); the input
    gradient comes back in the input's dtype."""
    name = _torch_name(case)
    ours, grad = _run(lambda x: TORCH_CASES[case](getattr(LF, name), x, dtype), dtype)
    ref, ref_grad = _run(lambda x: TORCH_CASES[case](getattr(F, name), x, dtype), dtype)
    assert ref.dtype == (dtype if case in CPU_KEEPS_INPUT_DTYPE else torch.float32)
    assert ours.dtype == ref.dtype
    assert_close(ours, ref)
    assert grad.dtype == dtype
    assert_close(grad, ref_grad)


#: Losses without a torch counterpart, and the relative whose rule (float32) they follow.
NEW_CASES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "entropy": lambda x: LF.entropy(x, logits=True),  # cross_entropy
    "focal_loss": lambda x: LF.focal_loss(x, _INDEX, _CLASS_WEIGHT.to(x.dtype)),  # cross_entropy
    "rmse_loss": lambda x: LF.rmse_loss(x, _PROB_BF16.to(x.dtype)),  # mse_loss
    "sigmoid_focal_loss": lambda x: LF.sigmoid_focal_loss(x, _PROB_BF16.to(x.dtype), reduction="sum"),  # BCE-w-logits
}


@pytest.mark.parametrize("name", sorted(NEW_CASES))
def test_new_losses_compute_in_float32_under_autocast(name):
    """Under autocast: the float32 computation on the bfloat16 values, gradient in bfloat16."""
    ours, grad = _run(NEW_CASES[name], torch.bfloat16)
    x32 = _X.bfloat16().float().requires_grad_()
    ref = NEW_CASES[name](x32)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x32)
    assert ours.dtype == torch.float32
    assert_close(ours, ref.detach())
    assert grad.dtype == torch.bfloat16
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("name", sorted({_torch_name(c) for c in TORCH_CASES} | set(NEW_CASES)))
def test_autocast_off_keeps_the_input_dtype(name):
    """Without autocast a bfloat16 loss stays bfloat16, as torch's."""
    if name in NEW_CASES:
        call = NEW_CASES[name]
    else:
        case = next(c for c in TORCH_CASES if _torch_name(c) == name)
        call = lambda x: TORCH_CASES[case](getattr(LF, name), x, torch.bfloat16)  # noqa: E731
    assert call(_X.bfloat16().requires_grad_()).dtype == torch.bfloat16


def test_binary_cross_entropy_mixed_dtypes():
    """A float32 target with a bfloat16 input: accepted under autocast (both become float32), as torch
    accepts it; a TypeError naming the target without autocast, where torch raises too."""
    x, t = _PROB.bfloat16(), _PROB
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = LF.binary_cross_entropy(x, t), F.binary_cross_entropy(x, t)
        with pytest.raises(TypeError, match="target"):  # float64 stays float64; torch raises as well
            LF.binary_cross_entropy(x, t.double())
    assert ours.dtype == ref.dtype == torch.float32
    assert_close(ours, ref)
    with pytest.raises(TypeError, match="target"):
        LF.binary_cross_entropy(x, t)


def test_float64_target_is_not_cast():
    """Autocast leaves float64 alone: BCE-with-logits of a bfloat16 input and a float64 target is float64.
    The float32 tolerance: torch takes logsigmoid of the (float32) input in float32, losskit in float64."""
    x, t = _X.bfloat16(), _PROB.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = LF.binary_cross_entropy_with_logits(x, t), F.binary_cross_entropy_with_logits(x, t)
    assert ours.dtype == ref.dtype == torch.float64
    assert_close(ours, ref, dtype=torch.float32)


def test_helper_casts_only_what_autocast_casts():
    lowp, f32, f64 = _X.bfloat16(), _X, _X.double()
    assert float32_under_autocast("cpu", lowp, f32)[0] is lowp  # autocast off: unchanged
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, same32, same64, index, none, other = float32_under_autocast("cpu", lowp, f32, f64, _INDEX, None, 1.5)
        assert cast.dtype == torch.float32 and torch.equal(cast, lowp.float())
        assert same32 is f32 and same64 is f64 and index is _INDEX and none is None and other == 1.5  # no copy
        assert float32_under_autocast("cuda", lowp)[0] is lowp  # autocast is on for cpu only
        assert not enabled("meta") and float32_under_autocast("meta", lowp)[0] is lowp  # no autocast there


def test_float32_input_is_not_copied_under_autocast():
    """A float32 input reaches the kernel as is: the gradient is attached to the input itself (no cast node)."""
    x = _X.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = LF.mse_loss(x, _PROB)
    assert out.dtype == torch.float32
    (grad,) = torch.autograd.grad(out, x)
    assert_close(grad, 2 * (x.detach() - _PROB) / x.numel())


def test_compiled_under_autocast():
    """The autocast test traces (fullgraph), and the compiled loss returns torch's dtype."""
    torch._dynamo.reset()
    compiled = torch.compile(LF.mse_loss, backend="aot_eager", fullgraph=True)
    x = _X.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = compiled(x, _PROB.bfloat16()), F.mse_loss(x, _PROB.bfloat16())
    torch._dynamo.reset()
    assert ours.dtype == ref.dtype == torch.float32
    assert_close(ours, ref)
