"""The process group a distributed loss runs on, its collectives, and argument checks all ranks agree on.

A collective deadlocks when one rank raises before it and the others enter it. So every check that
could fail on one rank only runs *before* the first collective, its outcome travels in a small header
that one ``all_gather`` exchanges, and every rank then reaches the same verdict from the same table:
either all ranks go on, or all raise. Checks that need the whole layout (the vocabulary size is the sum
of the shard sizes) are decided from the gathered table, which is identical on every rank.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class Comm:
    """Where the collectives of one call go. ``group`` is None for a single process (no collectives)."""

    group: ProcessGroup | None
    rank: int
    world: int

    @property
    def active(self) -> bool:
        return self.group is not None

    def all_reduce_(self, t: Tensor, op: str) -> Tensor:
        """In-place ``all_reduce`` of a contiguous tensor with ``op`` "sum" or "max"; a no-op alone or for
        an empty tensor (every rank agreed on the sizes beforehand, so all skip it together)."""
        if self.active and t.numel():
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        return t


def resolve(group: ProcessGroup | None, *, none_is_world: bool) -> Comm:
    """The process group of a call.

    ``group=None`` is a single process (no collectives) for the vocab-parallel losses
    (``none_is_world=False``): a shard is only ever split across a group the caller names. For the
    data-parallel normalisation helpers (``none_is_world=True``) it follows torch.distributed: the
    default group when ``torch.distributed`` is initialised, else a single process. A group of one
    rank runs no collectives either.
    """
    if group is None:
        if not (none_is_world and dist.is_available() and dist.is_initialized()):
            return Comm(None, 0, 1)
        group = dist.group.WORLD
    elif isinstance(group, int) and dist.is_available() \
            and group == dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns outside the group
        raise ValueError("group does not contain this process (new_group returned its non-member marker): "
                         "call the loss on the members of group only")
    elif not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group does not contain this process: call the loss on the members of group only")
    world = dist.get_world_size(group)
    return Comm(group if world > 1 else None, rank, world)


def default_device(comm: Comm, candidate: object) -> torch.device:
    """The device of the exchanged header: the input's, else the one the group's backend needs."""
    if isinstance(candidate, Tensor):
        return candidate.device
    if comm.active and "nccl" in str(dist.get_backend(comm.group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def float_bits(value: float | Tensor) -> int | Tensor:
    """The float64 bit pattern of ``value`` as an int64, so that a float travels in an integer header."""
    if isinstance(value, Tensor):
        return value.double().view(torch.int64)
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


Fields = dict[str, "int | Tensor"]


def exchange(comm: Comm, device: torch.device, caller: str, names: Sequence[str],
             local: Callable[[], Fields]) -> dict[str, list[int]]:
    """Run the local checks of ``caller`` and gather their ``names`` fields from every rank.

    ``local()`` validates this rank's arguments (raising TypeError/ValueError) and returns one integer
    (or 0-dim integer tensor) per name. The result maps each name to its values, one per rank, in rank
    order. If ``local()`` raised on any rank, every rank raises: the failing rank its own error, the
    others an error of the same type that names the rank and repeats its message.
    Cost: one ``all_gather`` of ``len(names) + 1`` int64 per rank and one device-to-host copy.
    """
    try:
        row, error = _row(local(), names, device), None
    except Exception as exc:  # noqa: BLE001 - any failure must be shared before the collective
        if not comm.active:
            raise
        row, error = torch.zeros(1 + len(names), dtype=torch.int64, device=device), exc
        row[0] = 1
    if comm.active:
        rows = [torch.empty_like(row) for _ in range(comm.world)]
        dist.all_gather(rows, row, group=comm.group)
    else:
        rows = [row]
    table = torch.stack(rows).tolist()  # (world, 1 + len(names)) on the host; the same on every rank
    raise_shared(comm, caller, error, [r for r, values in enumerate(table) if values[0]])
    return {n: [values[i + 1] for values in table] for i, n in enumerate(names)}


def _row(fields: Fields, names: Sequence[str], device: torch.device) -> Tensor:
    """``(1 + len(names),)`` int64 on ``device``: 0 (no error), then the fields (0 where missing); one
    host-to-device copy for the Python integers, while tensor-valued fields (statistics of device
    tensors) stay on the device."""
    values = [fields.get(n, 0) for n in names]
    row = torch.tensor([0] + [v if isinstance(v, int) else 0 for v in values], dtype=torch.int64, device=device)
    on_device = [i for i, v in enumerate(values) if isinstance(v, Tensor)]
    if on_device:
        row[[i + 1 for i in on_device]] = torch.stack([values[i].to(torch.int64).reshape(()) for i in on_device])
    return row


def raise_shared(comm: Comm, caller: str, error: Exception | None, failed: Sequence[int]) -> None:
    """After every rank learnt which ranks ``failed`` their checks: all raise, or none does.

    The failing ranks re-raise their own ``error``; the others raise an error of the same type (TypeError
    or ValueError) that names the first failing rank and repeats its message, which one
    ``all_gather_object`` (on this error path only) brings to every rank.
    """
    if not failed:
        return
    reports: list[object] = [None] * comm.world
    mine = None if error is None else (isinstance(error, TypeError), str(error))
    dist.all_gather_object(reports, mine, group=comm.group)
    if error is not None:
        raise error
    is_type_error, message = reports[failed[0]]  # type: ignore[misc]
    raise (TypeError if is_type_error else ValueError)(f"{caller} on rank {failed[0]}: {message}")


def require_same(table: dict[str, list[int]], names: Sequence[str], hint: str = "") -> None:
    """Raise (on every rank, since the table is the same everywhere) if a field differs between ranks."""
    for name in names:
        values = table[name]
        if any(v != values[0] for v in values):
            other = next(r for r, v in enumerate(values) if v != values[0])
            raise ValueError(f"{name} differs between rank 0 and rank {other}: every rank of the group must pass "
                             f"the same {name}{hint}")
