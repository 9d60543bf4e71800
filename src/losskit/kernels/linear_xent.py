"""Chunked linear layer + softmax cross-entropy: the logits of ``rows`` samples at a time, never all of them.

Reference expression (``x`` (N, D), ``W`` (C, d1..dk, D) viewed as ``(C, L, D)``, ``b`` (C, L), L = d1*..*dk)::

    logits = torch.einsum("nd,cld->ncl", x, W) + b          # F.linear(x, W.view(C * L, D), b).view(N, C, L)
    logits = softcap * torch.tanh(logits / softcap)        # when softcap is set
    loss = xent_rows_(logits at each position (n, l))      # cross-entropy / z-loss, see kernels.rows

For each chunk of ``rows`` samples and each position ``l`` (one head ``W_l = W[:, l]``, a (C, D) view)::

    chunk = W_l @ x_c.T                     (C, rows) acc   GEMM 1 into the one preallocated chunk
    work = chunk.T                          (rows, C) view, strides (1, rows)
    work += b_l; softcap; xent_rows_        work = scale * dloss/dlogits, in place; * (1 - tanh^2) for softcap
    grad_b_l += work.sum(0)
    grad_x_c (+)= work @ W_l                (rows, D)       GEMM 2
    grad_W_l += chunk @ x_c                 (C, D) acc      GEMM 3 (the first chunk writes, beta = 0)

so memory above the inputs is the gradients plus one chunk, whatever N is, and the time is the three
GEMMs plus a few elementwise passes over each chunk. The products run in the accumulation dtype (float32;
float64 for float64): CPUs without native bfloat16/float16 GEMMs emulate them several times slower
(measured 5x here), so low-precision operands are upcast (``W`` once per call, ``x`` per chunk).

The chunk is class-major because GEMM 1 is the costliest of the three (it writes the whole chunk while
reading only ``D`` numbers per output): written as ``(C, rows)`` it ran in 0.79 s instead of 0.99 s
over the benchmark batch below (minimum of 3), while GEMM 2 / GEMM 3 (0.79 / 0.78 s) and the torch row
step (0.08 s) do not mind the transposed view. losskit's C row kernel wants contiguous rows (0.27 s on
this view against 0.06 s on row-major logits), so the row step stays in torch ops: class-major with
torch ops was the fastest combination measured (2.44 s against 2.65 s for the three GEMMs + row step).

Measured (2-core EPYC shared with other jobs, at load ~1-2; forward + backward, N=2048, D=1024,
C=32768 float32, interleaved, median of 5): this 2.54 s, peak 192 MiB above the inputs; eager
``F.cross_entropy(x @ W.T, t)`` 2.96 s (1.17x), 768 MiB; torch 2.13's chunked
``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())`` 5.45 s (2.15x), 272 MiB; the three
products alone, unchunked, 2.58 s (1.02x), 392 MiB. At N=16384, D=256, C=262144 (eager's logits alone
would be 16 GiB, ~48 GiB for its forward + backward): 55 s (120 GFLOP/s), peak 409 MiB above the
inputs (gradients 272 MiB + one 128 MiB chunk). A second run of the first case gave 2.62 s against
eager's 3.00 s (1.14x): the figures move by a few per cent between runs on this shared machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import accumulation_dtype
from .rows import RowSpec, xent_rows_

#: Bytes of one chunk's working buffers. Each chunk streams the whole head through each GEMM, so larger
#: chunks make the GEMMs more efficient and mean fewer, larger elementwise calls (each a parallel region
#: that, on a loaded machine, waits for every thread to be scheduled). Measured at N=2048, D=1024,
#: C=32768 float32 on the 2-core EPYC (loaded; CPU s of GEMM 1 / 2 / 3 over the batch, row-major): 256 rows
#: 2.55 / 1.92 / 1.64, 384 rows 2.41 / 1.76 / 1.68, 448 rows 2.12 / 1.78 / 1.62, 512 rows 2.03 / 1.64 /
#: 1.61, unchunked 2.06 / 1.65 / 1.81. 56 MiB gives that case 448 rows and keeps its peak at the
#: gradients (136 MiB) + 56 MiB.
CHUNK_BYTES = 56 << 20

#: Fewest rows per chunk when the vocabulary is so large that ``CHUNK_BYTES`` holds fewer: each GEMM
#: reads the whole head per chunk for ``2 * rows`` flops per element, so few rows make it memory-bound.
#: Measured at C=262144, D=1024 float32 (2 threads, loaded), GFLOP per CPU-second of the three GEMMs:
#: 32 rows 38, 64 rows 47, 128 rows 64, 256 rows 70. 128 rows of such a head is a 128 MiB chunk, an
#: eighth of its 1 GiB weight gradient.
MIN_ROWS = 128


def class_buffers(spec: RowSpec, softcap: float | None, probabilities: bool) -> int:
    """How many ``(rows, C)`` accumulation-dtype buffers a chunk holds at once: the logits, plus the tanh
    kept for softcap's derivative, plus what :func:`losskit.kernels.rows.xent_rows_` allocates at that
    size (index targets: ``outer(g, w)`` for label smoothing with class weights; probability targets:
    the upcast, smoothed and weighted targets, their product with the logits, and for the target's
    gradient its buffer and a log-sum-exp temporary)."""
    extra = 6 if probabilities else int(bool(spec.label_smoothing and spec.weight is not None))
    return 1 + int(bool(softcap)) + extra


def chunk_rows(n: int, n_classes: int, in_features: int, dtype: torch.dtype, buffers: int = 1,
               budget: int = CHUNK_BYTES) -> int:
    """Samples per chunk for ``n`` samples of a ``(C, D)`` head in ``dtype``.

    Per sample a chunk holds ``buffers`` rows of ``C`` accumulation-dtype numbers (see
    :func:`class_buffers`) and, for bfloat16/float16 input, two ``D``-rows more (the upcast input and its
    gradient): ``rows = budget // (acc_bytes * (buffers * C + 2 D [low precision]))``, at least
    ``MIN_ROWS``, at most ``n``.
    """
    acc = accumulation_dtype(dtype)
    acc_bytes = torch.finfo(acc).bits // 8
    per_row = acc_bytes * (buffers * n_classes + (2 * in_features if dtype != acc else 0))
    return max(1, min(n, max(MIN_ROWS, budget // per_row)))


@dataclass(frozen=True)
class Problem:
    """One validated call, in the shapes the sweep works on.

    ``x`` (N, D), ``w`` (C, L, D), ``b`` (C, L) or None; ``target`` (N, L) int64 class indices or
    (N, C, L) probabilities; ``spec`` the per-row options (class weight in the accumulation dtype);
    ``softcap`` None or c > 0; ``rows`` samples per chunk. The accumulation dtype follows ``x``.
    """

    x: Tensor
    w: Tensor
    b: Tensor | None
    target: Tensor
    spec: RowSpec
    softcap: float | None
    rows: int

    @property
    def probabilities(self) -> bool:
        return self.target.is_floating_point()


@dataclass
class Sweep:
    """What one pass produced. Gradients are for the ``scale`` passed in; None where not asked for."""

    loss: Tensor  # (N, L) acc, per position, weighted, not reduced
    lse: Tensor | None  # (N, L) acc, log-sum-exp of the (soft-capped) logits, if p.spec.argmax
    argmax: Tensor | None  # (N, L) int64, if p.spec.argmax
    grad_input: Tensor | None  # (N, D) input dtype
    grad_weight: Tensor | None  # (C, L, D) acc
    grad_bias: Tensor | None  # (C, L) acc
    grad_target: Tensor | None  # (N, C, L) target dtype


def sweep(p: Problem, scale: Tensor | float, *, want_input: bool, want_weight: bool, want_bias: bool,
          want_target: bool) -> Sweep:
    """Loss (and log-sum-exp and argmax if ``p.spec.argmax``) of every position and, for those asked
    for, ``scale * d(loss)/d(x, W, b, target)``, one chunk of ``p.rows`` samples at a time.

    ``scale``: the reduction's factor (float or 0-dim tensor), or an (N, L) tensor of per-position
    factors (a "none" reduction's ``grad_output``). Runs under the caller's ``torch.no_grad()``.
    """
    x = p.x
    n, d = x.shape
    n_classes, length, _ = p.w.shape
    acc = accumulation_dtype(x.dtype)
    dev = x.device
    upcast = x.dtype != acc
    want_grad = want_input or want_weight or want_bias

    w_mm = p.w.to(acc)  # (C, L, D) GEMM operand; for low precision one acc copy of the head
    b_acc = None if p.b is None else p.b.to(acc)
    loss = torch.empty(n, length, dtype=acc, device=dev)
    lse = torch.empty(n, length, dtype=acc, device=dev) if p.spec.argmax else None
    top = torch.empty(n, length, dtype=torch.int64, device=dev) if p.spec.argmax else None
    gx = torch.empty(n, d, dtype=x.dtype, device=dev) if want_input else None
    # grad_W is written by the first chunk's GEMM (beta = 0): no zero-fill pass, unless no chunk runs.
    gw = (torch.empty if n else torch.zeros)(n_classes, length, d, dtype=acc, device=dev) if want_weight else None
    gb = torch.zeros(n_classes, length, dtype=acc, device=dev) if want_bias else None
    gt = torch.empty(p.target.shape, dtype=p.target.dtype, device=dev) if want_target else None

    # The chunk's buffers, allocated once (see class_buffers / chunk_rows for their count and size); the
    # logits and softcap's tanh are class-major (C, rows). A short last chunk is the (C, r) column slice,
    # which BLAS writes directly (row stride rows >= r).
    rows = max(1, min(p.rows, n))
    chunk_all = torch.empty(n_classes, rows, dtype=acc, device=dev)
    tanh_all = torch.empty(n_classes, rows, dtype=acc, device=dev) if p.softcap and want_grad else None
    tg_all = torch.empty(rows, n_classes, dtype=acc, device=dev) if want_target else None
    x_all = torch.empty(rows, d, dtype=acc, device=dev) if upcast else None  # (rows, D) upcast input
    gx_all = torch.empty(rows, d, dtype=acc, device=dev) if upcast and want_input else None

    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        r = n1 - n0
        chunk = chunk_all[:, :r]  # (C, r)
        work = chunk.T  # (r, C) view of the logits, then of their gradient
        x_c = x_all[:r].copy_(x[n0:n1]) if upcast else x[n0:n1]  # (r, D)
        gx_c = None if gx is None else gx_all[:r] if upcast else gx[n0:n1]  # (r, D)
        for l in range(length):
            w_l = w_mm[:, l]  # (C, D), row stride L * D
            torch.mm(w_l, x_c.T, out=chunk)  # GEMM 1: logits, class-major (C, r)
            if b_acc is not None:
                chunk.add_(b_acc[:, l, None])
            tanh = None if tanh_all is None else tanh_all[:, :r].T  # (r, C)
            _softcap_(work, p.softcap, tanh)
            t = p.target[n0:n1, :, l].to(acc) if p.probabilities else p.target[n0:n1, l]
            s = scale[n0:n1, l] if isinstance(scale, Tensor) and scale.dim() else scale
            tg = None if tg_all is None else tg_all[:r]
            res = xent_rows_(work, t, p.spec, s, want_grad, tg)
            loss[n0:n1, l] = res.loss
            if top is not None:
                lse[n0:n1, l] = res.lse
                top[n0:n1, l] = res.argmax
            if gt is not None:
                gt[n0:n1, :, l] = tg
            if tanh is not None:
                work.addcmul_(work, tanh.square_(), value=-1)  # d/dz c tanh(z / c) = 1 - tanh^2
            if gb is not None:
                gb[:, l] += chunk.sum(1)
            if gx_c is not None:  # GEMM 2: (r, C) @ (C, D), summed over the L positions
                torch.mm(work, w_l, out=gx_c) if l == 0 else gx_c.addmm_(work, w_l)
            if gw is not None:  # GEMM 3: (C, r) @ (r, D) accumulated in acc dtype
                torch.mm(chunk, x_c, out=gw[:, l]) if n0 == 0 else gw[:, l].addmm_(chunk, x_c)
        if gx_c is not None and upcast:
            gx[n0:n1] = gx_c
    return Sweep(loss, lse, top, gx, gw, gb, gt)


def _softcap_(work: Tensor, cap: float | None, tanh_out: Tensor | None) -> None:
    """``work = cap * tanh(work / cap)`` in place; ``tanh(work / cap)`` is kept in ``tanh_out`` when
    the gradient needs it."""
    if not cap:
        return
    if tanh_out is None:
        work.div_(cap).tanh_().mul_(cap)
        return
    torch.tanh(work.div_(cap), out=tanh_out)
    torch.mul(tanh_out, cap, out=work)
