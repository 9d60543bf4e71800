"""The benchmark catalogue: each case is a losskit function against its torch reference expression.

A case builds its inputs once per (size, dtype), then every implementation is called on the same
tensors. Implementations return the loss (a scalar, or an output that is back-propagated with the
``grad_output`` input) or, for a floor that is not a loss, the tensors it computes. The reference is
the baseline that speed-up and memory ratios are taken against; a case may add further baselines.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ._sizes import Size

Inputs = dict[str, Tensor]
Impl = Callable[[Inputs], object]

LOSSKIT = "losskit"
EAGER = "torch eager"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (how the CLI, the table and the CSV name dtypes)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Target:
    """An acceptance target of one (size, dtype): losskit's speed-up over the reference at least
    ``min_speedup``, its peak memory above inputs at most ``max_peak_over_grad`` times the gradient; and
    where given, at least ``min_speedup_compiled`` over torch.compile(reference) (judged when the run has
    ``--compile``) and at most ``max_over_roofline`` times the roofline."""

    size: Size
    dtype: torch.dtype
    min_speedup: float
    max_peak_over_grad: float
    min_speedup_compiled: float | None = None
    max_over_roofline: float | None = None


@dataclass(frozen=True)
class FamilyTarget:
    """An acceptance target over several cases at one (size, dtype): the geometric mean of losskit's
    speed-ups over the reference at least ``min_geomean``."""

    name: str
    cases: tuple[str, ...]
    size: Size
    dtype: torch.dtype
    min_geomean: float


@dataclass(frozen=True)
class Case:
    name: str
    #: Names of the size's extents, e.g. ("N", "C").
    dims: tuple[str, ...]
    sizes: tuple[Size, ...]
    #: (size, dtype, generator) -> inputs; tensors that require grad are the ones differentiated.
    make: Callable[[Size, torch.dtype, torch.Generator], Inputs]
    #: The losskit call, given the losskit.functional module.
    losskit: Callable[[object], Impl]
    #: Name of the function in losskit.functional the case needs.
    function: str
    reference: Impl
    #: The reference as one line of code, shown by ``losskit bench --list``.
    reference_text: str
    #: Further baselines, name -> implementation (one this torch lacks is left out).
    baselines: dict[str, Impl] = field(default_factory=dict)
    targets: tuple[Target, ...] = ()
    #: The dtypes the case runs in (None: all), and why others are left out.
    dtypes: tuple[torch.dtype, ...] | None = None
    dtypes_why: str = ""

    def resolve(self) -> Impl:
        """The losskit implementation; ImportError/AttributeError when losskit does not have it (yet)."""
        module = importlib.import_module("losskit.functional")
        getattr(module, self.function)
        return self.losskit(module)


Maker = Callable[..., Tensor]


def _maker(draw: Callable[..., Tensor], transform: Callable[[Tensor], Tensor] | None = None) -> Maker:
    """``(shape, dtype, generator, grad=False) -> tensor``: float32 numbers from ``draw``, transformed,
    cast to the benchmark's dtype."""
    def make(shape: Size, dtype: torch.dtype, gen: torch.Generator, grad: bool = False) -> Tensor:
        x = draw(shape, generator=gen)
        return (x if transform is None else transform(x)).to(dtype).requires_grad_(grad)
    return make


_logits = _maker(torch.randn)
_uniform = _maker(torch.rand)
_binary = _maker(torch.rand, lambda x: (x < 0.5).float())
_sigmoid = _maker(torch.randn, torch.sigmoid)
_probs = _maker(torch.randn, lambda x: x.softmax(-1))
_log_probs = _maker(torch.randn, lambda x: x.log_softmax(-1))
_head = _maker(torch.randn, lambda w: w / w.shape[-1] ** 0.5)  # (V, D) weights of std 1/sqrt(D): O(1) logits


def _classes(n: int, c: int, gen: torch.Generator) -> Tensor:
    return torch.randint(c, (n,), generator=gen)


def _index_inputs(input_maker: Maker) -> Callable[[Size, torch.dtype, torch.Generator], Inputs]:
    def make(size: Size, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
        n, c = size
        return {"input": input_maker((n, c), dtype, gen, True), "target": _classes(n, c, gen)}
    return make


def _pair_inputs(input_maker: Maker, target_maker: Maker) -> Callable[[Size, torch.dtype, torch.Generator], Inputs]:
    def make(size: Size, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
        return {"input": input_maker(size, dtype, gen, True), "target": target_maker(size, dtype, gen)}
    return make


def _with_grad_output(size: Size, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    # A non-scalar output (softmax) is back-propagated with a fixed upstream gradient of its shape.
    return {"input": _logits(size, dtype, gen, True), "grad_output": _logits(size, dtype, gen)}


def _same_as_torch(name: str, *keys: str, **kwargs: object) -> dict[str, object]:
    """A case whose losskit function has torch's name and arguments: the reference is ``F.<name>``."""
    def call(module: object) -> Impl:
        return lambda i: getattr(module, name)(*(i[k] for k in keys), **kwargs)
    options = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return {"function": name, "losskit": call, "reference": call(F),
            "reference_text": f"F.{name}({', '.join(keys)}{options})"}


def _focal_reference(i: Inputs) -> Tensor:
    # -(1 - p_y)^gamma log p_y averaged over rows, in the input's dtype (no float64 anywhere).
    logp = F.log_softmax(i["input"], dim=1).gather(1, i["target"][:, None]).squeeze(1)
    return (-(1 - logp.exp()) ** 2.0 * logp).mean()


def _sigmoid_focal_reference(i: Inputs) -> Tensor:
    # torchvision.ops.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2, reduction="mean"), in torch ops.
    x, t = i["input"], i["target"]
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = 0.25 * t + 0.75 * (1 - t)
    return (alpha_t * ce * (1 - p_t) ** 2.0).mean()


def _entropy_reference(i: Inputs) -> Tensor:
    p = i["input"]
    return (-(p * p.log())).sum(-1).mean()


def _linear_inputs(size: Size, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    n, d, v = size
    return {"input": _logits((n, d), dtype, gen, True), "linear_weight": _head((v, d), dtype, gen, True),
            "target": _classes(n, v, gen)}


def _linear_torch_chunked() -> Impl | None:
    """torch's own chunked ``F.linear_cross_entropy`` (torch >= 2.13), None when this torch lacks it."""
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is None or not hasattr(F, "linear_cross_entropy"):
        return None
    return lambda i: F.linear_cross_entropy(i["input"], i["linear_weight"], i["target"], options=options())


def _matmul_floor(i: Inputs) -> tuple[Tensor, ...]:
    # The three products any implementation does: logits = x W^T (N, V); dx = G W (N, D); dW = G^T x (V, D),
    # with the logits standing in for G. No loss, no autograd: a lower bound on time.
    with torch.no_grad():
        x, w = i["input"], i["linear_weight"]
        logits = x @ w.T
        return logits @ w, logits.T @ x


_SMALL = ((1024, 8192),)  # 32 MiB per float32 tensor: beyond the caches, quick to run

CASES: tuple[Case, ...] = (
    Case("cross_entropy", ("N", "C"), ((4096, 32768),), _index_inputs(_logits),
         **_same_as_torch("cross_entropy", "input", "target"),
         targets=(Target((4096, 32768), torch.float32, min_speedup=6.0, max_peak_over_grad=1.10,
                         min_speedup_compiled=3.0, max_over_roofline=1.5),)),
    Case("cross_entropy_probs", ("N", "C"), _SMALL, _pair_inputs(_logits, _probs),
         **_same_as_torch("cross_entropy", "input", "target")),
    Case("nll_loss", ("N", "C"), _SMALL, _index_inputs(_log_probs), **_same_as_torch("nll_loss", "input", "target")),
    Case("focal_loss", ("N", "C"), _SMALL, _index_inputs(_logits), function="focal_loss",
         losskit=lambda m: lambda i: m.focal_loss(i["input"], i["target"], gamma=2.0),
         reference=_focal_reference, reference_text="(-(1 - logp_y.exp()) ** 2 * logp_y).mean(), "
         "logp_y = F.log_softmax(input, 1).gather(1, target[:, None])"),
    Case("binary_cross_entropy", ("N", "C"), _SMALL, _pair_inputs(_sigmoid, _uniform),
         **_same_as_torch("binary_cross_entropy", "input", "target")),
    Case("binary_cross_entropy_with_logits", ("N", "C"), _SMALL, _pair_inputs(_logits, _uniform),
         **_same_as_torch("binary_cross_entropy_with_logits", "input", "target")),
    Case("multilabel_soft_margin_loss", ("N", "C"), _SMALL, _pair_inputs(_logits, _binary),
         **_same_as_torch("multilabel_soft_margin_loss", "input", "target")),
    Case("sigmoid_focal_loss", ("N", "C"), _SMALL, _pair_inputs(_logits, _binary), function="sigmoid_focal_loss",
         losskit=lambda m: lambda i: m.sigmoid_focal_loss(i["input"], i["target"], alpha=0.25, gamma=2.0,
                                                          reduction="mean"),
         reference=_sigmoid_focal_reference,
         reference_text="torchvision.ops.sigmoid_focal_loss(input, target, reduction='mean') in torch ops"),
    Case("kl_div", ("N", "C"), _SMALL, _pair_inputs(_log_probs, _probs),
         **_same_as_torch("kl_div", "input", "target", reduction="batchmean")),
    Case("entropy", ("N", "C"), _SMALL, lambda s, d, g: {"input": _probs(s, d, g, True)}, function="entropy",
         losskit=lambda m: lambda i: m.entropy(i["input"]).mean(), reference=_entropy_reference,
         reference_text="(-(p * p.log())).sum(-1).mean()"),
    Case("mse_loss", ("N", "C"), _SMALL, _pair_inputs(_logits, _uniform),
         **_same_as_torch("mse_loss", "input", "target")),
    Case("rmse_loss", ("N", "C"), _SMALL, _pair_inputs(_logits, _uniform), function="rmse_loss",
         losskit=lambda m: lambda i: m.rmse_loss(i["input"], i["target"]),
         reference=lambda i: torch.sqrt(F.mse_loss(i["input"], i["target"])),
         reference_text="torch.sqrt(F.mse_loss(input, target))"),
    Case("softmax", ("N", "C"), _SMALL, _with_grad_output, **_same_as_torch("softmax", "input", dim=-1)),
    Case("log_softmax", ("N", "C"), _SMALL, _with_grad_output, **_same_as_torch("log_softmax", "input", dim=-1)),
    Case("linear_cross_entropy", ("N", "D", "V"), ((2048, 1024, 32768),), _linear_inputs,
         function="linear_cross_entropy",
         losskit=lambda m: lambda i: m.linear_cross_entropy(i["input"], i["linear_weight"], i["target"]),
         reference=lambda i: F.cross_entropy(i["input"] @ i["linear_weight"].T, i["target"]),
         reference_text="F.cross_entropy(input @ linear_weight.T, target)",
         baselines={name: impl for name, impl in (("torch chunked", _linear_torch_chunked()),
                                                   ("matmul floor", _matmul_floor)) if impl is not None},
         # Measured here: eager's three bfloat16 products of the default size did not finish in 120 s
         # (float32: 2.5 s); torch's CPU GEMM has no fast 16-bit path without AVX512-BF16/AMX.
         dtypes=(torch.float32, torch.float64),
         dtypes_why="torch's 16-bit CPU matmul is minutes per call without AVX512-BF16/AMX"),
)

BY_NAME: dict[str, Case] = {case.name: case for case in CASES}

#: The elementwise family at 8M elements: forward+backward, geometric mean of the speed-ups over torch eager.
FAMILY_TARGETS: tuple[FamilyTarget, ...] = (
    FamilyTarget("elementwise", ("binary_cross_entropy", "binary_cross_entropy_with_logits",
                                 "multilabel_soft_margin_loss", "sigmoid_focal_loss", "mse_loss", "rmse_loss"),
                 (1024, 8192), torch.float32, min_geomean=2.0),
)
