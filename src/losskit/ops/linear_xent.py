"""Chunked linear layer + softmax cross-entropy: the logits of ``rows`` samples at a time, never all of them.

Reference expression (``x`` (N, D), ``W`` (C, d1..dk, D) viewed as ``(C, L, D)``, ``b`` (C, L), L = d1*..*dk)::

    logits = torch.einsum("nd,cld->ncl", x, W) + b          # F.linear(x, W.view(C * L, D), b).view(N, C, L)
    logits = softcap * torch.tanh(logits / softcap)        # when softcap is set
    loss = xent_rows_(logits at each position (n, l))      # cross-entropy / z-loss, see ops.reference.rows

For each chunk of ``rows`` samples and each position ``l`` (one head ``W_l = W[:, l]``, a (C, D) view)::

    chunk = W_l @ x_c.T                     (C, rows) acc   GEMM 1 into the one preallocated chunk
    work = chunk.T                          (rows, C) view, strides (1, rows)
    work += b_l; softcap; xent_rows_        work = scale * dloss/dlogits, in place; * (1 - tanh^2) for softcap
    grad_b_l += work.sum(0)
    grad_x_c (+)= work @ W_l                (rows, D)       GEMM 2
    grad_W_l += chunk @ x_c                 (C, D) acc      GEMM 3 (the first chunk writes, beta = 0)

so memory above the inputs is the gradients plus one chunk, whatever N is, and the time is the three
GEMMs plus a few elementwise passes over each chunk.

Which dtype the products run in is :func:`products_dtype`'s decision. float32 and float64 run in
themselves. bfloat16/float16 run in themselves on CUDA and, for bfloat16, on CPUs that multiply it in
hardware (AMX or AVX512-BF16, read from ``torch.cpu.get_capabilities()``: :func:`cpu_multiplies_bfloat16`)::

    logits = x_c @ W_l.T (+ b_l)            (rows, C) bf16  GEMM 1, row-major: the C row kernel's rows
    grad = xent_rows(logits)                (rows, C) bf16  read and written in bfloat16, computed in float32
    grad_b_l += grad.sum(0)                 (C,) float32
    grad_x_c = grad @ W_l                   (rows, D) bf16  GEMM 2 (float32 sum over the L positions)
    grad_W_l += grad.T @ x_c                (C, D) float32  GEMM 3 a block of classes at a time, added in float32

GEMM 3's product is formed per block of classes (bfloat16 on the CPU, whose GEMM has no float32 output;
float32 on CUDA through ``out_dtype``) and added to a float32 accumulator, rounded to the weight's dtype
once at the end. Without the C kernel (CUDA, torch.compile, softcap, z-loss, statistics, "none"'s
per-position scale) the torch row step runs on a float32 copy of the chunk and writes the gradient
back into the bfloat16 logits. CPUs that emulate 16-bit products (AVX2: measured 5x slower than
float32) keep the float32 path: operands are upcast (``W`` once per call, ``x`` per chunk).

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

bfloat16, same case, the same EPYC (Zen 4: AVX512-BF16, no AMX), torch 2.13, load ~2, median of 3
(``benchmarks/lce_bfloat16.py``): this 1.19 s, peak 200 MiB above the inputs (the bfloat16 gradients
68 MiB + the float32 weight accumulator 128 MiB + 4); the float32 upcast it replaces here 2.90 s; eager
``F.cross_entropy((x @ W.T).float(), t)`` 1.45 s, 768 MiB; torch's chunked loss 6.62 s; the three
bfloat16 products alone 1.06 s (this is 1.12x them). float32 in the same rounds: 2.38 s against the
three products' 2.44 s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _dispatch
from .blocks import accumulation_dtype
from .reference.rows import RowSpec, xent_rows_

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

#: Bytes of the buffer a block of the weight gradient's low-precision product is formed in before it is
#: added to the float32 accumulator (:func:`weight_grad_`, which also stages its float32 copy): a block of
#: classes rather than the whole (C, D) product, which would need (C, D) buffers beside the accumulator.
#: Measured per 448-row chunk at C=32768, D=1024 bfloat16 (2-core EPYC, load 3-5, median / minimum of 9),
#: with torch's mixed-dtype add: blocks of 1 MiB 0.66 / 0.22 s, 2 MiB 0.46 / 0.21, 4 MiB 0.34 / 0.23,
#: 8 MiB 0.35 / 0.23, 16 MiB 0.43 / 0.30; bfloat16 accumulation with no float32 sum (beta = 1) 0.26 / 0.17.
WEIGHT_BLOCK_BYTES = 4 << 20
#: The same on CUDA, where the block is float32 (``out_dtype``) and the add needs no copy: large enough
#: that each block is a GEMM worth a launch (16384 classes of D=4096: 8 per chunk at V=128256), well
#: inside a gradients + 1 GiB budget. Not measured: no GPU was available when this was written.
CUDA_WEIGHT_BLOCK_BYTES = 256 << 20


def class_buffers(spec: RowSpec, softcap: float | None, probabilities: bool) -> int:
    """How many ``(rows, C)`` accumulation-dtype buffers a chunk holds at once: the logits, plus the tanh
    kept for softcap's derivative, plus what :func:`losskit.ops.reference.rows.xent_rows_` allocates at that
    size (index targets: ``outer(g, w)`` for label smoothing with class weights; probability targets:
    the upcast, smoothed and weighted targets, their product with the logits, and for the target's
    gradient its buffer and a log-sum-exp temporary)."""
    extra = 6 if probabilities else int(bool(spec.label_smoothing and spec.weight is not None))
    return 1 + int(bool(softcap)) + extra


def chunk_rows(n: int, n_classes: int, in_features: int, dtype: torch.dtype, buffers: int = 1,
               budget: int = CHUNK_BYTES, *, products: torch.dtype | None = None, kernel: bool = False) -> int:
    """Samples per chunk for ``n`` samples of a ``(C, D)`` head in ``dtype``, whose products run in
    ``products`` (default: the accumulation dtype; see :func:`products_dtype`).

    Products in the accumulation dtype: per sample a chunk holds ``buffers`` rows of ``C`` accumulation-dtype
    numbers (see :func:`class_buffers`) and, for upcast bfloat16/float16 input, two ``D``-rows more (the
    upcast input and its gradient): ``rows = budget // (acc_bytes * (buffers * C + 2 D [upcast]))``.
    Low-precision products: the logits row in ``products`` plus either its gradient row in ``products``
    (``kernel``, the C row kernel) or ``buffers`` accumulation-dtype rows (the torch row step on a copy):
    ``rows = budget // (C * (2 p_bytes [kernel] | p_bytes + buffers * acc_bytes))``. At least
    ``MIN_ROWS``, at most ``n``.
    """
    acc = accumulation_dtype(dtype)
    acc_bytes, mm = acc.itemsize, products or acc
    if mm != acc:
        per_row = n_classes * (2 * mm.itemsize if kernel else mm.itemsize + buffers * acc_bytes)
    else:
        per_row = acc_bytes * (buffers * n_classes + (2 * in_features if dtype != acc else 0))
    return max(1, min(n, max(MIN_ROWS, budget // per_row)))


@functools.cache
def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware: AMX (``amx_bf16``) or AVX512-BF16
    (``avx512_bf16``), as ``torch.cpu.get_capabilities()`` reports them (cpuinfo; the flags of the same
    names in /proc/cpuinfo). Decided by capability, not by a timing: measured on a 2-core AMD EPYC (Zen 4,
    AVX512-BF16, no AMX), torch 2.13, N=2048, D=1024, C=32768, the three bfloat16 products took 3.45 s
    against 8.54 s in float32 (loaded machine, minimum of 3), so bfloat16 GEMMs are native there; on an
    AVX2 CPU torch emulates them about 5x slower than float32 (see the module docstring). ARM's bf16
    extensions are left out until measured."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def products_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the three products run in for operands of ``dtype`` on ``device``.

    float32/float64: themselves. bfloat16/float16 on CUDA (tensor cores), and bfloat16 on a CPU that
    multiplies it in hardware (:func:`cpu_multiplies_bfloat16`): themselves, with float32
    accumulation. Anywhere else (a CPU that emulates 16-bit products) the accumulation dtype: the
    operands are upcast to float32.
    """
    acc = accumulation_dtype(dtype)
    if dtype == acc or device.type == "cuda":
        return dtype
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_multiplies_bfloat16():
        return dtype
    return acc


def row_kernel(x: Tensor, target: Tensor, spec: RowSpec, softcap: float | None, impl: str, *,
               per_position: bool) -> Callable | None:
    """The ``xent_rows`` kernel that runs a chunk's cross-entropy step, or None for the torch row step.

    A kernel (:mod:`losskit.ops._dispatch` picks it from ``impl`` and the device: the C kernel on CPU,
    Triton on CUDA) reads the chunk's logits in their dtype and writes their gradient, computing in
    float32, for what it computes (no softcap, z-loss or statistics) with one scale for every position
    (``per_position``: "none"'s grad_output). The C kernel wants contiguous rows, so on CPU it runs
    only on the row-major low-precision chunks; the Triton kernel takes any strides, so on CUDA it runs
    in every dtype. Otherwise the torch row step runs (on a float32 copy of a low-precision chunk).
    """
    if softcap or spec.z_loss or spec.argmax or spec.gamma or per_position:
        return None
    backend = _dispatch.backend("xent_rows", impl, x, target, spec.weight)
    if backend == _dispatch.CPU and products_dtype(x.dtype, x.device) != accumulation_dtype(x.dtype):
        return _dispatch.kernel("xent_rows", backend)
    if backend == _dispatch.TRITON:
        return _dispatch.kernel("xent_rows", backend)
    return None


def weight_grad_block(n_classes: int, in_features: int, products: torch.dtype, acc: torch.dtype,
                      device: torch.device) -> tuple[Tensor, Tensor | None] | None:
    """The buffers in which :func:`weight_grad_` forms a block of a low-precision product, or None when
    the products run in ``acc``: ``(product, staging)``, each ``(block, D)``. On the CPU the product is in
    the products' dtype (torch's CPU GEMM has no float32 output for bfloat16 operands) and ``staging``
    is its float32 copy, made before the add (torch's add of a bfloat16 tensor to a float32 one would
    allocate that copy on every call: measured 0.13 s against 0.02 s for the (32768, 1024) gradient).
    On CUDA the product is float32 (``out_dtype``) and there is no staging. ``WEIGHT_BLOCK_BYTES`` of
    product (``CUDA_WEIGHT_BLOCK_BYTES`` on CUDA), at most C rows."""
    if products == acc:
        return None
    if device.type == "cuda":
        rows = max(1, min(n_classes, CUDA_WEIGHT_BLOCK_BYTES // (in_features * acc.itemsize)))
        return torch.empty(rows, in_features, dtype=acc, device=device), None
    rows = max(1, min(n_classes, WEIGHT_BLOCK_BYTES // (in_features * products.itemsize)))
    return (torch.empty(rows, in_features, dtype=products, device=device),
            torch.empty(rows, in_features, dtype=acc, device=device))


def weight_grad_(out: Tensor, grad: Tensor, x: Tensor, *, first: bool,
                 block: tuple[Tensor, Tensor | None] | None) -> None:
    """GEMM 3: ``out = grad.T @ x`` (``first``) or ``out += grad.T @ x``; ``out`` (C, D) acc, ``grad``
    (r, C) and ``x`` (r, D) in the products' dtype. Low-precision products (``block`` from
    :func:`weight_grad_block`) are formed a block of classes at a time and added to ``out``, so the
    weight gradient is a float32 sum of the chunks' products, rounded once at the end."""
    if block is None:
        torch.mm(grad.T, x, out=out) if first else out.addmm_(grad.T, x)
        return
    product, staging = block
    for c0 in range(0, out.shape[0], product.shape[0]):
        c1 = min(out.shape[0], c0 + product.shape[0])
        part = product[:c1 - c0]  # (c, D)
        if staging is None:  # CUDA: bfloat16/float16 operands, float32 output
            torch.mm(grad[:, c0:c1].T, x, out_dtype=out.dtype, out=part)
        else:
            torch.mm(grad[:, c0:c1].T, x, out=part)
            if not first:
                part = staging[:c1 - c0].copy_(part)
        out[c0:c1].copy_(part) if first else out[c0:c1].add_(part)


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
    impl: str = "auto"

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
    grad_weight: Tensor | None  # (C, L, D) acc (the products' float32 sum, rounded once by the caller)
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
    mm = products_dtype(x.dtype, dev)
    low = mm != acc  # products in bfloat16/float16, float32 accumulators beside them
    upcast = x.dtype != mm
    want_grad = want_input or want_weight or want_bias
    row_fn = row_kernel(x, p.target, p.spec, p.softcap, p.impl,
                        per_position=isinstance(scale, Tensor) and scale.dim() > 0)
    kernel = row_fn is not None
    class_weight = None if p.spec.weight is None else p.spec.weight.contiguous()

    w_mm = p.w.to(mm)  # (C, L, D) GEMM operand; when upcast, one float32 copy of the head
    b_mm = None if p.b is None else p.b.to(mm)
    loss = torch.empty(n, length, dtype=acc, device=dev)
    lse = torch.empty(n, length, dtype=acc, device=dev) if p.spec.argmax else None
    top = torch.empty(n, length, dtype=torch.int64, device=dev) if p.spec.argmax else None
    gx = torch.empty(n, d, dtype=x.dtype, device=dev) if want_input else None
    # grad_W accumulates in acc; the first chunk writes it (no zero-fill pass), unless no chunk runs.
    gw = (torch.empty if n else torch.zeros)(n_classes, length, d, dtype=acc, device=dev) if want_weight else None
    gb = torch.zeros(n_classes, length, dtype=acc, device=dev) if want_bias else None
    gt = torch.empty(p.target.shape, dtype=p.target.dtype, device=dev) if want_target else None

    # The chunk's buffers, allocated once (see chunk_rows for their count and size). In acc the logits
    # are class-major (C, rows) and become their gradient in place; a short last chunk is the (C, r)
    # column slice, which BLAS writes directly (row stride rows >= r). In low precision they are
    # row-major (rows, C), the C row kernel's contiguous rows, and the gradient goes to a second
    # (rows, C) buffer (the kernel) or back into the logits' (the torch row step, from an acc copy).
    rows = max(1, min(p.rows, n))
    logits_all = torch.empty((rows, n_classes) if low else (n_classes, rows), dtype=mm, device=dev)
    grad_all = torch.empty(rows, n_classes, dtype=mm, device=dev) if kernel and want_grad else None
    work_all = torch.empty(rows, n_classes, dtype=acc, device=dev) if low and not kernel else None
    tanh_all = torch.empty(n_classes, rows, dtype=acc, device=dev) if p.softcap and want_grad else None
    tg_all = torch.empty(rows, n_classes, dtype=acc, device=dev) if want_target and not kernel else None
    x_all = torch.empty(rows, d, dtype=mm, device=dev) if upcast else None  # (rows, D) upcast input
    # (rows, D) acc: the input gradient summed over the L positions (low precision), or upcast
    gx_all = torch.empty(rows, d, dtype=acc, device=dev) if want_input and (upcast or low and length > 1) else None
    loss_all = torch.empty(rows, dtype=acc, device=dev) if kernel else None  # the kernel's (rows,) loss
    block = weight_grad_block(n_classes, d, mm, acc, dev) if want_weight else None
    kernel_scale = scale if kernel else 0.0  # one scale for every position (row_kernel)

    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        r = n1 - n0
        x_c = x_all[:r].copy_(x[n0:n1]) if upcast else x[n0:n1]  # (r, D)
        gx_c = None if gx is None else gx_all[:r] if gx_all is not None else gx[n0:n1]  # (r, D)
        for l in range(length):
            w_l = w_mm[:, l]  # (C, D), row stride L * D
            b_l = None if b_mm is None else b_mm[:, l]
            t = p.target[n0:n1, :, l] if p.probabilities else p.target[n0:n1, l]
            if low:  # GEMM 1: logits (r, C), bias added before the one rounding to mm
                logits = logits_all[:r]
                torch.mm(x_c, w_l.T, out=logits) if b_l is None else torch.addmm(b_l, x_c, w_l.T, out=logits)
            else:  # GEMM 1: logits, class-major (C, r), seen as (r, C)
                torch.mm(w_l, x_c.T, out=logits_all[:, :r])
                logits = logits_all[:, :r].T
                if b_l is not None:
                    logits.add_(b_l)
            if kernel:
                grad = None if grad_all is None else grad_all[:r]
                gt_l = None if gt is None else gt[n0:n1, :, l]
                row_fn(logits.unsqueeze(2), t.unsqueeze(2) if p.probabilities else t.contiguous(),
                                 None if grad is None else grad.unsqueeze(2),
                                 None if gt_l is None else gt_l.unsqueeze(2), class_weight, loss_all[:r],
                                 ignore_index=p.spec.ignore_index, label_smoothing=p.spec.label_smoothing,
                                 gamma=0.0, scale=kernel_scale)
                loss[n0:n1, l] = loss_all[:r]
            else:
                work = work_all[:r].copy_(logits) if low else logits  # (r, C) acc
                tanh = None if tanh_all is None else tanh_all[:, :r].T  # (r, C)
                _softcap_(work, p.softcap, tanh)
                s = scale[n0:n1, l] if isinstance(scale, Tensor) and scale.dim() else scale
                tg = None if tg_all is None else tg_all[:r]
                res = xent_rows_(work, t.to(acc) if p.probabilities else t, p.spec, s, want_grad, tg)
                loss[n0:n1, l] = res.loss
                if top is not None:
                    lse[n0:n1, l] = res.lse
                    top[n0:n1, l] = res.argmax
                if gt is not None:
                    gt[n0:n1, :, l] = tg
                if tanh is not None:
                    work.addcmul_(work, tanh.square_(), value=-1)  # d/dz c tanh(z / c) = 1 - tanh^2
                grad = logits.copy_(work) if low and want_grad else work  # (r, C): scale * dloss/dlogits
            if gb is not None:
                gb[:, l] += grad.sum(0, dtype=acc)
            if gx_c is not None:  # GEMM 2: (r, C) @ (C, D), summed over the L positions
                if l == 0:
                    torch.mm(grad, w_l, out=gx_c) if gx_c.dtype == mm else gx_c.copy_(grad @ w_l)
                else:
                    gx_c.addmm_(grad, w_l) if gx_c.dtype == mm else gx_c.add_(grad @ w_l)
            if gw is not None:  # GEMM 3: (C, r) @ (r, D), accumulated in acc
                weight_grad_(gw[:, l], grad, x_c, first=n0 == 0, block=block)
        if gx_all is not None and gx is not None:
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
