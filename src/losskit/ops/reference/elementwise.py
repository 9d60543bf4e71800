"""Chunked driver of the elementwise losses (binary cross-entropy, focal, soft margin, squared error).

Reference expression: for a per-element ``kernel``, the driver computes ::

    loss, grads = kernel(*(op.expand(shape).to(acc) for op in operands), want)   # on the whole tensor

without materialising anything of the input's size but the gradients (and, for ``reduction="none"``,
the output). The operands are walked in pieces of at most ``CHUNK`` elements; a piece is a *view* of
each operand (``x[i, j, a:b]``), so a non-contiguous input or a broadcast weight is never copied whole:
only the piece is converted to the accumulation dtype. Each piece's loss is either written into the
output (``"none"``) or summed into one partial sum per piece (``"mean"``/``"sum"``), and each gradient
piece, scaled by the reduction's factor, is written into its gradient tensor.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

#: Elements per piece. A kernel keeps about eight piece-sized temporaries alive at once (the operands
#: in the accumulation dtype, a sigmoid or log, the loss, one or two gradients): 8 x 256K x 4 B = 8 MiB
#: in float32, 16 MiB in float64, which stays within the L3 (32 MiB) of the 2-core dev machine, while
#: each torch op still gets 256K elements, so its fixed ~10 us dispatch cost is a few percent of its
#: run time.
CHUNK = 1 << 18

#: ``kernel(operands, want) -> (loss, grads)``: ``operands`` are piece views in the accumulation dtype
#: (None where the operand is absent), ``want[i]`` says whether ``grads[i]`` (d loss / d operand i, for a
#: grad_output of ones and no reduction) is needed; ``grads`` may be shorter than ``operands`` and holds
#: None where nothing is wanted.
Kernel = Callable[[Sequence[Tensor | None], Sequence[bool]], tuple[Tensor, Sequence[Tensor | None]]]

#: ``runner(kernel, operands, want, *, acc, out_dtype, keep, grad_scale=1.0, sum_last_dim=False)
#: -> (loss, grads)``: :func:`run`, or a kernel backend's equivalent (``kernel`` is then the reference
#: expression of what it computes). Every backend of the ``binary`` and ``pointwise`` operations returns one.
Runner = Callable[..., tuple[Tensor, list[Tensor | None]]]

#: The kinds of the ``pointwise`` operation (what the C and Triton kernels switch on).
MSE, KL_PROB, KL_LOG = 0, 1, 2


def pieces(shape: Sequence[int], chunk: int | None = None) -> Iterator[tuple[int | slice, ...]]:
    """Index tuples that cover ``shape`` with views of at most ``chunk`` elements (default ``CHUNK``).

    The trailing dims whose product ``inner`` fits in ``chunk`` are kept whole; the dim before them
    (``split``) is cut into equal slices of about ``chunk // inner`` entries; every index of the dims
    before ``split`` is its own piece. A tensor of at most ``chunk`` elements is one piece, ``()``.
    """
    chunk = CHUNK if chunk is None else chunk
    ndim, inner = len(shape), 1
    split = ndim
    while split > 0 and inner * shape[split - 1] <= chunk:
        split -= 1
        inner *= shape[split]
    if split == 0:
        yield ()
        return
    split -= 1  # shape[split] * inner > chunk >= inner
    size = shape[split]
    n_slices = math.ceil(size / max(1, chunk // inner))
    # Balanced: slice i is [i * size // n, (i + 1) * size // n), sizes differ by at most one entry.
    bounds = [i * size // n_slices for i in range(n_slices + 1)]
    for outer in itertools.product(*map(range, shape[:split])):
        for start, stop in zip(bounds[:-1], bounds[1:]):
            yield (*outer, slice(start, stop))


def run(kernel: Kernel, operands: Sequence[Tensor | None], want: Sequence[bool], *, acc: torch.dtype,
        out_dtype: torch.dtype, keep: bool, grad_scale: Tensor | float = 1.0, sum_last_dim: bool = False,
        chunk: int | None = None) -> tuple[Tensor, list[Tensor | None]]:
    """Apply ``kernel`` piece by piece over ``operands`` (every one broadcastable to ``operands[0]``).

    Returns ``(loss, grads)``. With ``keep`` the loss is the unreduced loss in ``out_dtype`` (the
    input's shape; without its last dim if ``sum_last_dim``, the entries summed along it, in ``acc``).
    Without ``keep`` it is a 1-D ``acc`` tensor of one partial sum per piece, for the caller to reduce.
    ``grads[i]`` (operand ``i``'s shape and dtype, times ``grad_scale``) where ``want[i]``, else None.
    Must be called under ``torch.no_grad()``.
    """
    shape = operands[0].shape
    views = [None if op is None else op.expand(shape) for op in operands]
    grads = [torch.empty(op.shape, dtype=op.dtype, device=op.device) if w else None
             for op, w in zip(operands, want)]
    device = operands[0].device
    if keep and sum_last_dim:
        # Per-row sums of a piece are added in acc: a row longer than CHUNK spans several pieces.
        out = torch.zeros(shape[:-1], dtype=acc, device=device)
    elif keep:
        out = torch.empty(shape, dtype=out_dtype, device=device)
    partials: list[Tensor] = []
    for idx in pieces(shape, chunk):
        loss, gs = kernel([None if v is None else v[idx].to(acc) for v in views], want)
        if keep and sum_last_dim:
            out[idx[:len(shape) - 1]] += loss.sum(-1)
        elif keep:
            out[idx] = loss
        else:
            partials.append(loss.sum())
        for g, piece in zip(grads, gs):
            if g is not None:
                g[idx] = piece.mul_(grad_scale) if _scaled(grad_scale) else piece
    if keep:
        return out, grads
    return (torch.stack(partials) if partials else torch.zeros(0, dtype=acc, device=device)), grads


def _scaled(scale: Tensor | float) -> bool:
    return isinstance(scale, Tensor) or scale != 1.0


def runner(kind: str | int, **params: float) -> Runner:
    """The reference backend of the ``binary`` and ``pointwise`` operations: :func:`run` itself, whose
    ``kernel`` argument (the loss's torch expression, its options bound) is what it computes."""
    del kind, params  # carried by the kernel the driver passes
    return run
