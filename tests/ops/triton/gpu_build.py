"""Build every Triton kernel launch of :mod:`losskit.ops.triton` for an H100 (sm_90), without a GPU.

Run as a script by ``test_gpu_build.py``, in a process whose environment has no ``TRITON_INTERPRET``
(``triton.jit`` picks the interpreter when a kernel is defined, so the kernels must be imported fresh
here). It replaces ``JITFunction.run`` by a recorder, calls each public wrapper on meta tensors of real
GPU sizes (a wrapper only reads shapes, strides and dtypes; a meta tensor of 32768 x 128256 costs
nothing), specialises each recorded launch with triton's own binder for a CUDA target (ints equal to 1
and None become constexprs; ints, and pointers at a 16-byte offset from an aligned allocation, get
``tt.divisibility 16``), compiles each distinct specialisation with ``triton.compile(..., target=
GPUTarget("cuda", 90, 32))`` and reads registers and spill stores from the ``ptxas -v`` log of that
build. It prints one JSON document: the ``*_kernel`` functions the modules define, and per build the
kernel, the calls it stands for, their grids, num_warps, registers, spill stores and shared memory, or
the error.

``CASES`` are the calls: every wrapper; every option that changes a constexpr (index or probability
targets, smoothing, focal, class weights, gradients on and off, a scale given as a float or as a 0-dim
tensor, each elementwise kind and reduction mode, both shard passes); the geometries that choose the
tile (rows of one block and of several, L == 1 and L > 1); bfloat16 and float32. Not their full product:
a build takes a third of a second here and the test has a minute, so the heaviest combination of each
family (the most registers) runs on every geometry, and the lighter ones on one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from losskit.ops.reference.elementwise import KL_LOG, KL_PROB, MSE

#: What an H100 compiles for: compute capability 9.0, 32 threads a warp.
ARCH = 90
bf16, f32 = torch.bfloat16, torch.float32
IGNORE = -100


def meta(*shape: int, dtype: torch.dtype = f32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


# ---- the calls ------------------------------------------------------------------------------------

def xent(n: int, c: int, length: int, dtype: torch.dtype, *, prob: bool = False, grad: bool = True,
         tgrad: bool = False, weight: bool = False, smoothing: float = 0.0, gamma: float = 0.0,
         scale_tensor: bool = False, transposed: bool = False) -> None:
    """``xent_rows`` as the cross-entropy driver calls it: contiguous (N, C, L) logits (``transposed``: an
    (N, C) view of a (C, N) tensor, classes strided), the gradient into its own tensor."""
    from losskit.ops.triton.xent import xent_rows
    x = meta(c, n, dtype=dtype).t().unsqueeze(2) if transposed else meta(n, c, length, dtype=dtype)
    target = meta(n, c, length) if prob else meta(n * length, dtype=torch.int64)
    xent_rows(x, target, meta(n, c, length, dtype=dtype) if grad else None, meta(n, c, length) if tgrad else None,
              meta(c) if weight else None, meta(n, length), ignore_index=IGNORE, label_smoothing=smoothing,
              gamma=gamma, scale=meta() if scale_tensor else 1.0 / n)


def nll(n: int, c: int, length: int, dtype: torch.dtype, *, grad: bool = True, weight: bool = False,
        scale_tensor: bool = False) -> None:
    from losskit.ops.triton.xent import nll_rows
    nll_rows(meta(n, c, length, dtype=dtype), meta(n * length, dtype=torch.int64),
             meta(n, c, length, dtype=dtype) if grad else None, meta(c) if weight else None, meta(n, length),
             ignore_index=IGNORE, scale=meta() if scale_tensor else 1.0 / n)


def softmax(n: int, c: int, length: int, dtype: torch.dtype, *, log: bool, out_dtype: torch.dtype | None = None,
            backward: bool = False) -> None:
    """softmax / log_softmax forward (output in ``out_dtype``, default the input's) or backward."""
    from losskit.ops.triton.softmax import softmax_backward_rows, softmax_rows
    x, out = meta(n, c, length, dtype=dtype), meta(n, c, length, dtype=out_dtype or dtype)
    if backward:
        softmax_backward_rows(x, meta(n, c, length, dtype=dtype), out, log=log)
    else:
        softmax_rows(x, out, log=log)


def entropy(n: int, c: int, length: int, dtype: torch.dtype, *, logits: bool, grad: bool = True) -> None:
    from losskit.ops.triton.softmax import entropy_rows
    entropy_rows(meta(n, c, length, dtype=dtype), meta(n, length), meta(n, c, length, dtype=dtype) if grad else None,
                 logits=logits)


#: Elementwise reductions: "none" keeps the loss; "mean" sums per tile; "rows" sums each row (the
#: multilabel soft margin's "none").
KEEP = {"none": (True, False), "mean": (False, False), "rows": (True, True)}


#: Constant operands each runner kind takes after input and target (weight, then pos_weight).
CONSTANTS = {"bce": 1, "logits": 2, "soft_margin": 1, "focal": 0, MSE: 1, KL_PROB: 0, KL_LOG: 0}


def elementwise(kind: str | int, shape: tuple[int, ...], dtype: torch.dtype, *, reduction: str = "mean",
                weight: tuple[int, ...] | None = None, pos_weight: tuple[int, ...] | None = None,
                alpha: float = 0.0, gamma: float = 0.0, target_dtype: torch.dtype | None = None,
                grads: str = "x", scale_tensor: bool = False) -> None:
    """A binary (``kind`` a string) or pointwise runner over an input of ``shape``; ``weight`` and
    ``pos_weight``: the shapes they broadcast from; ``grads``: which gradients ("", "x", "xy")."""
    from losskit.ops.triton.elementwise import binary_runner, pointwise_runner
    runner = binary_runner(kind, alpha=alpha, gamma=gamma) if isinstance(kind, str) else pointwise_runner(kind)
    constants = [None if s is None else meta(*s, dtype=dtype) for s in (weight, pos_weight)][:CONSTANTS[kind]]
    operands = [meta(*shape, dtype=dtype), meta(*shape, dtype=target_dtype or dtype), *constants]
    keep, rows = KEEP[reduction]
    # kernel=None: the runner's reference expression, which the Triton runner does not call
    runner(None, operands, ["x" in grads, "y" in grads] + [False] * len(constants), acc=f32, out_dtype=dtype,
           keep=keep, grad_scale=meta() if scale_tensor else 0.5, sum_last_dim=rows)


def shard(n: int, v: int, length: int, dtype: torch.dtype, *, smoothing: bool, weight: bool) -> None:
    """Both passes of the vocab-parallel cross-entropy on a rank's ``(N, V_r, L)`` logits."""
    from losskit.ops.triton.shard import shard_grad, shard_stats
    x, w = meta(n, v, length, dtype=dtype), meta(v) if weight else None
    safe, owned = meta(n, length, dtype=torch.int64), meta(n, length, dtype=torch.bool)
    shard_stats(x, safe, owned, w, meta(n, length), meta(3 if smoothing else 2, n, length), smoothing=smoothing)
    shard_grad(x, meta(n, length), meta(n, length), meta(n, length), meta(n, length) if smoothing else None, safe,
               owned, w, meta(n, v, length, dtype=dtype))


@dataclass(frozen=True)
class Case:
    """One wrapper call: ``call(*args, **kwargs)``, printed as such (the test's id)."""

    call: Callable[..., None]
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def __str__(self) -> str:
        args = [repr(a).removeprefix("torch.") for a in self.args]
        return f"{self.call.__name__}({', '.join(args + [f'{k}={v!r}' for k, v in self.kwargs.items()])})"


#: Row geometries (N, C, L) that choose the tile: an LM head's rows (one per program, in 32 blocks of
#: 4096), 1000 classes (a few rows of one block), 10 classes (128 rows per program), segmentation (L = 512 *
#: 512: 32 classes of 128 adjacent positions) and 1000 classes over 7 x 7 positions (blocks of classes).
LM, ROWS_1000, ROWS_10, SEGMENT, GRID_7X7 = ((32768, 128256, 1), (32768, 1000, 1), (32768, 10, 1),
                                             (8, 19, 512 * 512), (256, 1000, 49))
GEOMETRIES = (LM, ROWS_1000, ROWS_10, SEGMENT, GRID_7X7)


def _cases() -> list[Case]:
    # Cross-entropy: on each geometry the heaviest call of each target kind (bfloat16 and float32; the
    # focal loss in bfloat16); on the LM head the lighter ones; an odd vocabulary (strides not divisible
    # by 16: unvectorised loads) and an (N, C) transposed view (classes strided).
    heavy_index = {"weight": True, "smoothing": 0.1, "scale_tensor": True}
    heavy_prob = {"prob": True, "tgrad": True, "weight": True, "smoothing": 0.1}
    cases = [Case(xent, (*g, dtype), kw) for g in GEOMETRIES for dtype, kws in
             ((bf16, (heavy_index, {"weight": True, "gamma": 2.0}, heavy_prob)), (f32, (heavy_index, heavy_prob)))
             for kw in kws]
    lighter = ({}, {"grad": False}, {"gamma": 2.5}, {"prob": True}, {"prob": True, "grad": False, "tgrad": True},
               {"prob": True, "grad": False})
    cases += [Case(xent, (*LM, bf16), kw) for kw in lighter]
    cases += [Case(xent, (8192, 50257, 1, bf16)), Case(xent, (*ROWS_1000, bf16), dict(heavy_index, transposed=True))]
    # nll_loss of log-probabilities: an LM head and segmentation.
    cases += [Case(nll, (*g, dtype), kw) for g in (LM, SEGMENT) for dtype in (bf16, f32)
              for kw in ({}, {"weight": True, "scale_tensor": True})] + [Case(nll, (*LM, bf16), {"grad": False})]
    # The softmax family: every kernel on every geometry in bfloat16, the heaviest in float32 on three;
    # softmax to another dtype (rounded input) and entropy without its gradient.
    forms = [(softmax, {"log": log, "backward": bw}) for bw in (False, True) for log in (False, True)]
    forms += [(entropy, {"logits": True}), (entropy, {"logits": False})]
    cases += [Case(call, (*g, bf16), kw) for g in GEOMETRIES for call, kw in forms]
    cases += [Case(call, (*g, f32), kw) for g in (LM, ROWS_1000, SEGMENT)
              for call, kw in (forms[0], forms[2], forms[4])]
    cases += [Case(softmax, (*ROWS_1000, bf16), {"log": True, "out_dtype": f32}),
              *(Case(entropy, (*ROWS_1000, bf16), {"logits": lg, "grad": False}) for lg in (True, False))]
    # Elementwise: each kind, contiguous operands (collapsed to one dim), reduction "mean", input gradient;
    # then (C,) broadcast weights (rows of C), "none" with both gradients, float32, the row sums of the
    # multilabel soft margin, no gradient, a 0-dim scale tensor, integer targets.
    shape = (32768, 1000)
    kinds = [("bce", {}), ("logits", {}), ("logits", {"pos_weight": (1000,)}), ("soft_margin", {}),
             ("focal", {"alpha": 0.25, "gamma": 2.0}), ("focal", {"alpha": -1.0, "gamma": 0.0}),
             ("focal", {"alpha": 0.25, "gamma": 1.5}), (MSE, {}), (KL_PROB, {}), (KL_LOG, {})]
    cases += [Case(elementwise, (kind, shape, bf16), kw) for kind, kw in kinds]
    cases += [Case(elementwise, (kind, shape, bf16), {"weight": (1000,), "scale_tensor": True})
              for kind in ("bce", "logits", "soft_margin", MSE)]
    cases += [Case(elementwise, (kind, shape, dtype), dict(kw, reduction="none", grads="xy"))
              for kind, kw in (kinds[2], kinds[4], kinds[7], kinds[9]) for dtype in (bf16, f32)]
    cases += [Case(elementwise, ("soft_margin", shape, bf16), {"reduction": "rows", "weight": (1000,)}),
              Case(elementwise, ("soft_margin", (32768, 8192), f32), {"reduction": "rows"}),
              Case(elementwise, ("logits", shape, bf16), {"grads": ""}),
              Case(elementwise, ("focal", shape, bf16), {"alpha": 0.25, "gamma": 2.0, "target_dtype": torch.int64})]
    # The vocab-parallel passes on an LM head's shard (V / 8 ranks) and on segmentation.
    cases += [Case(shard, (*g, dtype), {"smoothing": sm, "weight": w}) for g in ((32768, 128256 // 8, 1), SEGMENT)
              for dtype, options in ((bf16, ((False, False), (True, False), (True, True))), (f32, ((True, True),)))
              for sm, w in options]
    return cases


CASES = _cases()


# ---- capture, specialise, compile -------------------------------------------------------------------

@dataclass
class Launch:
    """What ``kernel[grid](*args, **kwargs)`` asked for."""

    fn: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class _Pointer:
    """A tensor as triton's specialisation sees it: a dtype and an address, that of an aligned allocation
    (as CUDA's caching allocator gives) plus the view's offset."""

    def __init__(self, t: torch.Tensor):
        self.dtype, self.address = t.dtype, t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self.address


def capture(case: Case) -> list[Launch]:
    """The launches ``case`` makes, recorded instead of run."""
    from triton.runtime.jit import JITFunction
    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, tuple(grid), args, kwargs))

    run, JITFunction.run = JITFunction.run, record
    try:
        case.call(*case.args, **case.kwargs)
    finally:
        JITFunction.run = run
    return launches


def specialise(launch: Launch, backend) -> tuple[tuple, dict]:
    """``(key, compile arguments)`` of a launch, as ``JITFunction.run`` specialises it for ``backend``."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature
    fn = launch.fn
    wrap = lambda v: _Pointer(v) if isinstance(v, torch.Tensor) else v
    args = [wrap(a) for a in launch.args]
    kwargs = {k: wrap(v) for k, v in launch.kwargs.items()}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = (fn.__name__, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
           repr(sorted(options.__dict__.items())))
    return key, {"fn": fn, "signature": signature, "constexprs": constexprs, "attrs": attrs, "options": options}


def build(spec: dict, target) -> dict:
    """Compile one specialisation: registers and spill stores from the ``ptxas -v`` log that triton prints
    (``dump_ptxas_log``), shared memory from the kernel's metadata; or the error."""
    import triton
    from triton.compiler import ASTSource
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec["attrs"]),
                                    target=target, options=spec["options"].__dict__)
    except Exception as e:  # noqa: BLE001 - a failure to build is the result
        return {"error": f"{type(e).__name__}: {e}"[:4000]}
    seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    if regs is None or spills is None:
        return {"error": f"no ptxas -v report in triton's log: {text[-2000:]!r}"}
    return {"error": None, "registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
            "shared": kernel.metadata.shared, "seconds": round(seconds, 2)}


def kernels_defined() -> list[str]:
    """Every ``*_kernel`` JIT function of the modules of :mod:`losskit.ops.triton`, as ``module.name``."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import losskit.ops.triton as package
    names = []
    for module in pkgutil.iter_modules(package.__path__):
        mod = importlib.import_module(f"{package.__name__}.{module.name}")
        names += [f"{module.name}.{k}" for k, v in vars(mod).items()
                  if isinstance(v, JITFunction) and k.endswith("_kernel")]
    return names


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    knobs.nvidia.dump_ptxas_log = True
    target = GPUTarget("cuda", ARCH, 32)
    backend = make_backend(target)
    specs: dict[tuple, dict] = {}  # one build per distinct specialisation, with every call that makes it
    for case in CASES:
        for launch in capture(case):
            key, spec = specialise(launch, backend)
            entry = specs.setdefault(key, dict(spec, calls=[], grids=[]))
            entry["calls"].append(str(case))
            entry["grids"].append(launch.grid)
    builds = []
    for spec in specs.values():
        fn = spec["fn"]
        meta_params = {fn.arg_names[i]: v for (i,), v in spec["constexprs"].items() if fn.params[i].is_constexpr}
        builds.append(dict(kernel=f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}", calls=spec["calls"],
                           grids=spec["grids"], num_warps=spec["options"].num_warps, constexprs=meta_params,
                           **build(spec, target)))
    json.dump({"ptxas": knobs.nvidia.ptxas.path, "kernels": kernels_defined(), "builds": builds}, sys.stdout,
              default=str)


if __name__ == "__main__":
    main()
