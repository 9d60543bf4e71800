"""The scale case of the README: linear_cross_entropy where eager cannot run in 24 GiB.

N=16384 tokens, D=256, V=262144 float32: eager `F.cross_entropy(x @ W.T, y)` needs the (N, V) logits
(16 GiB) and their gradient (16 GiB) at once. Prints the forward+backward time and the peak resident
memory above the inputs. Run: MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/lce_scale.py
"""

import os
import time

import torch

import losskit.functional as LF
from losskit.testing import peak_memory_above

N, D, V = (int(v) for v in os.environ.get("LCE_SCALE", "16384,256,262144").split(","))
gen = torch.Generator().manual_seed(0)
x = torch.randn(N, D, generator=gen).requires_grad_()
w = (torch.randn(V, D, generator=gen) / D**0.5).requires_grad_()
y = torch.randint(0, V, (N,), generator=gen)


def step() -> float:
    start = time.perf_counter()
    LF.linear_cross_entropy(x, w, y).backward()
    return time.perf_counter() - start


seconds = []
peak = peak_memory_above(lambda: seconds.append(step()))
grads = (x.numel() + w.numel()) * 4
print(f"linear_cross_entropy N={N} D={D} V={V} float32: {seconds[0]:.1f} s forward+backward, "
      f"peak {peak / 2**20:.0f} MiB above the inputs (gradients {grads / 2**20:.0f} MiB; "
      f"eager would hold {2 * N * V * 4 / 2**30:.0f} GiB of logits and their gradient)")
