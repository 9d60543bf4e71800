"""linear_cross_entropy in bfloat16 against eager, torch's chunked loss and the three matmuls alone.

The case of issue 16: N=2048 tokens, D=1024, V=32768, forward+backward (mean loss, input and head
gradients). Implementations, called in interleaved rounds so that load affects them alike:

- ``losskit bf16``: ``linear_cross_entropy`` as this CPU runs it (bfloat16 products where the CPU
  multiplies bfloat16, see ``losskit.ops.linear_xent.products_dtype``);
- ``losskit bf16, upcast``: the same call with the float32 upcast forced, i.e. what CPUs without native
  bfloat16 run (and what losskit ran everywhere before bfloat16 products; skipped with --quick);
- ``eager bf16``: ``F.cross_entropy((h @ W.T).float(), y)``, what transformers does;
- ``torch chunked bf16``: torch 2.13's ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``
  (when this torch has it; skipped with --quick);
- ``3 matmuls bf16``: ``z = h @ W.T; z @ W; z.T @ h``, no loss: the floor any implementation pays;
- the float32 pair ``losskit fp32`` and ``3 matmuls fp32``.

Prints the CPU, torch, the decision, the median of each (seconds), the ratios against the issue's
targets, and the peak memory above the inputs of losskit and eager in bfloat16 (a child process,
``losskit.testing.measure_peaks_in_child``). Run on a quiet machine:

    python benchmarks/lce_bfloat16.py [--rounds 5] [--quick]

``LCE_SIZE=N,D,V`` changes the size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import losskit.functional as LF
from losskit.bench._env import machine
from losskit.ops import linear_xent
from losskit.testing import measure_peaks_in_child

N, D, V = (int(v) for v in os.environ.get("LCE_SIZE", "2048,1024,32768").split(","))
MIB = 1 << 20


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).requires_grad_()
    return h, w, torch.randint(0, V, (N,), generator=g)


def _step(loss: Callable[..., torch.Tensor], h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of ``loss(h, w, y)``; the gradients are dropped after each call."""
    def call() -> None:
        loss(h, w, y).backward()
        h.grad = w.grad = None
    return call


def _matmuls(h: torch.Tensor, w: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            z = h @ w.T  # (N, V) logits, standing in for their gradient below
            z @ w  # (N, D) input gradient
            z.T @ h  # (V, D) head gradient
    return call


def _upcast(call: Callable[[], None]) -> Callable[[], None]:
    """``call`` with the CPU probe saying "emulated": the float32 upcast path."""
    def forced() -> None:
        probe = linear_xent.cpu_multiplies_bfloat16
        linear_xent.cpu_multiplies_bfloat16 = lambda: False
        try:
            call()
        finally:
            linear_xent.cpu_multiplies_bfloat16 = probe
    return forced


def _losskit(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return LF.linear_cross_entropy(h, w, y)


def _eager(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ w.T).float(), y)


def _torch_chunked(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.linear_cross_entropy(h, w, y, options=torch.nn.LinearCrossEntropyOptions())


def implementations(quick: bool) -> dict[str, Callable[[], None]]:
    bf16, fp32 = _inputs(torch.bfloat16), _inputs(torch.float32)
    impls = {"losskit bf16": _step(_losskit, *bf16)}
    if not quick:
        impls["losskit bf16, upcast"] = _upcast(_step(_losskit, *bf16))
    impls["eager bf16"] = _step(_eager, *bf16)
    if not quick and hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        impls["torch chunked bf16"] = _step(_torch_chunked, *bf16)
    impls["3 matmuls bf16"] = _matmuls(*bf16[:2])
    impls["losskit fp32"] = _step(_losskit, *fp32)
    impls["3 matmuls fp32"] = _matmuls(*fp32[:2])
    return impls


def medians(impls: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds of each implementation over ``rounds`` interleaved rounds, after one warm-up call."""
    times: dict[str, list[float]] = {name: [] for name in impls}
    for call in impls.values():
        call()
    for r in range(rounds):
        for name, call in impls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.2f}" for n, t in times.items()), flush=True)
    return {name: statistics.median(ts) for name, ts in times.items()}


_MEMORY = f"""
import torch, torch.nn.functional as F
import losskit.functional as LF
torch.manual_seed(0)
h = torch.randn({N}, {D}).bfloat16().requires_grad_()
w = (torch.randn({V}, {D}) / {D}**0.5).bfloat16().requires_grad_()
y = torch.randint(0, {V}, ({N},))
def step(loss):
    def call():
        loss(h, w, y).backward()
        grads = h.grad, w.grad
        h.grad = w.grad = None
        return grads
    return call
calls = {{"losskit bf16": step(lambda h, w, y: LF.linear_cross_entropy(h, w, y)),
          "eager bf16": step(lambda h, w, y: F.cross_entropy((h @ w.T).float(), y))}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="leave out the upcast path and torch's chunked loss")
    args = parser.parse_args()
    info = machine()
    native = linear_xent.products_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    print(f"CPU: {info['cpu']} ({info['cores']} cores, {info['torch threads']} torch threads); torch "
          f"{torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(f"bfloat16 products: {'native (bfloat16 GEMMs)' if native else 'emulated (float32 upcast)'}; "
          f"N={N} D={D} V={V}, forward+backward, median of {args.rounds} interleaved rounds")
    t = medians(implementations(args.quick), args.rounds)
    print("\nseconds (median):")
    for name, seconds in t.items():
        print(f"  {name:22s} {seconds:7.3f}")
    print("\nratios (issue 16's targets in brackets):")
    print(f"  eager / losskit bf16            {t['eager bf16'] / t['losskit bf16']:.2f}x "
          f"[>= 1.5 where bfloat16 is native]")
    print(f"  losskit bf16 / 3 matmuls bf16   {t['losskit bf16'] / t['3 matmuls bf16']:.2f}x [<= 1.3]")
    if "losskit bf16, upcast" in t:
        print(f"  losskit bf16 / upcast path      {t['losskit bf16'] / t['losskit bf16, upcast']:.2f}x "
              f"[<= 1: no slower than before]")
    if "torch chunked bf16" in t:
        print(f"  torch chunked / losskit bf16    {t['torch chunked bf16'] / t['losskit bf16']:.2f}x")
    print(f"  losskit fp32 / 3 matmuls fp32   {t['losskit fp32'] / t['3 matmuls fp32']:.2f}x [<= 1.05]")
    peaks = measure_peaks_in_child(_MEMORY + f"torch.set_num_threads({torch.get_num_threads()})\n")
    grads = (N * D + V * D) * 2
    print(f"\npeak above the inputs, bfloat16 (gradients {grads / MIB:.0f} MiB; issue 16's target: the gradients "
          f"+ 64 MiB = {grads / MIB + 64:.0f} MiB):")
    for name, peak in peaks.items():
        print(f"  {name:22s} {peak / MIB:7.0f} MiB (gradients + {(peak - grads) / MIB:.0f} MiB)")


if __name__ == "__main__":
    main()
