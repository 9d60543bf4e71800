"""The vocab-parallel cross-entropy's local kernels against ShardXent's torch passes and float64 truth.

:func:`shard_stats` and :func:`shard_grad` are ``ShardXent.stats_block_`` / ``grad_block_`` over the
whole local logits in one launch, so each is compared with those torch passes run block by block over
the same logits (as ``_xent`` runs them), and with the module docstring's formulas in float64. Then the
full chain: the two kernels with ``ShardXent.finish`` between them, on one rank and on two ranks run as
threads, against ``F.cross_entropy`` of the whole vocabulary.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

pytest.importorskip("triton", minversion="3.8")  # the oldest the kernels build with (ops/_dispatch.py)

import torch
import torch.nn.functional as F
from _helpers import DTYPES, INTERPRETER_WARNINGS, refuses_float64
from torch import Tensor

from losskit.distributed._comm import Comm
from losskit.distributed._shard import Shard, ShardXent
from losskit.ops.blocks import blocks
from losskit.ops.triton.shard import shard_grad, shard_stats
from losskit.testing import assert_close, assert_within_eps

pytestmark = INTERPRETER_WARNINGS

IGNORE = -100
#: Rows of the torch passes' blocks: several blocks per call, as _xent walks a large input.
TORCH_ROWS = 4


def _logits(shape: tuple[int, int, int], dtype: torch.dtype, layout: str, gen: torch.Generator) -> Tensor:
    """(N, V_r, L) logits; ``layout`` "rows" (classes contiguous), "positions" (contiguous, L > 1: class
    stride L) or "strided" (every stride > 1). Position (0, 0) is all -inf (a masked vocabulary range),
    position (1, 0) has its first 20 classes at -inf (a first block that stays at -inf, then finite)."""
    n, v, length = shape
    x = torch.randn(n, v, length, generator=gen, dtype=torch.float64) * 4
    x[0, :, 0] = -torch.inf
    x[1, :20, 0] = -torch.inf
    x = x.to(dtype)
    if layout == "rows":
        return x.permute(0, 2, 1).contiguous().permute(0, 2, 1)  # strides (V_r L, 1, V_r)
    if layout == "strided":
        return torch.empty(n, 2 * v, 2 * length, dtype=dtype)[:, ::2, ::2].copy_(x)
    return x


def _core(n: int, length: int, shard: Shard, weighted: bool, smoothing: float, gen: torch.Generator) -> ShardXent:
    """Targets across the whole vocabulary (some in this shard, most outside), some ignored; one owned target
    in the shard's last class, one outside, one ignored."""
    target = torch.randint(0, shard.total, (n, length), generator=gen)
    target[torch.rand(n, length, generator=gen) < 0.2] = IGNORE
    target.view(-1)[1:4] = torch.tensor([shard.start + shard.size - 1, 0, IGNORE])
    weight = torch.rand(shard.total, generator=gen) + 0.5 if weighted else None
    return ShardXent(target, shard, weight, IGNORE, smoothing, torch.float32)


def _torch_pass(x3: Tensor, step, out: Tensor | None = None) -> None:
    """``step(blk, work)`` on float32 copies of ``x3``'s blocks, as ``_xent`` does; the work blocks are
    copied into ``out`` (N, V_r, L) when given."""
    n, v, length = x3.shape
    for blk in blocks(n, length, TORCH_ROWS):
        work = blk.of(x3).reshape(blk.rows, v).to(torch.float32, copy=True)
        step(blk, work)
        if out is not None:
            blk.of(out).copy_(work.view(blk.b1 - blk.b0, blk.l1 - blk.l0, v))


def _truth_stats(x3: Tensor, core: ShardXent) -> Tensor:
    """(4, N, L) float64: m, packed[0], packed[1], packed[2] (zeros without smoothing)."""
    x = x3.double()
    m = x.amax(1)
    d = x - m.masked_fill(m == -torch.inf, 0).unsqueeze(1)
    x_y = x.gather(1, core.safe.unsqueeze(1)).squeeze(1).where(core.owned, 0.0)
    w = torch.ones(x.shape[1], dtype=torch.float64) if core.w_local is None else core.w_local.double()
    t = (d * w[:, None]).sum(1) if core.ls else torch.zeros_like(m)
    return torch.stack([m, d.exp().sum(1), x_y, t])


def _assert_grad(grad3: Tensor, truth: Tensor) -> None:
    """Normwise in the dtype's eps: one rounding to the dtype of float32 terms that partly cancel (a
    position whose shard is all -inf has M = -inf on one rank: NaN in both)."""
    assert_within_eps(grad3, truth, 2, floor=truth.nan_to_num(0.0).abs().max().item(), msg="gradient")


def _truth_grad(x3: Tensor, core: ShardXent) -> Tensor:
    """(N, V_r, L) float64 gradient of pass 2 from ``core``'s (float32) factors."""
    x, f = x3.double(), lambda p: p.double().unsqueeze(1)
    onehot = torch.zeros_like(x).scatter_(1, core.safe.unsqueeze(1), 1.0) * f(core.owned)
    grad = (x - f(core.big_m)).exp() * f(core.alpha_over_s) - f(core.beta) * onehot
    if core.g is not None:
        w = torch.ones(x.shape[1], dtype=torch.float64) if core.w_local is None else core.w_local.double()
        grad = grad - f(core.g) * w[:, None]
    return grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,length", [("rows", 1), ("rows", 2), ("positions", 3), ("strided", 2)])
# class weights reach the kernels only through the smoothing term (w_y is finish's)
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (False, 0.2), (True, 0.2)])
def test_passes_match_shard_xent_and_float64(dtype, layout, length, weighted, smoothing):
    gen = torch.Generator().manual_seed(0)
    n, v = 5, 70  # V_r = 70: 5 steps of 16 columns, the last one partial
    shard = Shard(40, v, 160)
    x3 = _logits((n, v, length), dtype, layout, gen)
    core = _core(n, length, shard, weighted, smoothing, gen)
    _torch_pass(x3, core.stats_block_)
    m, packed = torch.empty_like(core.m), torch.empty_like(core.packed)
    shard_stats(x3, core.safe, core.owned, core.w_local, m, packed, smoothing=bool(smoothing), block=16)

    assert torch.equal(m, core.m) and torch.equal(packed[1], core.packed[1])  # a max and a copy: exact
    assert_close(packed, core.packed)
    truth = _truth_stats(x3, core)
    assert torch.equal(m.double(), truth[0]) and torch.equal(packed[1].double(), truth[2])
    # float32 sums of V_r terms of one sign (>= 0 in packed[0], <= 0 in packed[2]), rescaled once per
    # step: relative per element, a few eps of float32 (measured: under 2).
    assert_within_eps(packed[0], truth[1], 4, msg="sum of exp")
    if smoothing:
        assert_within_eps(packed[2], truth[3], 4, msg="smoothing sum")

    core.finish(Comm(None, 0, 1), "mean")  # factors of pass 2 (this shard alone, with no collectives)
    expected = torch.empty(x3.shape, dtype=dtype)
    _torch_pass(x3, core.grad_block_, expected)
    grad3 = torch.empty(x3.shape, dtype=dtype)
    shard_grad(x3, core.big_m, core.alpha_over_s, core.beta, core.g, core.safe, core.owned, core.w_local, grad3,
               block=16)
    assert_close(grad3, expected)
    _assert_grad(grad3, _truth_grad(x3, core))


def test_default_tiles_over_a_row_longer_than_one_tile():
    """No ``block``: rows of 5000 classes take two 4096-column steps (the second partial)."""
    gen = torch.Generator().manual_seed(1)
    n, v = 4, 5000
    shard = Shard(0, v, v)
    x3 = _logits((n, v, 1), torch.bfloat16, "rows", gen)
    core = _core(n, 1, shard, True, 0.1, gen)
    shard_stats(x3, core.safe, core.owned, core.w_local, core.m, core.packed, smoothing=True)
    truth = _truth_stats(x3, core)
    assert torch.equal(core.m.double(), truth[0]) and torch.equal(core.packed[1].double(), truth[2])
    assert_within_eps(core.packed[0], truth[1], 4)
    assert_within_eps(core.packed[2], truth[3], 4)
    core.finish(Comm(None, 0, 1), "sum")
    grad3 = torch.empty(x3.shape, dtype=x3.dtype)
    shard_grad(x3, core.big_m, core.alpha_over_s, core.beta, core.g, core.safe, core.owned, core.w_local, grad3)
    _assert_grad(grad3, _truth_grad(x3, core))


@dataclass
class _ThreadComm:
    """``Comm.all_reduce_`` for ranks run as threads of this process (only ``finish`` runs in them)."""

    rank: int
    slots: list
    barrier: threading.Barrier

    def all_reduce_(self, t: Tensor, op: str) -> Tensor:
        self.slots[self.rank] = t.clone()
        self.barrier.wait()
        stacked = torch.stack(self.slots)  # the same order on every rank: the same result
        t.copy_(stacked.sum(0) if op == "sum" else stacked.amax(0))
        self.barrier.wait()  # every rank has read the slots before any writes them again
        return t


@pytest.mark.parametrize("sizes", [(40,), (23, 17)])
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_kernels_and_finish_equal_cross_entropy(sizes, weighted, smoothing):
    """Per rank: shard_stats, ShardXent.finish (the collectives), shard_grad; every rank's loss and the
    concatenated gradient shards against F.cross_entropy of the whole logits in float64."""
    gen = torch.Generator().manual_seed(2)
    n, length, total = 4, 2, sum(sizes)
    x = torch.randn(n, total, length, generator=gen) * 3
    if not smoothing:  # a masked vocabulary range, all of the last rank's shard (17 classes) at (0, 0)
        x[0, total - 17:, 0] = -torch.inf
    target = torch.randint(0, total, (n, length), generator=gen)
    target[0, 1] = IGNORE
    target[0, 0] = 0
    weight = torch.rand(total, generator=gen) + 0.5 if weighted else None
    world = len(sizes)
    starts = [sum(sizes[:r]) for r in range(world)]
    cores = [ShardXent(target, Shard(starts[r], sizes[r], total), weight, IGNORE, smoothing, torch.float32)
             for r in range(world)]
    shards = [x[:, starts[r]:starts[r] + sizes[r]] for r in range(world)]
    for core, x3 in zip(cores, shards):
        shard_stats(x3, core.safe, core.owned, core.w_local, core.m, core.packed, smoothing=bool(smoothing))
    if world == 1:
        losses = [cores[0].finish(Comm(None, 0, 1), "mean")]
    else:
        slots, barrier = [None] * world, threading.Barrier(world, timeout=60)
        with ThreadPoolExecutor(world) as pool:
            losses = list(pool.map(lambda r: cores[r].finish(_ThreadComm(r, slots, barrier), "mean"), range(world)))
    grads = [torch.empty_like(x3) for x3 in shards]
    for core, x3, grad3 in zip(cores, shards, grads):
        shard_grad(x3, core.big_m, core.alpha_over_s, core.beta, core.g, core.safe, core.owned, core.w_local, grad3)

    x64 = x.double().requires_grad_()
    expected = F.cross_entropy(x64, target, None if weight is None else weight.double(), ignore_index=IGNORE,
                               label_smoothing=smoothing)
    expected.backward()
    # float32 results of float32 statistics, logs and products: a few eps (measured: under 1).
    for loss in losses:
        assert_within_eps(loss, expected.detach(), 4, floor=1)
    truth = x64.grad
    assert_within_eps(torch.cat(grads, 1), truth, 4, floor=truth.abs().max().item())


def test_float64_is_refused():
    x3 = torch.zeros(2, 3, 1, dtype=torch.float64)
    safe, owned, p = torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, 1)
    with refuses_float64("x3"):
        shard_stats(x3, safe, owned, None, p, torch.zeros(2, 2, 1), smoothing=False)
    with refuses_float64("x3"):
        shard_grad(x3, p, p, p, None, safe, owned, None, torch.empty_like(x3))
