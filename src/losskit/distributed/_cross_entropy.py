"""``vocab_parallel_cross_entropy`` and ``vocab_parallel_linear_cross_entropy``: validation and drivers.

Both validate their arguments on every rank, exchange the outcome and the vocabulary layout in one
``all_gather`` (:func:`._comm.exchange`), then run the two passes of :class:`._shard.ShardXent` over
blocks of the local logits: read from the input for the first, computed block by block from
``input @ linear_weight.T`` for the second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

from .. import _checks
from .._autograd import attach, needs_grad
from .._types import REDUCTIONS, Impl, Reduction
from ..functional._classification import _class_dim, _index_shape, check_class_input
from ..ops import _dispatch
from ..ops.blocks import Block, accumulation_dtype, as_3d, block_rows, blocks, positions_2d, work_buffer
from ..ops.linear_xent import WeightGradSum, products_dtype
from ._comm import Comm, Fields, default_device, exchange, float_bits, require_same, resolve
from ._shard import Shard, ShardXent

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

#: Bytes of the ``(rows, V_r)`` logits chunk of the fused linear head. Each chunk's matmul reads all of
#: ``linear_weight`` (V_r x D), i.e. ``rows`` flops per weight element read, so the chunk is larger than a
#: cache block: 32 MiB is 256 rows at V_r = 32768 in float32 (64 rows at V_r = 131072).
LINEAR_BLOCK_BYTES = 32 << 20

# The header every rank sends (one int64 each). The first is the layout, the next two are reduced
# (min/max over ranks); every other field must be the same on all ranks, because the collectives that
# follow (their number and sizes) or the result depend on it.
_NAMES = ("vocabulary shard", "target min", "target max", "number of target positions", "target",
          "ignore_index", "reduction", "label_smoothing", "weight", "vocab_size", "input dtype", "hidden size",
          "input.requires_grad")
_AGREED = _NAMES[3:]
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SAME_HINT = " (target, weight, options and dtype are the same on every rank; only the vocabulary is split)"


def _shared_fields(input: Tensor, target: Tensor, weight: object, ignore_index: object, reduction: object,
                   label_smoothing: object, vocab_size: object) -> Fields:
    """Validate the options and summarise target and weight in header fields (no device sync here)."""
    _checks.reduction(reduction)
    _checks.integer("ignore_index", ignore_index)
    smoothing = _checks.number_in("label_smoothing", label_smoothing, 0.0, 1.0)
    if vocab_size is not None:
        _checks.integer("vocab_size", vocab_size)
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive number of classes, got {vocab_size}")
    weight_sig: int | Tensor = -1
    if weight is not None:
        w = _checks.floating("weight", weight)
        if w.dim() != 1:
            raise ValueError(f"weight must be a 1-D tensor with one entry per class of the whole vocabulary, "
                             f"got shape {tuple(w.shape)}")
        _checks.same_device("weight", w, "input", input)
        _checks.no_grad_required("weight", w)
        weight_sig = float_bits((w.double() * torch.arange(1, w.numel() + 1, device=w.device)).sum())
    t = target.reshape(-1).long()
    inside = t.masked_fill(t == ignore_index, 0)  # class 0 exists in every vocabulary
    return {
        "target min": inside.min() if t.numel() else 0,
        "target max": inside.max() if t.numel() else 0,
        "number of target positions": t.numel(),
        "target": (t * torch.arange(1, t.numel() + 1, device=t.device)).sum(),  # int64 checksum, wraps
        "ignore_index": ignore_index,
        "reduction": REDUCTIONS.index(reduction),
        "label_smoothing": float_bits(smoothing),
        "weight": weight_sig,
        "vocab_size": -1 if vocab_size is None else vocab_size,
        "input dtype": _DTYPES.index(input.dtype) if input.dtype in _DTYPES else len(_DTYPES),
    }


def _layout(comm: Comm, caller: str, local: Callable[[], Fields], input: object, weight: Tensor | None,
            vocab_size: int | None) -> tuple[Shard, Tensor | None]:
    """Exchange the headers and decide, identically on every rank, the layout or the error."""
    table = exchange(comm, default_device(comm, input), caller, _NAMES, local)
    require_same(table, _AGREED, _SAME_HINT)
    sizes = table["vocabulary shard"]
    total = sum(sizes)
    split = f" split as {sizes} over ranks 0..{comm.world - 1}" if comm.active else ""
    if vocab_size is not None and total != vocab_size:
        raise ValueError(f"vocab_size is {vocab_size} but the vocabulary shards hold {total} classes{split}: "
                         f"each rank must hold a contiguous range of classes, ranks in order, covering the vocabulary")
    if weight is not None and weight.numel() != total:  # dtype, shape, device: checked locally
        raise ValueError(f"weight has {weight.numel()} entries, one per class of the whole vocabulary, but the "
                         f"vocabulary shards hold {total} classes{split}")
    low, high = min(table["target min"]), max(table["target max"])
    if low < 0 or high >= total:
        raise ValueError(f"target contains class index {low if low < 0 else high}, outside [0, {total}) for a "
                         f"vocabulary of {total} classes{split}")
    return Shard(sum(sizes[:comm.rank]), sizes[comm.rank], total), weight


def vocab_parallel_cross_entropy(input: Tensor, target: Tensor, *, group: ProcessGroup | None = None,
                                 weight: Tensor | None = None, ignore_index: int = -100, reduction: Reduction = "mean",
                                 label_smoothing: float = 0.0, vocab_size: int | None = None,
                                 impl: Impl = "auto") -> Tensor:
    r"""Cross-entropy of logits split by vocabulary across the ranks of ``group``, never gathering them.

    Rank ``r`` holds ``input`` = the logits of a contiguous range of classes, ranks in order: shape
    ``(V_r,)``, ``(N, V_r)`` or ``(N, V_r, d1, ..., dk)`` (shard sizes may differ). ``target`` (global
    class indices), ``weight`` (one entry per class of the whole vocabulary, ``(V,)``) and every option
    are the same on every rank. Every rank returns the same loss

    .. code-block:: python

        F.cross_entropy(torch.cat(shards, dim=1), target, weight, ignore_index=ignore_index,
                        reduction=reduction, label_smoothing=label_smoothing)

    and receives the gradient of its own shard. The formula is :func:`losskit.functional.cross_entropy`'s:
    with ``p = log_softmax`` over the whole vocabulary ``V``, :math:`\ell = (1 - s) w_y (-p_y) + \frac{s}{V}
    \sum_c w_c (-p_c)` (0 where ``y == ignore_index``; ``s/V`` is torch's smoothing, not ``s/(V-1)``), and
    "mean" divides the sum by :math:`\sum w_y` over non-ignored positions. Class-index targets only.

    ``group=None`` (the default) or a group of one rank: a single process, no collectives, the result of
    :func:`losskit.functional.cross_entropy` on ``input``; pass the tensor-parallel group to split.
    ``vocab_size``, when given, is checked against the sum of the
    shard sizes. Invalid arguments on any rank raise on every rank (no deadlock).

    Each rank's two passes over its logits (the statistics, then the gradient) are one Triton kernel
    each on CUDA (:mod:`losskit.ops.triton.shard`; ``impl="triton"``, or ``"auto"``/``"compiled"`` on
    CUDA tensors), and cache-sized blocks of torch ops elsewhere (``impl="torch"``, or ``"auto"`` on CPU).

    Communication, ``P`` target positions, accumulation dtype of ``a`` bytes (4, 8 for float64): one
    ``all_gather`` of 14 int64 per rank (checks and layout), then ``all_reduce`` MAX of ``P`` values and
    ``all_reduce`` SUM of ``2P`` values (``3P`` with label smoothing): ``3a`` bytes (``4a``) per token,
    3 collectives per call whatever ``P``. Backward communicates nothing. One device-to-host copy
    (the header) per call.

    Output dtype: the input's; shape ``()`` for "mean"/"sum", the target's for "none".

    Example (one process, so the shard is the whole vocabulary):
        >>> import torch
        >>> from losskit.distributed import vocab_parallel_cross_entropy
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
        >>> vocab_parallel_cross_entropy(logits, torch.tensor([0, 2]))
        tensor(0.1755)
    """
    caller = "vocab_parallel_cross_entropy"
    comm = resolve(group, none_is_world=False)
    (want_x,) = needs_grad(input if isinstance(input, Tensor) else None)

    def local() -> Fields:
        check_class_input(input, target, probabilities_allowed=False)
        fields = _shared_fields(input, target, weight, ignore_index, reduction, label_smoothing, vocab_size)
        _dispatch.backend("shard_stats", impl, input)  # an impl this rank cannot run raises on every rank
        return {"vocabulary shard": input.shape[_class_dim(input)], **fields}

    shard, weight = _layout(comm, caller, local, input, weight, vocab_size)
    with torch.no_grad():
        loss, grad = _xent(comm, shard, input, target, weight, ignore_index, reduction, float(label_smoothing), want_x,
                           impl)
    return attach(loss, (input,), (grad,), expand_dim=_class_dim(input))


def _xent(comm: Comm, shard: Shard, input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
          reduction: str, label_smoothing: float, want_x: bool, impl: str) -> tuple[Tensor, Tensor | None]:
    acc = accumulation_dtype(input.dtype)
    x3 = as_3d(input)  # (N, V_r, L)
    n, v_r, length = x3.shape
    core = ShardXent(positions_2d(target, n).long(), shard, None if weight is None else weight.to(acc),
                     ignore_index, label_smoothing, acc)
    if _dispatch.backend("shard_stats", impl, input) == _dispatch.TRITON:
        # One kernel per pass over the whole shard: s bytes read by the statistics, 2s by the gradient.
        _dispatch.kernel("shard_stats", _dispatch.TRITON)(x3, core.safe, core.owned, core.w_local, core.m, core.packed,
                                                          smoothing=bool(label_smoothing))
        loss = core.finish(comm, reduction)
        grad = None
        if want_x:
            grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)  # contiguous: as_3d is a view
            _dispatch.kernel("shard_grad", _dispatch.TRITON)(x3, core.big_m, core.alpha_over_s, core.beta, core.g,
                                                             core.safe, core.owned, core.w_local, as_3d(grad))
        if reduction == "none":
            loss = loss.view(_index_shape(input))
        return loss.to(input.dtype), grad
    # work: (rows, V_r) in acc, BLOCK_BYTES; reused by both passes.
    rows = block_rows(v_r, torch.finfo(acc).bits // 8)
    buf = work_buffer(min(rows, n * length), v_r, acc, input.device)

    def load(blk: Block) -> Tensor:
        work = buf[:blk.rows]
        work.view(blk.b1 - blk.b0, blk.l1 - blk.l0, v_r).copy_(blk.of(x3))
        return work

    for blk in blocks(n, length, rows):
        core.stats_block_(blk, load(blk))
    loss = core.finish(comm, reduction)
    grad = None
    if want_x:
        grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)  # contiguous: as_3d is a view
        g3 = as_3d(grad)
        for blk in blocks(n, length, rows):
            work = load(blk)
            core.grad_block_(blk, work)
            blk.of(g3).copy_(work.view(blk.b1 - blk.b0, blk.l1 - blk.l0, v_r))
    if reduction == "none":
        loss = loss.view(_index_shape(input))
    return loss.to(input.dtype), grad


def vocab_parallel_linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                                        group: ProcessGroup | None = None, linear_bias: Tensor | None = None,
                                        weight: Tensor | None = None, ignore_index: int = -100,
                                        reduction: Reduction = "mean", label_smoothing: float = 0.0,
                                        vocab_size: int | None = None) -> Tensor:
    r"""Fused output layer and cross-entropy with the layer split by vocabulary across ranks.

    ``input`` (hidden states, ``(*, D)``), ``target`` (``(*)``, global class indices), ``weight`` and the
    options are the same on every rank; rank ``r`` holds ``linear_weight`` ``(V_r, D)`` (and
    ``linear_bias`` ``(V_r,)``), the rows of a contiguous range of classes, ranks in order. Every rank
    returns the same loss

    .. code-block:: python

        F.cross_entropy(F.linear(input, torch.cat(weights), torch.cat(biases)).flatten(0, -2),
                        target.flatten(), weight, ignore_index=..., reduction=..., label_smoothing=...)

    (for "none" reshaped to ``target``'s shape) and no rank holds more than a ``LINEAR_BLOCK_BYTES``
    chunk of logits: ``input @ linear_weight.T`` is computed and consumed chunk by chunk, twice (statistics,
    then gradients). The gradient of ``input`` is the sum over ranks (reduced in the forward pass, in the
    accumulation dtype); ``linear_weight`` and ``linear_bias`` get their own shard's gradient. The loss
    formula, options, ``group`` and ``vocab_size`` are :func:`vocab_parallel_cross_entropy`'s.
    For ``reduction="none"`` the gradients of ``linear_weight`` and ``linear_bias`` depend on
    ``grad_output``: the forward pass then computes the loss only, and backward runs the gradient pass
    (with the input gradient's ``all_reduce``, so every rank of the group must call backward).

    Communication: :func:`vocab_parallel_cross_entropy`'s, plus, when ``input`` requires grad, one
    ``all_reduce`` SUM of ``P x D`` values in the accumulation dtype (``a * D`` bytes per token), in
    the forward pass (in backward for the recomputing "none" case above).
    Memory beside the gradients: one logits chunk, and for float16/bfloat16 float32 accumulators of
    the ``input`` and ``linear_weight`` gradients. The logits and the input gradient are products in
    the input's dtype; the weight gradient's too where the hardware multiplies it natively (see
    :func:`losskit.ops.linear_xent.products_dtype`), summed in float32, and else a float32 product.

    Example (one process):
        >>> import torch
        >>> from losskit.distributed import vocab_parallel_linear_cross_entropy
        >>> hidden = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
        >>> classifier = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> vocab_parallel_linear_cross_entropy(hidden, classifier, torch.tensor([0, 2]))
        tensor(0.4813)
    """
    caller = "vocab_parallel_linear_cross_entropy"
    comm = resolve(group, none_is_world=False)
    want_h, want_w, want_b = needs_grad(*(t if isinstance(t, Tensor) else None
                                          for t in (input, linear_weight, linear_bias)))

    def local() -> Fields:
        x = _checks.floating("input", input)
        w = _checks.floating("linear_weight", linear_weight)
        if x.dim() == 0:
            raise ValueError("input must have a hidden dimension: shape (*, D), got ()")
        if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"linear_weight must have shape (V_r, D) with V_r >= 1 and D = {x.shape[-1]} (input's "
                             f"last dimension), got {tuple(w.shape)}")
        for name, value in (("linear_weight", w), ("linear_bias", linear_bias)):
            if value is not None and (_checks.floating(name, value).dtype != x.dtype):
                raise TypeError(f"{name} must have input's dtype {x.dtype}, got {value.dtype}")
            if value is not None:
                _checks.same_device(name, value, "input", x)
        if linear_bias is not None and linear_bias.shape != (w.shape[0],):
            raise ValueError(f"linear_bias must have shape ({w.shape[0]},) like linear_weight's rows, got "
                             f"{tuple(linear_bias.shape)}")
        t = _checks.tensor("target", target)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"target must hold class indices with an integer dtype, got {t.dtype}")
        if t.shape != x.shape[:-1]:
            raise ValueError(f"target must have shape {tuple(x.shape[:-1])} for input of shape {tuple(x.shape)}, got "
                             f"{tuple(t.shape)}")
        _checks.same_device("target", t, "input", x)
        fields = _shared_fields(x, t, weight, ignore_index, reduction, label_smoothing, vocab_size)
        return {"vocabulary shard": w.shape[0], **fields, "hidden size": x.shape[-1],
                "input.requires_grad": int(want_h)}

    shard, weight = _layout(comm, caller, local, input, weight, vocab_size)
    with torch.no_grad():
        head = _Head(comm, shard, input, linear_weight, linear_bias, target, weight, ignore_index,
                     float(label_smoothing))
        loss = head.loss(reduction)
        loss = (loss.view(target.shape) if reduction == "none" else loss).to(input.dtype)
    tensors = (input, linear_weight, linear_bias)
    if reduction == "none" and (want_w or want_b):
        return _RecomputeNone.apply(head, loss, *tensors)
    with torch.no_grad():
        grads = _like(head.grads(head.core, (want_h, want_w, want_b)), tensors)
    kept = [(t, g) for t, g in zip(tensors, grads) if t is not None]
    return attach(loss, [t for t, _ in kept], [g for _, g in kept], expand_dim=-1)


class _Head:
    """The fused head of one call: the input rows ``h2`` (P, D), this rank's classifier shard ``lw``
    (V_r, D) and ``lb`` (V_r,), and the per-position state of the loss. Positions are the rows of ``h2``,
    walked as ``(P, 1)`` blocks of ``rows`` rows; each pass allocates its own ``(rows, V_r)`` chunk, so
    nothing of that size outlives a pass (LINEAR_BLOCK_BYTES)."""

    def __init__(self, comm: Comm, shard: Shard, input: Tensor, lw: Tensor, lb: Tensor | None, target: Tensor,
                 weight: Tensor | None, ignore_index: int, label_smoothing: float) -> None:
        self.comm, self.lw, self.lb = comm, lw, lb
        self.acc = accumulation_dtype(input.dtype)
        self.h2 = input.reshape(-1, input.shape[-1])
        self.core = ShardXent(target.reshape(-1, 1).long(), shard, None if weight is None else weight.to(self.acc),
                              ignore_index, label_smoothing, self.acc)
        self.rows = block_rows(lw.shape[0], torch.finfo(self.acc).bits // 8, LINEAR_BLOCK_BYTES)

    def _chunks(self) -> Iterator[tuple[Block, Tensor]]:
        """Each block and its logits ``h2[rows] @ lw.T + lb``, (rows, V_r) in acc, in one reused buffer."""
        n = self.h2.shape[0]
        buf = work_buffer(min(self.rows, n), self.lw.shape[0], self.acc, self.h2.device)
        for blk in blocks(n, 1, self.rows):
            work, hc = buf[:blk.rows], self.h2[blk.b0:blk.b1]
            if hc.dtype == self.acc:
                torch.mm(hc, self.lw.t(), out=work)
                if self.lb is not None:
                    work.add_(self.lb)
            else:  # the low-precision logits F.linear gives, as the reference computes them
                work.copy_(F.linear(hc, self.lw, self.lb))
            yield blk, work

    def loss(self, reduction: str) -> Tensor:
        """Pass 1 and the collectives: the loss of every position, reduced (in acc)."""
        for blk, work in self._chunks():
            self.core.stats_block_(blk, work)
        return self.core.finish(self.comm, reduction)

    def grads(self, core: ShardXent, want: Sequence[bool]) -> list[Tensor | None]:
        """Pass 2 with ``core``'s factors: the gradients of input (all-reduced over the group),
        linear_weight and linear_bias where ``want``, in acc: (P, D), (V_r, D), (V_r,)."""
        want_h, want_w, want_b = want
        (n, d), v_r, dev = self.h2.shape, self.lw.shape[0], self.h2.device
        gh = torch.zeros(n, d, dtype=self.acc, device=dev) if want_h else None
        gw = torch.zeros(v_r, d, dtype=self.acc, device=dev) if want_w else None
        gb = torch.zeros(v_r, dtype=self.acc, device=dev) if want_b else None
        # The weight gradient's products in bfloat16/float16 where the hardware multiplies them (a float32
        # sum, see ops.linear_xent.WeightGradSum), else in float32 from the upcast input.
        mm = products_dtype(self.h2.dtype, dev)
        gw_sum = WeightGradSum(gw.unsqueeze(1), mm) if gw is not None else None  # (V_r, 1, D) view
        if any(want):
            for blk, work in self._chunks():
                core.grad_block_(blk, work)  # logits -> scale * dloss/dlogits
                low = None if self.lw.dtype == self.acc else work.to(self.lw.dtype)  # (rows, V_r)
                if gh is not None:
                    gh[blk.b0:blk.b1] = (work if low is None else low) @ self.lw
                if gw_sum is not None:
                    hc = self.h2[blk.b0:blk.b1]  # (rows, D)
                    g, x = (work, hc.to(self.acc)) if mm == self.acc else (low, hc)
                    gw_sum.add_(0, g, x, first=False)
                if gb is not None:
                    gb.add_(work.sum(0))
        if gh is not None:
            self.comm.all_reduce_(gh, "sum")
        return [gh, gw, gb]


def _like(grads: Sequence[Tensor | None], tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Accumulators cast to each tensor's dtype and shape (None where no gradient)."""
    return [None if g is None or t is None else g.to(t.dtype).view(t.shape) for g, t in zip(grads, tensors)]


class _RecomputeNone(torch.autograd.Function):
    """reduction="none" with linear_weight or linear_bias requiring grad: their gradient is a
    grad_output-weighted sum over positions, which no tensor precomputed in the forward pass can give.
    The forward keeps the per-position state (O(P)); backward folds grad_output into it and runs pass 2
    (one more logits product per chunk), with the input gradient's all_reduce, so every rank of the
    group must run this backward, as tensor-parallel training does."""

    @staticmethod
    def forward(ctx, head, loss, input, linear_weight, linear_bias):  # type: ignore[override]
        ctx.head = head
        ctx.save_for_backward(input, linear_weight, linear_bias)  # refuses backward after in-place edits
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        head: _Head = ctx.head
        tensors = ctx.saved_tensors
        with torch.no_grad():
            core = head.core.scaled(grad_output.reshape(-1, 1).to(head.acc))
            grads = head.grads(core, ctx.needs_input_grad[2:])
        return (None, None, *_like(grads, tensors))
