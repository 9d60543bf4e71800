"""How losskit's kernel engine was chosen: the same softmax cross-entropy in each candidate engine.

For cross_entropy forward+backward at N=4096, C=32768 float32 (the issue's case), per engine:
steady-state time (interleaved, median of REPS), the first call in a fresh process with a cold and a
warm cache (compilation; the first call is on a small 64x1000 case), the engine's import (after torch;
torch.compile imports its compiler inside the first call), and the install weight. Engines: losskit's C extension (built by
pip, no JIT), torch.compile of F.cross_entropy (inductor, C++ codegen), numba ``@njit(parallel=True,
fastmath=True, cache=True)`` (optional: skipped when numba is not installed), and torch eager as the
baseline. Run: python benchmarks/engine_costs.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import losskit.functional as LF
from losskit.ops.cpu import native

N, C = (int(v) for v in os.environ.get("ENGINE_SIZE", "4096,32768").split(","))
REPS = 5
#: A first call compiles for the shapes it sees; this small case keeps the call itself negligible.
SMALL = (64, 1000)

try:
    import numba
except ImportError:
    numba = None

if numba is not None:
    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _numba_xent(x, y, grad, loss, scale):
        n, c = x.shape
        for i in numba.prange(n):
            m = -np.inf
            for j in range(c):
                m = max(m, x[i, j])
            s = 0.0
            for j in range(c):
                e = np.exp(x[i, j] - m)
                grad[i, j] = e
                s += e
            inv = scale / s
            for j in range(c):
                grad[i, j] *= inv
            grad[i, y[i]] -= scale
            loss[i] = np.log(s) - (x[i, y[i]] - m)


def numba_cross_entropy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with its gradient written into x.grad, as a forward+backward would."""
    grad = native.empty(x.shape, x.dtype, x.device)
    loss = np.empty(x.shape[0], dtype=np.float32)
    _numba_xent(x.detach().numpy(), y.numpy(), grad.numpy(), loss, np.float32(1.0 / x.shape[0]))
    x.grad = grad
    return torch.from_numpy(loss).mean()


def _engines() -> dict[str, object]:
    engines = {"torch eager": lambda x, y: F.cross_entropy(x, y).backward(),
               "torch.compile": (lambda f: lambda x, y: f(x, y).backward())(torch.compile(F.cross_entropy)),
               "losskit C extension": lambda x, y: LF.cross_entropy(x, y, impl="compiled").backward()}
    if numba is not None:
        engines["numba"] = numba_cross_entropy
    return engines


def steady_state() -> dict[str, float]:
    """Median ms of forward+backward per engine, interleaved round-robin after one warm-up call each."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=gen).requires_grad_()
    y = torch.randint(0, C, (N,), generator=gen)
    engines = _engines()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for rep in range(REPS + 1):
        for name, fn in engines.items():
            x.grad = None
            start = time.perf_counter()
            fn(x, y)
            if rep:  # the first round compiles and warms up
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


_CHILD = """
import time, sys
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
engine = sys.argv[1]
x = torch.randn({n}, {c}).requires_grad_(); y = torch.randint(0, {c}, ({n},))
if engine == "numba":
    import numba
    t2 = time.perf_counter()
    sys.path.insert(0, {here!r})
    import engine_costs
    fn = engine_costs.numba_cross_entropy
elif engine == "torch.compile":
    import torch.nn.functional as F
    t2 = time.perf_counter()
    f = torch.compile(F.cross_entropy)
    fn = lambda x, y: f(x, y).backward()
else:
    import losskit.functional as LF
    t1 = time.perf_counter()  # the engine's own import: the extension module, losskit being loaded
    import losskit.ops.cpu._native
    t2 = time.perf_counter()
    fn = lambda x, y: LF.cross_entropy(x, y, impl="compiled").backward()
t3 = time.perf_counter()
fn(x, y)
t4 = time.perf_counter()
print(f"{{1e3 * (t2 - t1):.1f}} {{1e3 * (t4 - t3):.1f}}")
"""


def first_calls(engine: str) -> tuple[str, str, str]:
    """(import ms, first call ms with a cold cache, first call ms with a warm cache), each in a fresh process."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "NUMBA_CACHE_DIR": cache}
        code = _CHILD.format(n=SMALL[0], c=SMALL[1], here=str(Path(__file__).parent))
        runs = []
        for _ in range(2):  # the first fills the cache, the second finds it
            out = subprocess.run([sys.executable, "-c", code, engine], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()
            runs.append(out)
    return runs[0][0], runs[0][1], runs[1][1]


def _du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def install_weight(engine: str) -> str:
    if engine == "losskit C extension":
        files = list(Path(native.__file__).parent.glob("_native*.so"))
        return f"{sum(f.stat().st_size for f in files) / 2**10:.0f} KiB ({len(files)} modules), built by pip"
    if engine == "numba":
        import llvmlite
        mib = _du(Path(numba.__file__).parent) + _du(Path(llvmlite.__file__).parent)
        return f"numba + llvmlite {mib:.0f} MiB"
    if engine == "torch.compile":
        return "in torch; needs a C++ compiler at run time"
    return "-"


def main() -> None:
    print(f"cross_entropy forward+backward, N={N}, C={C} float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    speed = steady_state()
    print(f"{'engine':22} {'ms':>8} {'vs eager':>9} {'import ms':>10} {'1st call cold':>14} {'1st call warm':>14}  install")
    for name, ms in speed.items():
        imp, cold, warm = ("-", "-", "-") if name == "torch eager" else first_calls(name)
        print(f"{name:22} {ms:8.1f} {speed['torch eager'] / ms:8.2f}x {imp:>10} {cold:>14} {warm:>14}  "
              f"{install_weight(name)}")


if __name__ == "__main__":
    main()
