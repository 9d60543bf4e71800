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
    xent_rows(logits) in place              (rows, C) bf16  read and written in bfloat16, computed in float32
    grad_b_l += grad.sum(0)                 (C,) float32
    grad_x_c = grad @ W_l                   (rows, D) bf16  GEMM 2 (float32 sum over the L positions)
    grad_W_l += grad.T @ x_c                (C, D) float32  GEMM 3 into a float32 sum (WeightGradSum)

GEMM 3 adds each chunk's product to a float32 sum, rounded to the weight's dtype once at the end: on
CUDA in one GEMM with a float32 output (``out_dtype``, where this torch has it); on the CPU, whose GEMM
has no float32 output for bfloat16 operands, formed a block of classes at a time in bfloat16 and added
to the sum (:class:`WeightGradSum`). A row kernel (:func:`row_kernel`: the C kernel
on the CPU, Triton on CUDA) turns the logits into their gradient in place, so a chunk is one buffer.
Without one (torch.compile, softcap, z-loss, statistics, "none"'s per-position scale) the torch row
step runs on a float32 copy of the chunk and writes the gradient back into the bfloat16 logits. CPUs
that emulate 16-bit products (AVX2: measured 5x slower than float32) keep the float32 path: operands
are upcast (``W`` once per call, ``x`` per chunk).

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

bfloat16, same case, the same EPYC (Zen 4: AVX512-BF16, no AMX), torch 2.13, load ~1, median of 5
(``benchmarks/lce_bfloat16.py``): this 1.12 s; the float32 upcast it replaces here 2.47 s; eager
``F.cross_entropy((x @ W.T).float(), t)`` 1.50 s, 768 MiB; torch's chunked loss 6.74 s; the three
bfloat16 products alone 1.06 s (this is 1.05x them). float32 in the same rounds: 2.36 s against the
three products' 2.48 s. Peak 188 MiB above the inputs, reached during the chunks: the float32 weight
sum (128 MiB), the input gradient (4 MiB), one 704-row chunk of logits (44 MiB) and a block of GEMM 3's
product with torch's float32 copy of it (12 MiB). The sum is then rounded over its own first half
(:func:`rounded`), never beside a separate 64 MiB result: that had made the peak 196 MiB.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _dispatch
from .blocks import accumulation_dtype
from .cpu.native import empty, round_in_place
from .reference.rows import RowSpec, xent_rows_

#: Bytes of one chunk's working buffers on the CPU. Each chunk streams the whole head through each GEMM,
#: so larger chunks make the GEMMs more efficient and mean fewer, larger elementwise calls (each a parallel
#: region that, on a loaded machine, waits for every thread to be scheduled). Measured at N=2048, D=1024,
#: C=32768 float32 on the 2-core EPYC (loaded; CPU s of GEMM 1 / 2 / 3 over the batch, row-major): 256 rows
#: 2.55 / 1.92 / 1.64, 384 rows 2.41 / 1.76 / 1.68, 448 rows 2.12 / 1.78 / 1.62, 512 rows 2.03 / 1.64 /
#: 1.61, unchunked 2.06 / 1.65 / 1.81. 56 MiB gives that case chunks of 448 rows (the last 256) and keeps
#: its peak at the gradients (136 MiB) + 56 MiB.
CHUNK_BYTES = 56 << 20
#: The same on CUDA. GEMM 3 reads and writes the (C, D) float32 weight-gradient sum once per chunk
#: (8 bytes per element) for ``2 * rows`` flops per element, so it stays compute-bound only when ``rows / 4``
#: flops per byte exceeds the GPU's balance (an H100: about 990 TFLOP/s of bfloat16 over 3.35 TB/s, ~300):
#: ``rows`` >= ~1200. 512 MiB holds 2048 rows of 128256 bfloat16 logits (turned into their gradient in
#: place), 4 chunks for 8192 tokens. Not measured: no GPU was available when this was written.
CUDA_CHUNK_BYTES = 512 << 20


def chunk_budget(device: torch.device) -> int:
    """Bytes of one chunk's buffers on ``device``: ``CUDA_CHUNK_BYTES`` on CUDA, else ``CHUNK_BYTES``."""
    return CUDA_CHUNK_BYTES if device.type == "cuda" else CHUNK_BYTES


#: Fewest rows per chunk when the vocabulary is so large that ``CHUNK_BYTES`` holds fewer: each GEMM
#: reads the whole head per chunk for ``2 * rows`` flops per element, so few rows make it memory-bound.
#: Measured at C=262144, D=1024 float32 (2 threads, loaded), GFLOP per CPU-second of the three GEMMs:
#: 32 rows 38, 64 rows 47, 128 rows 64, 256 rows 70. 128 rows of such a head is a 128 MiB chunk, an
#: eighth of its 1 GiB weight gradient.
MIN_ROWS = 128

#: Chunks hold a multiple of this many rows where the budget allows: the class-major float32 chunk's
#: rows are its leading dimension (410 rows, 1640 bytes, ran the N=2048, D=1024, C=32768 float32 case in
#: 3.02 s against 2.59 s at 448; median of 5, 2-core EPYC), and the bfloat16 GEMMs' inner dimension is
#: the rows in GEMM 3 (AVX512-BF16 multiplies pairs along it).
ALIGN_ROWS = 64

#: Bytes of the buffer a block of the weight gradient's low-precision product is formed in before it is
#: added to the float32 accumulator (:class:`WeightGradSum`'s "blocks"): a block of classes rather than
#: the whole (C, D) product, which would need (C, D) buffers beside the accumulator.
#: Measured per 448-row chunk at C=32768, D=1024 bfloat16 (2-core EPYC, load 3-5, median / minimum of 9),
#: with torch's mixed-dtype add: blocks of 1 MiB 0.66 / 0.22 s, 2 MiB 0.46 / 0.21, 4 MiB 0.34 / 0.23,
#: 8 MiB 0.35 / 0.23, 16 MiB 0.43 / 0.30; bfloat16 accumulation with no float32 sum (beta = 1) 0.26 / 0.17.
WEIGHT_BLOCK_BYTES = 4 << 20
#: The same on CUDA, where "blocks" serves only a torch without ``out_dtype`` (:func:`float32_output_gemm`)
#: and the mixed-dtype add needs no copy: large enough that each block is a GEMM worth a launch (32768
#: classes of D=4096: 4 per chunk at V=128256). Not measured: no GPU was available when this was written.
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

    Bytes per sample of a chunk:

    * ``kernel`` (a row kernel, :func:`row_kernel`, turns the logits into their gradient in place): one
      logits row in ``products``, ``C * p_bytes``;
    * low-precision products and the torch row step: the logits row in ``products`` and ``buffers``
      accumulation-dtype rows on which the step runs (see :func:`class_buffers`):
      ``C * (p_bytes + buffers * acc_bytes)``;
    * products in the accumulation dtype: ``buffers`` rows of ``C`` and, for upcast bfloat16/float16
      input, two ``D``-rows more (the upcast input and its gradient):
      ``acc_bytes * (buffers * C + 2 D [upcast])``.

    ``rows = budget // bytes``, rounded down to a multiple of ``ALIGN_ROWS``, at least ``MIN_ROWS`` and at
    most ``n``; then spread evenly over the chunks that takes, rounded up to a multiple of ``ALIGN_ROWS``
    again (2048 samples at 896 a chunk: 3 chunks, 704 + 704 + 640, not 896 + 896 + 256), so that no
    chunk runs short GEMMs and the weight gradient's sum takes as few passes as the budget allows.
    """
    acc = accumulation_dtype(dtype)
    acc_bytes, mm = acc.itemsize, products or acc
    if kernel:
        per_row = n_classes * mm.itemsize
    elif mm != acc:
        per_row = n_classes * (mm.itemsize + buffers * acc_bytes)
    else:
        per_row = acc_bytes * (buffers * n_classes + (2 * in_features if dtype != acc else 0))
    rows = budget // per_row
    rows = max(1, min(n, max(MIN_ROWS, rows - rows % ALIGN_ROWS if rows >= ALIGN_ROWS else rows)))
    if n <= rows:
        return rows
    even = -(-n // -(-n // rows))  # ceil(n / chunks)
    return min(rows, -(-even // ALIGN_ROWS) * ALIGN_ROWS)


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


def gemm_float32_(out: Tensor, a: Tensor, b: Tensor, *, accumulate: bool) -> None:
    """``out = a @ b`` or ``out += a @ b`` in one GEMM: ``a``, ``b`` bfloat16/float16, ``out`` float32,
    the products summed in float32 and added to ``out`` before any rounding (cuBLAS with a float32
    C; torch's ``out_dtype``). CUDA only, where :func:`float32_output_gemm` says this torch has it."""
    if accumulate:
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        torch.mm(a, b, out_dtype=out.dtype, out=out)


def float32_output_gemm(device: torch.device) -> bool:
    """Whether :func:`gemm_float32_` runs, and is right, on ``device``: a CUDA device whose torch has
    ``mm``/``addmm`` with ``out_dtype`` accepting a float32 ``out`` that is also ``addmm``'s input (torch
    2.4 has no ``out_dtype``; some later versions refuse a float32 input to ``addmm``). Checked once per
    device on a 2x2 product, which costs one host sync; False on other devices, while torch.compile traces
    (the trace gets the blockwise form) and while a CUDA graph is captured (which a sync would break; the
    check then waits for the first call outside a capture)."""
    return (device.type == "cuda" and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()
            and _float32_output_gemm_runs(device))


@functools.cache
def _float32_output_gemm_runs(device: torch.device) -> bool:
    try:
        a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16, device=device)
        out = torch.full((2, 2), float("nan"), device=device)
        gemm_float32_(out, a, a, accumulate=False)  # NaN in out must not survive the first product
        gemm_float32_(out, a, a.T, accumulate=True)
        return bool(torch.equal(out, a.float() @ a.float() + a.float() @ a.float().T))
    # What a torch without the GEMM raises: TypeError (no out_dtype keyword: torch 2.4), RuntimeError (a
    # refused dtype combination), NotImplementedError (no kernel for this backend). Each means "blocks".
    except (TypeError, RuntimeError, NotImplementedError):
        return False


class WeightGradSum:
    """GEMM 3 of every chunk, ``out[:, l] (+)= grad.T @ x_c``, summed into ``out`` (C, L, D) in the
    accumulation dtype (the first chunk writes it); the caller rounds it to the weight's dtype once.

    ``mode``, by the products' dtype and the device:

    * ``"blas"`` (products in the accumulation dtype): one GEMM per chunk accumulates into ``out``
      (beta = 1);
    * ``"fused"`` (low-precision products on CUDA with :func:`float32_output_gemm`): one GEMM per chunk
      with bfloat16/float16 operands accumulates into the float32 ``out`` in place (:func:`gemm_float32_`);
    * ``"blocks"`` (low-precision products elsewhere: the CPU, whose GEMM has no float32 output for
      bfloat16 operands, and CUDA without ``out_dtype``): the product is formed a block of classes at a
      time in the products' dtype and added to ``out`` (first chunk: copied) by torch's mixed-dtype
      add. A one-pass C add measured no faster: 12.7 ms against torch's 13.2 ms for the three passes of
      the N=2048, D=1024, C=32768 bfloat16 case over a (32768, 1024) sum already in memory, and 1.146 s
      against 1.148 s for the whole call (2-core EPYC, medians of 9); what had made torch's adds look slow
      was the fresh sum's page faults, which the huge-page buffer of :func:`sweep` removes.

    A block is ``WEIGHT_BLOCK_BYTES`` of product (``CUDA_WEIGHT_BLOCK_BYTES`` on CUDA), at most C rows: a
    block rather than the whole (C, D) product, which would need (C, D) buffers beside the accumulator.
    """

    def __init__(self, out: Tensor, products: torch.dtype) -> None:
        self.out = out
        acc, device = out.dtype, out.device
        n_classes, d = out.shape[0], out.shape[-1]
        self.mode = "blas" if products == acc else "fused" if float32_output_gemm(device) else "blocks"
        self.product = None
        if self.mode == "blocks":
            budget = CUDA_WEIGHT_BLOCK_BYTES if device.type == "cuda" else WEIGHT_BLOCK_BYTES
            rows = max(1, min(n_classes, budget // (d * products.itemsize)))
            self.product = torch.empty(rows, d, dtype=products, device=device)

    def add_(self, l: int, grad: Tensor, x: Tensor, *, first: bool) -> None:
        """``out[:, l] = grad.T @ x`` (``first``) or ``out[:, l] += grad.T @ x``; ``grad`` (r, C) and ``x``
        (r, D) in the products' dtype."""
        out = self.out[:, l]  # (C, D), row stride L * D
        if self.mode == "blas":
            torch.mm(grad.T, x, out=out) if first else out.addmm_(grad.T, x)
            return
        if self.mode == "fused":
            gemm_float32_(out, grad.T, x, accumulate=not first)
            return
        product = self.product
        for c0 in range(0, out.shape[0], product.shape[0]):
            c1 = min(out.shape[0], c0 + product.shape[0])
            part = torch.mm(grad[:, c0:c1].T, x, out=product[:c1 - c0])  # (c, D) in the products' dtype
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
    # grad_W accumulates in acc; the first chunk writes it (no zero-fill pass), unless no chunk runs. On the
    # CPU its pages come from the extension's huge-page mappings (see cpu.native.empty): the N=2048,
    # D=1024, C=32768 bfloat16 sum's first write and rounding took 54 ms in fresh torch.empty memory and
    # 18 ms there (10.5 ms reusing the previous call's), median of 9.
    gw = (empty((n_classes, length, d), acc, dev) if n else torch.zeros(n_classes, length, d, dtype=acc, device=dev)
          ) if want_weight else None
    gb = torch.zeros(n_classes, length, dtype=acc, device=dev) if want_bias else None
    gt = torch.empty(p.target.shape, dtype=p.target.dtype, device=dev) if want_target else None

    # The chunk's buffers, allocated once (see chunk_rows for their count and size). The logits become
    # their gradient in place: written by the row kernel (which reads each element before writing it),
    # or by the torch row step (on them in acc, or copied back from its acc copy in low precision). In
    # acc the logits are class-major (C, rows); a short last chunk is the (C, r) column slice, which BLAS
    # writes directly (row stride rows >= r). In low precision they are row-major (rows, C), the C row
    # kernel's contiguous rows.
    rows = max(1, min(p.rows, n))
    logits_all = torch.empty((rows, n_classes) if low else (n_classes, rows), dtype=mm, device=dev)
    work_all = torch.empty(rows, n_classes, dtype=acc, device=dev) if low and not kernel else None
    tanh_all = torch.empty(n_classes, rows, dtype=acc, device=dev) if p.softcap and want_grad else None
    tg_all = torch.empty(rows, n_classes, dtype=acc, device=dev) if want_target and not kernel else None
    x_all = torch.empty(rows, d, dtype=mm, device=dev) if upcast else None  # (rows, D) upcast input
    # (rows, D) acc: the input gradient summed over the L positions (low precision), or upcast
    gx_all = torch.empty(rows, d, dtype=acc, device=dev) if want_input and (upcast or low and length > 1) else None
    loss_all = torch.empty(rows, dtype=acc, device=dev) if kernel else None  # the kernel's (rows,) loss
    gw_sum = WeightGradSum(gw, mm) if gw is not None else None
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
                grad = logits  # (r, C): scale * dloss/dlogits, in place of the logits
                gt_l = None if gt is None else gt[n0:n1, :, l]
                row_fn(logits.unsqueeze(2), t.unsqueeze(2) if p.probabilities else t.contiguous(),
                       grad.unsqueeze(2) if want_grad else None, None if gt_l is None else gt_l.unsqueeze(2),
                       class_weight, loss_all[:r], ignore_index=p.spec.ignore_index,
                       label_smoothing=p.spec.label_smoothing, gamma=0.0, scale=kernel_scale)
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
            if gw_sum is not None:  # GEMM 3: (C, r) @ (r, D), accumulated in acc
                gw_sum.add_(l, grad, x_c, first=n0 == 0)
        if gx_all is not None and gx is not None:
            gx[n0:n1] = gx_c
    return Sweep(loss, lse, top, gx, gw, gb, gt)


def rounded(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (itself if already): a float32 sum rounded once to the weight's dtype. ``t`` is
    consumed. On the CPU a sum in one of the extension's buffers is rounded into its own first half and
    the second half released (:func:`losskit.ops.cpu.native.round_in_place`): the (C, D) bfloat16 result
    is never alive beside its float32 sum. Elsewhere, a copy in a buffer of
    :func:`losskit.ops.cpu.native.empty`."""
    if t.dtype == dtype:
        return t
    done = round_in_place(t, dtype)
    return done if done is not None else empty(t.shape, dtype, t.device).copy_(t)


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
