"""The benchmark catalogue: each case is a losskit function against its torch reference expression.

A case builds its inputs once per (size, dtype), on the device of the generator it is given, then every
implementation is called on the same tensors. Implementations return the loss (a scalar, or an output
that is back-propagated with the ``grad_output`` input) or, for a floor that is not a loss, the tensors it
computes. The reference is the baseline that speed-up and memory ratios are taken against; a case may add
further baselines. With ``--device cuda`` a case runs at its GPU sizes (``OnCuda``), beside baselines from
optional GPU libraries (Liger-Kernel, Cut Cross-Entropy) where they import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from ._sizes import Size

Inputs = dict[str, Tensor]
Impl = Callable[[Inputs], object]

LOSSKIT = "losskit"
EAGER = "torch eager"
COMPILED = "torch.compile"
#: Floors, not losses: the bytes a fused kernel must move at the copy bandwidth; the three products of a
#: linear head (``_matmul_floor``).
ROOFLINE = "roofline"
MATMUL_FLOOR = "matmul floor"
LIGER = "Liger-Kernel"
CCE = "CCE cce_exact"
GIB = 1 << 30


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (how the CLI, the table and the CSV name dtypes)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Target:
    """An acceptance target of one (size, dtype) on one device. ``faster_than``: implementation -> the least
    speed-up of losskit over it (its time / losskit's); ``within``: floor (ROOFLINE, MATMUL_FLOOR) -> the
    most losskit's time may be over it; peak memory above the inputs at most ``max_peak_over_grad`` times
    the gradient plus ``peak_slack`` bytes. Each part is judged where the run measured it (torch.compile
    with ``--compile``; a library where it is installed)."""

    size: Size
    dtype: torch.dtype
    faster_than: dict[str, float] = field(default_factory=dict)
    within: dict[str, float] = field(default_factory=dict)
    max_peak_over_grad: float | None = None
    peak_slack: int = 0
    device: str = "cpu"


@dataclass(frozen=True)
class FamilyTarget:
    """An acceptance target over several cases at one (size, dtype): the geometric mean of losskit's
    speed-ups over the reference at least ``min_geomean``."""

    name: str
    cases: tuple[str, ...]
    size: Size
    dtype: torch.dtype
    min_geomean: float
    device: str = "cpu"


@dataclass(frozen=True)
class Library:
    """A baseline from an optional package, imported when a unit runs (``load``): ``impl(module)`` is the
    call. Where the package does not import, the table says "not installed"."""

    module: str
    impl: Callable[[ModuleType], Impl]
    #: The call writes into its inputs, so it runs on a copy of its own: Liger-Kernel's cross_entropy
    #: stores the gradient in the logits' memory, which every later call would otherwise read as logits.
    overwrites_inputs: bool = False

    def load(self) -> Impl:
        return self.impl(importlib.import_module(self.module))


@dataclass(frozen=True)
class OnCuda:
    """How a case runs with ``--device cuda``: its GPU sizes, the dtypes it runs unless ``--dtype`` names
    others, and baselines from optional GPU libraries."""

    sizes: tuple[Size, ...]
    dtypes: tuple[torch.dtype, ...]
    libraries: dict[str, Library] = field(default_factory=dict)


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
    #: The dtypes the case runs in on CPU (None: all; a callable: decided on this CPU), and why others are
    #: left out.
    dtypes: tuple[torch.dtype, ...] | Callable[[], tuple[torch.dtype, ...]] | None = None
    dtypes_why: str = ""
    #: GPU sizes and libraries; None: with ``--device cuda`` the case runs only when named, at its CPU sizes.
    cuda: OnCuda | None = None

    def resolve(self) -> Impl:
        """The losskit implementation; ImportError/AttributeError when losskit does not have it (yet)."""
        module = importlib.import_module("losskit.functional")
        getattr(module, self.function)
        return self.losskit(module)


Maker = Callable[..., Tensor]


def _maker(draw: Callable[..., Tensor], transform: Callable[[Tensor], Tensor] | None = None) -> Maker:
    """``(shape, dtype, generator, grad=False) -> tensor``: float32 numbers from ``draw`` on the generator's
    device, transformed, cast to the benchmark's dtype."""
    def make(shape: Size, dtype: torch.dtype, gen: torch.Generator, grad: bool = False) -> Tensor:
        x = draw(shape, generator=gen, device=gen.device)
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
    return torch.randint(c, (n,), generator=gen, device=gen.device)


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


_CPU_LINEAR = (2048, 1024, 32768)


def _linear_cpu_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes linear_cross_entropy runs in on this CPU: float32 and float64, and bfloat16 where the CPU
    multiplies it in hardware (AMX or AVX512-BF16, :func:`losskit.ops.linear_xent.cpu_multiplies_bfloat16`).
    Elsewhere torch emulates bfloat16 GEMMs: eager's three products did not finish in 120 s (float32: 2.5 s)."""
    from ..ops.linear_xent import cpu_multiplies_bfloat16
    return (torch.float32, torch.float64, *((torch.bfloat16,) if cpu_multiplies_bfloat16() else ()))


def _linear_reference(i: Inputs) -> Tensor:
    """Eager as transformers runs it: the logits in the input's dtype, the loss on them in float32."""
    logits = i["input"] @ i["linear_weight"].T
    return F.cross_entropy(logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits, i["target"])


def _matmul_floor(i: Inputs) -> tuple[Tensor, ...]:
    # The three products any implementation does: logits = x W^T (N, V); dx = G W (N, D); dW = G^T x (V, D),
    # with the logits standing in for G. No loss, no autograd: a lower bound on time.
    with torch.no_grad():
        x, w = i["input"], i["linear_weight"]
        logits = x @ w.T
        return logits @ w, logits.T @ x


_SMALL = ((1024, 8192),)  # 32 MiB per float32 tensor: beyond the caches, quick to run

# GPU sizes, with the bytes each moves at best (its roofline, ``_run._ideal_bytes``: every input read once,
# every gradient written once):
# - cross_entropy (N, C) = (8192, 128256), Llama 3's vocabulary: the logits read once and their gradient
#   written once, 2 N C elements (3.9 GiB in bfloat16, 7.8 GiB in float32), plus the N int64 targets;
# - the elementwise losses at 64M elements (8192, 8192): input and target read, gradient written, 3 x 64M
#   elements (768 MiB in float32);
# - linear_cross_entropy (N, D, V) = (8192, 4096, 128256) in bfloat16: x (64 MiB), W (1002 MiB) and the
#   targets read, dx and dW written: 2.1 GiB, under a millisecond of HBM time against three products of
#   2 N D V = 8.6 TFLOP each. Compute-bound: judged against MATMUL_FLOOR, not the roofline.
_CUDA_VOCAB = (8192, 128256)
_CUDA_ELEMENTS = (8192, 8192)
_CUDA_LINEAR = (8192, 4096, 128256)

# Liger-Kernel's functional API, each call with torch's arguments.
_LIGER = "liger_kernel.transformers.functional"
_LIGER_CROSS_ENTROPY = Library(_LIGER, lambda m: lambda i: m.liger_cross_entropy(i["input"], i["target"]),
                               overwrites_inputs=True)
_LIGER_KL_DIV = Library(_LIGER, lambda m: lambda i: m.liger_kl_div(i["input"], i["target"], reduction="batchmean"))
_LIGER_LINEAR = Library(_LIGER, lambda m: lambda i: m.liger_fused_linear_cross_entropy(
    i["input"], i["linear_weight"], i["target"]))
_CCE_EXACT = Library("cut_cross_entropy", lambda m: lambda i: m.linear_cross_entropy(
    i["input"], i["linear_weight"], i["target"], impl="cce_exact"))


def _elementwise_on_cuda(libraries: dict[str, Library] | None = None) -> dict[str, object]:
    """An elementwise loss on the GPU: 64M elements, float32 unless --dtype says otherwise (each dtype is one
    more torch.compile per loss, and benchmarks/gpu_bench.sh runs every case in 5 minutes), within 1.3x
    its roofline in either dtype."""
    return {"cuda": OnCuda((_CUDA_ELEMENTS,), (torch.float32,), libraries or {}),
            "targets": tuple(Target(_CUDA_ELEMENTS, dtype, within={ROOFLINE: 1.3}, device="cuda")
                             for dtype in (torch.float32, torch.bfloat16))}


CASES: tuple[Case, ...] = (
    Case("cross_entropy", ("N", "C"), ((4096, 32768),), _index_inputs(_logits),
         **_same_as_torch("cross_entropy", "input", "target"),
         cuda=OnCuda((_CUDA_VOCAB,), (torch.bfloat16, torch.float32), {LIGER: _LIGER_CROSS_ENTROPY}),
         targets=(Target((4096, 32768), torch.float32, faster_than={EAGER: 6.0, COMPILED: 3.0},
                         within={ROOFLINE: 1.5}, max_peak_over_grad=1.10),
                  *(Target(_CUDA_VOCAB, dtype, faster_than={COMPILED: 1.0, LIGER: 1.0}, within={ROOFLINE: 1.25},
                           device="cuda") for dtype in (torch.bfloat16, torch.float32)))),
    Case("cross_entropy_probs", ("N", "C"), _SMALL, _pair_inputs(_logits, _probs),
         **_same_as_torch("cross_entropy", "input", "target")),
    Case("nll_loss", ("N", "C"), _SMALL, _index_inputs(_log_probs), **_same_as_torch("nll_loss", "input", "target")),
    Case("focal_loss", ("N", "C"), _SMALL, _index_inputs(_logits), function="focal_loss",
         losskit=lambda m: lambda i: m.focal_loss(i["input"], i["target"], gamma=2.0),
         reference=_focal_reference, reference_text="(-(1 - logp_y.exp()) ** 2 * logp_y).mean(), "
         "logp_y = F.log_softmax(input, 1).gather(1, target[:, None])"),
    Case("binary_cross_entropy", ("N", "C"), _SMALL, _pair_inputs(_sigmoid, _uniform),
         **_same_as_torch("binary_cross_entropy", "input", "target"), **_elementwise_on_cuda()),
    Case("binary_cross_entropy_with_logits", ("N", "C"), _SMALL, _pair_inputs(_logits, _uniform),
         **_same_as_torch("binary_cross_entropy_with_logits", "input", "target"), **_elementwise_on_cuda()),
    Case("multilabel_soft_margin_loss", ("N", "C"), _SMALL, _pair_inputs(_logits, _binary),
         **_same_as_torch("multilabel_soft_margin_loss", "input", "target"), **_elementwise_on_cuda()),
    Case("sigmoid_focal_loss", ("N", "C"), _SMALL, _pair_inputs(_logits, _binary), function="sigmoid_focal_loss",
         losskit=lambda m: lambda i: m.sigmoid_focal_loss(i["input"], i["target"], alpha=0.25, gamma=2.0,
                                                          reduction="mean"),
         reference=_sigmoid_focal_reference,
         reference_text="torchvision.ops.sigmoid_focal_loss(input, target, reduction='mean') in torch ops",
         **_elementwise_on_cuda()),
    Case("kl_div", ("N", "C"), _SMALL, _pair_inputs(_log_probs, _probs),
         **_same_as_torch("kl_div", "input", "target", reduction="batchmean"),
         **_elementwise_on_cuda({LIGER: _LIGER_KL_DIV})),
    Case("entropy", ("N", "C"), _SMALL, lambda s, d, g: {"input": _probs(s, d, g, True)}, function="entropy",
         losskit=lambda m: lambda i: m.entropy(i["input"]).mean(), reference=_entropy_reference,
         reference_text="(-(p * p.log())).sum(-1).mean()"),
    Case("mse_loss", ("N", "C"), _SMALL, _pair_inputs(_logits, _uniform),
         **_same_as_torch("mse_loss", "input", "target"), **_elementwise_on_cuda()),
    Case("rmse_loss", ("N", "C"), _SMALL, _pair_inputs(_logits, _uniform), function="rmse_loss",
         losskit=lambda m: lambda i: m.rmse_loss(i["input"], i["target"]),
         reference=lambda i: torch.sqrt(F.mse_loss(i["input"], i["target"])),
         reference_text="torch.sqrt(F.mse_loss(input, target))", **_elementwise_on_cuda()),
    Case("softmax", ("N", "C"), _SMALL, _with_grad_output, **_same_as_torch("softmax", "input", dim=-1)),
    Case("log_softmax", ("N", "C"), _SMALL, _with_grad_output, **_same_as_torch("log_softmax", "input", dim=-1)),
    Case("linear_cross_entropy", ("N", "D", "V"), (_CPU_LINEAR,), _linear_inputs,
         function="linear_cross_entropy",
         losskit=lambda m: lambda i: m.linear_cross_entropy(i["input"], i["linear_weight"], i["target"]),
         reference=_linear_reference,
         reference_text="F.cross_entropy((input @ linear_weight.T).float(), target) (float64: no cast)",
         baselines={name: impl for name, impl in (("torch chunked", _linear_torch_chunked()),
                                                   (MATMUL_FLOOR, _matmul_floor)) if impl is not None},
         dtypes=_linear_cpu_dtypes,
         dtypes_why="16-bit products run natively only in bfloat16 on CPUs with AMX or AVX512-BF16 (not this "
                    "one, or not this dtype): elsewhere eager's 16-bit GEMMs take minutes at this size (its three "
                    "bfloat16 products did not finish in 120 s on an AVX2 EPYC)",
         cuda=OnCuda((_CUDA_LINEAR,), (torch.bfloat16,), {LIGER: _LIGER_LINEAR, CCE: _CCE_EXACT}),
         # The bfloat16 linear-CE issue: the three products' time and the gradients' memory are the floor.
         # On the CPU: float32 within 1.05x of its products; bfloat16 (where the CPU multiplies it) 1.5x
         # faster than eager, within 1.3x of its products, the gradients + 64 MiB.
         targets=(Target(_CPU_LINEAR, torch.float32, within={MATMUL_FLOOR: 1.05}),
                  Target(_CPU_LINEAR, torch.bfloat16, faster_than={EAGER: 1.5}, within={MATMUL_FLOOR: 1.3},
                         max_peak_over_grad=1.0, peak_slack=64 << 20),
                  Target(_CUDA_LINEAR, torch.bfloat16, faster_than={LIGER: 1.0, CCE: 1.0},
                         within={MATMUL_FLOOR: 1.15}, max_peak_over_grad=1.0, peak_slack=GIB, device="cuda"),)),
)

BY_NAME: dict[str, Case] = {case.name: case for case in CASES}

#: The elementwise family at 8M elements on CPU: forward+backward, geometric mean of the speed-ups over torch eager.
FAMILY_TARGETS: tuple[FamilyTarget, ...] = (
    FamilyTarget("elementwise", ("binary_cross_entropy", "binary_cross_entropy_with_logits",
                                 "multilabel_soft_margin_loss", "sigmoid_focal_loss", "mse_loss", "rmse_loss"),
                 (1024, 8192), torch.float32, min_geomean=2.0),
)
