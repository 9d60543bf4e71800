"""Driver of the compiled elementwise kernels (``_native_binary``, ``_native_pointwise``): one C call over
contiguous operands, or contiguous pieces of the others.

:func:`run` hands a C ``call`` contiguous operands of ``n`` elements each::

    call(ins, outs) -> float     # ins: inputs (or None), outs: outputs (or None); returns the loss sum

The inputs are broadcastable to ``shape`` (input, target, weight, ...); the outputs have ``shape``
(gradients, the unreduced loss), except a *row output* of ``shape[:-1]`` (the loss sum of each row over
the last dim). When every input is contiguous and of the full shape, that is one call. Otherwise the
call is repeated over the pieces of :func:`losskit.ops.reference.elementwise.pieces` (at most ``CHUNK``
elements, cache-sized): each is a contiguous range of the flattened shape, so the outputs are written in
place and only the piece of an input that is strided or broadcast is copied. Never a copy of a whole
input. :data:`losskit.ops.reference.elementwise.Runner` is the signature of its ``run``, which the compiled
losses implement with this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..reference import elementwise

#: ``call(ins, outs) -> loss sum`` over contiguous pieces, see the module docstring.
Call = Callable[[Sequence[Tensor | None], Sequence[Tensor | None]], float]


def run(call: Call, ins: Sequence[Tensor | None], outs: Sequence[Tensor | None], shape: torch.Size, *,
        one_call: bool = True, chunk: int | None = None) -> float:
    """``call`` over ``shape`` (see the module docstring); returns the sum of its results.

    ``outs`` are contiguous tensors of ``shape``, or row outputs of ``shape[:-1]``: a piece that holds
    whole rows gets the rows' part of a row output; a piece that is part of one row (a row longer than a
    piece) gets None for it, and the sum the call returns for that piece is added to the row's entry.
    ``one_call=False`` forces pieces even for contiguous inputs (when the call converts an input, say).
    """
    numel = shape.numel()
    if one_call and all(t is None or (t.is_contiguous() and t.numel() == numel) for t in ins):
        return call(ins, outs)
    ndim, total = len(shape), 0.0
    for idx in elementwise.pieces(shape, chunk):
        part_of_row = len(idx) == ndim and ndim > 0  # the split dim is the last one
        piece_ins = [None if t is None else t.expand(shape)[idx].contiguous() for t in ins]
        piece_outs = [None if o is None else o[idx] if o.dim() == ndim else None if part_of_row else o[idx]
                      for o in outs]
        result = call(piece_ins, piece_outs)
        rows = [o for o in outs if o is not None and o.dim() < ndim]
        if part_of_row and rows:
            for o in rows:
                o[idx[:-1]] += result
        else:
            total += result
    return total
