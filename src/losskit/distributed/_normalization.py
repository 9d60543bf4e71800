r"""``global_token_count`` and ``global_mean``: the helpers of the exact-normalisation recipe documented in
:mod:`losskit.distributed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

from .. import _checks
from ..ops.blocks import accumulation_dtype
from ._comm import default_device, raise_shared, resolve

__all__ = ["global_mean", "global_token_count"]


def global_token_count(target: Tensor | Sequence[Tensor], *, ignore_index: int = -100, weight: Tensor | None = None,
                       group: ProcessGroup | None = None) -> Tensor:
    r"""The denominator of the global mean: scored tokens of every micro-batch on every rank of ``group``.

    ``target``: this rank's class-index targets for the step, one tensor or one per micro-batch (any
    shapes). Returns :math:`\sum [y \ne \text{ignore\_index}]` (with class ``weight``:
    :math:`\sum w_y`, torch's weighted-mean denominator) over all of them and over all ranks, as a 0-dim
    float64 tensor (exact for counts below :math:`2^{53}`), the same on every rank. ``group=None`` is the
    default process group when torch.distributed is initialised, else this process alone.

    One ``all_reduce`` SUM of ``1 + W`` float64 (the count and one error flag per rank), then one
    device-to-host copy of the flags: an invalid argument on any rank raises on every rank.

    Example:
        >>> import torch
        >>> from losskit.distributed import global_token_count
        >>> global_token_count([torch.tensor([3, -100, 1]), torch.tensor([[0, 2], [-100, -100]])])
        tensor(4., dtype=torch.float64)
    """
    comm = resolve(group, none_is_world=True)
    targets = [target] if isinstance(target, Tensor) else target
    first = targets[0] if isinstance(targets, Sequence) and targets else None
    device = default_device(comm, first)
    error: Exception | None = None
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        total = _local_count(targets, ignore_index, weight, device)
    except Exception as exc:  # noqa: BLE001 - shared with every rank before anyone raises
        if not comm.active:
            raise
        error = exc
    if not comm.active:
        return total
    buf = torch.zeros(1 + comm.world, dtype=torch.float64, device=device)  # (count, one flag per rank)
    buf[0] = total
    buf[1 + comm.rank] = float(error is not None)
    comm.all_reduce_(buf, "sum")
    flags = buf[1:].tolist()
    raise_shared(comm, "global_token_count", error, [r for r, f in enumerate(flags) if f])
    return buf[0]


def _local_count(targets: object, ignore_index: object, weight: object, device: torch.device) -> Tensor:
    if not isinstance(targets, Sequence) or not targets:
        raise TypeError(f"target must be a tensor or a non-empty sequence of tensors, got {targets!r}")
    _checks.integer("ignore_index", ignore_index)
    w = _checks.optional_floating("weight", weight)
    if w is not None and w.dim() != 1:
        raise ValueError(f"weight must be a 1-D tensor with one entry per class, got shape {tuple(w.shape)}")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, t in enumerate(targets):
        name = f"target[{i}]" if len(targets) > 1 else "target"
        t = _checks.tensor(name, t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold class indices with an integer dtype, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the count is on {device}: put every target on one device")
        valid = t != ignore_index
        if w is None:
            total += valid.sum()
        else:
            _checks.same_device("weight", w, name, t)
            _checks.class_targets(t, w.numel(), ignore_index, name)
            total += (w.double()[t.long().masked_fill(~valid, 0)] * valid).sum()
    return total


def global_mean(loss_sum: Tensor, count: Tensor) -> Tensor:
    """``loss_sum / count``: one piece's share of the global mean, in ``loss_sum``'s dtype.

    ``loss_sum`` is a loss with ``reduction="sum"`` (or per-token losses), ``count`` the result of
    :func:`global_token_count`. The division runs in float32 (float64 for float64 losses) so that a
    float16/bfloat16 loss is not divided by a count rounded to 8 or 11 bits. Differentiable. A count of 0
    (every token of the global batch ignored) gives NaN and a zero gradient, as torch's "mean".
    """
    loss = _checks.floating("loss_sum", loss_sum)
    c = _checks.tensor("count", count)
    if c.dim() != 0:
        raise ValueError(f"count must be a 0-dim tensor (from global_token_count), got shape {tuple(c.shape)}")
    acc = accumulation_dtype(loss.dtype)
    c = c.to(device=loss.device, dtype=acc)
    scored = c != 0
    # Nothing scored anywhere: NaN, as torch's mean, but a zero gradient (as torch), not 0 * inf = NaN.
    return torch.where(scored, loss.to(acc) / torch.where(scored, c, 1.0), torch.nan).to(loss.dtype)
