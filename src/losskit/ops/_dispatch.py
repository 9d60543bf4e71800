"""The one place that chooses who computes a fused operation: ``(operation, device, impl) -> backend``.

Backends, each a sub-package of :mod:`losskit.ops` that reads on its own:

* ``"cpu"``: the C extension (:mod:`losskit.ops.cpu`), CPU tensors;
* ``"triton"``: the Triton kernels (:mod:`losskit.ops.triton`), CUDA tensors, or CPU tensors through
  Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the first import of triton (how the
  test suite runs them);
* ``"reference"``: the block-wise pure-torch path (:mod:`losskit.ops.reference`), any device: the oracle
  of the tests, lean in memory (nothing input-sized but the gradient), but many small ops on a large
  input;
* ``"composite"``: torch's own loss, or a short composite of torch ops where torch has none
  (:mod:`losskit.ops.composite`), any device, a number of ops per call that does not grow with the size.

``impl`` chooses among them:

* ``"auto"``: the fastest for the tensors' device: ``"cpu"`` on CPU when the extension is built,
  ``"triton"`` on CUDA when triton imports and the dtype is one its kernels take (float32, bfloat16,
  float16); ``"composite"`` anywhere else (MPS, CUDA without triton, float64 on CUDA, a CPU build without
  the extension), inside a torch.func transform (vmap, grad: their wrapped tensors have no data pointer
  for a kernel), and while torch.compile traces (the compiler fuses torch's own loss; the kernels are
  reached under compile through their custom ops with an explicit ``impl``, see :mod:`losskit.ops._library`);
* ``"compiled"``: the compiled kernels of the device, the C extension on CPU and Triton on CUDA; an
  ImportError saying how to get them when absent, a ValueError on other devices;
* ``"triton"``: the Triton kernels explicitly, on CUDA, or on CPU under ``TRITON_INTERPRET=1``;
* ``"torch"``: the reference.

:func:`kernel` then maps ``(operation, backend)`` to the function that computes it: every backend of an
operation takes the same arguments (the C wrapper's). No functional names a backend; it calls a driver
of :mod:`losskit.ops`, which asks here.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from .._types import IMPLS
from .cpu import native

CPU, TRITON, REFERENCE, COMPOSITE = "cpu", "triton", "reference", "composite"

#: operation -> {backend: "module:function"} (modules relative to losskit.ops). The C extension module
#: each CPU entry needs is the third field. An operation absent from a backend's column runs elsewhere:
#: "auto" picks the composite, an explicit impl is a ValueError.
_TABLE: dict[str, dict[str, str]] = {
    "xent_rows": {CPU: "cpu.native:xent_rows:_native", TRITON: "triton.xent:xent_rows",
                  REFERENCE: "reference.rows:xent_rows"},
    "nll_rows": {CPU: "cpu.native_softmax:nll_rows:_native_softmax", TRITON: "triton.xent:nll_rows",
                 REFERENCE: "reference.rows:nll_rows"},
    "softmax_rows": {CPU: "cpu.native_softmax:softmax_rows:_native_softmax", TRITON: "triton.softmax:softmax_rows"},
    "softmax_backward_rows": {CPU: "cpu.native_softmax:softmax_backward_rows:_native_softmax",
                              TRITON: "triton.softmax:softmax_backward_rows"},
    "entropy_rows": {CPU: "cpu.native_softmax:entropy_rows:_native_softmax", TRITON: "triton.softmax:entropy_rows",
                     REFERENCE: "reference.softmax:entropy_rows"},
    "binary": {CPU: "cpu.native_binary:binary_runner:_native_binary", TRITON: "triton.elementwise:binary_runner",
               REFERENCE: "reference.elementwise:runner"},
    "pointwise": {CPU: "cpu.native_pointwise:pointwise_runner:_native_pointwise",
                  TRITON: "triton.elementwise:pointwise_runner", REFERENCE: "reference.elementwise:runner"},
    "shard_stats": {TRITON: "triton.shard:shard_stats"},
    "shard_grad": {TRITON: "triton.shard:shard_grad"},
}

#: Integer targets the kernels convert as they read them (the losses that take them: mse_loss,
#: multilabel_soft_margin_loss); class indices are int64 by then.
_INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
#: Storage dtypes the Triton kernels take (they compute in float32).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16, *_INTEGERS)
#: Storage dtypes the C kernels take.
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, *_INTEGERS)

#: The oldest triton the kernels build with. 3.6 fails on them (its frontend rejects some of their
#: constexpr branches and helper calls, in the interpreter and for sm_90 alike), and a CUDA build of
#: an older torch may ship it: such a triton counts as absent, so "auto" runs the composite there.
MIN_TRITON = (3, 8)

_triton: list[ImportError | None] = []


def triton_error() -> ImportError | None:
    """None when a triton the kernels build with imports, else the ImportError (checked once, on first use)."""
    if not _triton:
        try:
            version = importlib.import_module("triton").__version__
        except ImportError as err:
            _triton.append(err)
        else:
            found = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
            too_old = found < MIN_TRITON
            _triton.append(ImportError(f"triton {version} is older than {'.'.join(map(str, MIN_TRITON))}, the "
                                       "oldest the kernels build with") if too_old else None)
    return _triton[0]


#: The oldest CUDA architectures the kernels are for: Turing (7.5) for float32 and float16, Ampere (8.0)
#: for bfloat16, which older GPUs have no instructions for (triton 3.8 targets 7.5 and newer).
MIN_CAPABILITY = (7, 5)
MIN_CAPABILITY_BFLOAT16 = (8, 0)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def gpu_runs_triton(device: torch.device, dtypes: list[torch.dtype]) -> bool:
    """Whether the Triton kernels are for the GPU ``device`` in ``dtypes`` (its capability, read once)."""
    need = MIN_CAPABILITY_BFLOAT16 if torch.bfloat16 in dtypes else MIN_CAPABILITY
    return _capability(device) >= need


def triton_interpreted() -> bool:
    """Whether Triton kernels run on CPU tensors here: ``TRITON_INTERPRET=1``, read as triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _cpu_extension(op: str) -> str:
    return _TABLE[op][CPU].split(":")[2]


def _dtypes(tensors: list[Tensor]) -> list[torch.dtype]:
    return [t.dtype for t in tensors if t.dtype != torch.bool]


def backend(op: str, impl: object, *tensors: Tensor | None) -> str:
    """The backend that computes ``op`` for ``impl`` on ``tensors`` (already validated to share a device)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return REFERENCE
    present = [t for t in tensors if t is not None]
    device = present[0].device.type if present else "cpu"
    dtypes = _dtypes(present)
    if impl == "auto":
        if torch.compiler.is_compiling() or any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in present):
            return COMPOSITE
        if device == "cpu" and CPU in _TABLE[op] and all(d in CPU_DTYPES for d in dtypes):
            return CPU if native.available(_cpu_extension(op)) else COMPOSITE
        if device == "cuda" and TRITON in _TABLE[op] and all(d in TRITON_DTYPES for d in dtypes):
            return TRITON if triton_error() is None and gpu_runs_triton(present[0].device, dtypes) else COMPOSITE
        return COMPOSITE
    if impl == "compiled":
        if device == "cpu":
            if CPU not in _TABLE[op]:
                raise ValueError(f"impl='compiled': no C kernel computes {op}; use impl='auto' or impl='torch'")
            if not torch.compiler.is_compiling():  # (an import: dynamo cannot trace it; eager calls run first)
                native.module(_cpu_extension(op))  # ImportError saying how to build it
            _dtypes_taken(impl, dtypes, CPU_DTYPES)
            return CPU
        if device == "cuda":
            return _triton_backend(op, impl, dtypes)
        raise ValueError(f"impl='compiled' runs on CPU tensors (the C kernels) and CUDA tensors (Triton), got "
                         f"tensors on {device}; use impl='auto' or impl='torch'")
    # impl == "triton"
    if device != "cuda" and not (device == "cpu" and triton_interpreted()):
        raise ValueError(f"impl='triton' runs on CUDA tensors, or on CPU tensors under Triton's interpreter "
                         f"(TRITON_INTERPRET=1 set before triton is imported); got tensors on {device}")
    return _triton_backend(op, impl, dtypes)


def _triton_backend(op: str, impl: str, dtypes: list[torch.dtype]) -> str:
    err = None if torch.compiler.is_compiling() else triton_error()
    if err is not None:
        raise ImportError(f"impl={impl!r} on this device needs triton {'.'.join(map(str, MIN_TRITON))} or newer, "
                          f"which is not available ({err}); `pip install 'triton>="
                          f"{'.'.join(map(str, MIN_TRITON))}'` (CUDA builds of torch ship it), or use impl='torch'")
    if TRITON not in _TABLE[op]:
        raise ValueError(f"impl={impl!r}: no Triton kernel computes {op}; use impl='auto' or impl='torch'")
    _dtypes_taken(impl, dtypes, TRITON_DTYPES)
    return TRITON


def _dtypes_taken(impl: str, dtypes: list[torch.dtype], taken: tuple[torch.dtype, ...]) -> None:
    refused = sorted({str(d) for d in dtypes if d not in taken})
    if refused:
        raise ValueError(f"impl={impl!r} does not take {', '.join(refused)} on this device (it takes "
                         f"{', '.join(map(str, taken))}); use impl='auto' or impl='torch'")


def kernel(op: str, name: str) -> Callable:
    """The function of backend ``name`` (``"cpu"``, ``"triton"`` or ``"reference"``) that computes ``op``.

    While torch.compile traces, a kernel's custom op that wraps it (:mod:`losskit.ops._library`), which the
    compiler sees as one opaque call with a fake implementation instead of a graph break.
    """
    if name in (CPU, TRITON) and torch.compiler.is_compiling():
        return _library.custom_op(op, name)
    return plain(op, name)


def plain(op: str, name: str) -> Callable:
    """The function of backend ``name`` that computes ``op``, never its custom op (what the custom op runs)."""
    module, function = _TABLE[op][name].split(":")[:2]
    return getattr(_module(module), function)  # looked up at each call: tests may replace a kernel


@functools.cache
def _module(name: str) -> ModuleType:
    """``losskit.ops.<name>``, imported on first use (the Triton modules import triton)."""
    return importlib.import_module(f"losskit.ops.{name}")


from . import _library  # noqa: E402  (registers the custom ops; it reads _TABLE above)
