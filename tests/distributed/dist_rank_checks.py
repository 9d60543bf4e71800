"""Checks that run on every rank of a gloo group (started by ``dist_harness``), many per spawn.

Every rank builds the same full tensors from the same seed, keeps its shard, runs the distributed loss
and compares the loss and its own slice of the gradient with torch on the full tensors in one process.
``run_all`` runs every check in order; after each one the ranks agree (one all_reduce) on whether it
failed anywhere and stop there, so that one failure never desynchronises the collectives of the next.
"""

from __future__ import annotations

import itertools
import re
import threading
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import losskit.functional as LF
from losskit.distributed import _cross_entropy, global_mean, global_token_count
from losskit.distributed import vocab_parallel_cross_entropy as vp_cross_entropy
from losskit.distributed import vocab_parallel_linear_cross_entropy as vp_linear_cross_entropy
from losskit.ops import blocks as kblocks
from losskit.ops import linear_xent
from losskit.testing import assert_close, assert_within_eps, peak_memory_above



def vocab_parallel_cross_entropy(*args, group=None, **kwargs):
    """The loss split across the world unless a group is named (its own group=None is one process)."""
    return vp_cross_entropy(*args, group=dist.group.WORLD if group is None else group, **kwargs)


def vocab_parallel_linear_cross_entropy(*args, group=None, **kwargs):
    """As :func:`vocab_parallel_cross_entropy`, for the fused head."""
    return vp_linear_cross_entropy(*args, group=dist.group.WORLD if group is None else group, **kwargs)


V = 11  # uneven shards: [5, 6] on 2 ranks, [3, 4, 4] on 3
REDUCTIONS = ("mean", "sum", "none")


def sizes(world: int, total: int = V) -> list[int]:
    return [total // world + (1 if r >= world - total % world else 0) for r in range(world)]


def shard(full: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    s = sizes(world, full.shape[dim])
    return full.narrow(dim, sum(s[:rank]), s[rank])


def targets(shape: tuple[int, ...], ignore_index: int, gen: torch.Generator) -> torch.Tensor:
    t = torch.randint(0, V, shape, generator=gen)
    t[torch.rand(shape, generator=gen) < 0.3] = ignore_index  # some positions ignored (real class 3 too)
    return t


def backward_and_compare(ours: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, x_ref: torch.Tensor,
                         rank: int, world: int, gen: torch.Generator, dim: int = 1, msg: str = "") -> None:
    """Compare values, then gradients for the same grad_output (random for "none")."""
    assert_close(ours, ref.detach(), msg=msg)
    go = torch.randn(ref.shape, generator=gen, dtype=ref.dtype)
    ours.backward(go)
    ref.backward(go)
    grad_ref = shard(x_ref.grad, rank, world, dim) if dim is not None else x_ref.grad
    assert_close(x.grad, grad_ref, msg=msg + " (gradient)")


class Collectives:
    """Count the collectives issued inside the block and the elements they carry."""

    NAMES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
             "reduce_scatter", "barrier")

    def __enter__(self) -> Collectives:
        self.calls: list[tuple[str, int]] = []
        self.saved = {n: getattr(dist, n) for n in self.NAMES}
        for n in self.NAMES:
            def counted(*args, _n=n, **kwargs):
                first = args[0] if args else None
                if isinstance(first, torch.Tensor):
                    self.calls.append((_n, first.numel()))
                else:  # all_gather: (list of outputs, input)
                    self.calls.append((_n, args[1].numel() if _n == "all_gather" else 0))
                return self.saved[_n](*args, **kwargs)
            setattr(dist, n, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for n, f in self.saved.items():
            setattr(dist, n, f)


def expect(kind: type[Exception], pattern: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except kind as e:
        if not re.search(pattern, str(e)):
            raise AssertionError(f"{kind.__name__} raised, but {str(e)!r} does not match {pattern!r}") from e
        return
    raise AssertionError(f"no {kind.__name__} matching {pattern!r} was raised")


# ---------------------------------------------------------------------------------------------- checks

def _option_grid() -> list[tuple[torch.dtype, tuple[int, ...], bool, float, str, int]]:
    """(dtype, shape, weighted, label_smoothing, reduction, ignore_index): every combination for float64
    (N, V); for the other shapes and float32, each reduction with all options off and with all on (the
    single-process tests cover every combination of every shape)."""
    full = list(itertools.product([torch.float64], [(13, V)], (False, True), (0.0, 0.2), REDUCTIONS, (-100, 3)))
    ends = [(dtype, shape, on, 0.2 * on, reduction, 3 if on else -100)
            for dtype, shape in ((torch.float64, (V,)), (torch.float64, (3, V, 2, 2)), (torch.float32, (13, V)))
            for reduction in REDUCTIONS for on in (False, True)]
    return full + ends


def check_cross_entropy_options(rank: int, world: int) -> None:
    """Options, shapes and reductions, float64 and float32, uneven shards, several blocks per call."""
    gen = torch.Generator().manual_seed(0)
    for dtype, shape, weighted, ls, reduction, ignore_index in _option_grid():
        full = torch.randn(shape, generator=gen, dtype=dtype) * 3
        tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
        target = targets(tshape, ignore_index, gen) if tshape else torch.tensor(4)
        weight = torch.rand(V, generator=gen, dtype=dtype) + 0.5 if weighted else None
        cd = 1 if len(shape) > 1 else 0
        x = shard(full, rank, world, cd).clone().requires_grad_()
        x_ref = full.clone().requires_grad_()
        kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=ls)
        ours = vocab_parallel_cross_entropy(x, target, **kw)
        ref = F.cross_entropy(x_ref, target, **kw)
        backward_and_compare(ours, ref, x, x_ref, rank, world, gen, cd, msg=f"{dtype} {shape} {kw}")


def check_cross_entropy_extremes(rank: int, world: int) -> None:
    """Logits near 1e3 (stable max), a whole shard at -inf for some rows (a masked vocabulary range)."""
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(8, V, generator=gen) + 1000.0
    full[:3, : sizes(world)[0]] = -torch.inf  # rank 0 holds nothing but -inf for rows 0..2
    target = torch.randint(sizes(world)[0], V, (8,), generator=gen)
    for reduction in REDUCTIONS:
        x = shard(full, rank, world).clone().requires_grad_()
        x_ref = full.clone().requires_grad_()
        ours = vocab_parallel_cross_entropy(x, target, reduction=reduction)
        ref = F.cross_entropy(x_ref, target, reduction=reduction)
        assert torch.isfinite(ours).all()
        backward_and_compare(ours, ref, x, x_ref, rank, world, gen, msg=reduction)


def check_cross_entropy_low_precision(rank: int, world: int) -> None:
    """bfloat16/float16: within fixed eps of float64 on the same inputs."""
    gen = torch.Generator().manual_seed(2)
    full64 = torch.randn(16, V, generator=gen, dtype=torch.float64) * 4
    target = targets((16,), -100, gen)
    for dtype in (torch.bfloat16, torch.float16):
        full = full64.to(dtype)
        truth_x = full.double().requires_grad_()
        truth = F.cross_entropy(truth_x, target, label_smoothing=0.1)
        truth.backward()
        x = shard(full, rank, world).clone().requires_grad_()
        ours = vocab_parallel_cross_entropy(x, target, label_smoothing=0.1)
        ours.backward()
        assert ours.dtype == dtype and x.grad.dtype == dtype
        # loss: float32 row statistics combined over ranks, a mean rounded once to dtype: 0.5 eps, bound 1.
        # Gradient: rounded once (grad_output is 1): 0.5 eps, bound 1; normwise over the whole gradient,
        # as p - y cancels.
        assert_within_eps(ours, truth, 1, msg=f"{dtype} loss")
        assert_within_eps(x.grad, shard(truth_x.grad, rank, world), 1, floor=truth_x.grad.abs().max().item(),
                          msg=f"{dtype} gradient")


def check_input_untouched(rank: int, world: int) -> None:
    """The caller's shard is never written, also when it is a non-contiguous view."""
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(V, 9, generator=gen).t()  # (9, V), non-contiguous
    target = targets((9,), -100, gen)
    x = shard(full, rank, world).requires_grad_()
    before = x.detach().clone()
    vocab_parallel_cross_entropy(x, target, label_smoothing=0.3).backward()
    assert torch.equal(x.detach(), before)
    x_ref = full.detach().clone().requires_grad_()
    F.cross_entropy(x_ref, target, label_smoothing=0.3).backward()
    assert_close(x.grad, shard(x_ref.grad, rank, world))


def check_communication_counted(rank: int, world: int) -> None:
    """What the docstrings promise: 1 all_gather of 14 int64, MAX of P, SUM of 2P (3P smoothed); the
    linear head adds P x D when input requires grad; backward communicates nothing, except the
    linear head's for reduction="none" with linear_weight requiring grad, which reduces P x D there."""
    gen = torch.Generator().manual_seed(4)
    n, d = 6, 5
    x = shard(torch.randn(n, V, generator=gen), rank, world).requires_grad_()
    target = targets((n,), -100, gen)
    for ls, packed in ((0.0, 2), (0.1, 3)):
        with Collectives() as c:
            loss = vocab_parallel_cross_entropy(x, target, label_smoothing=ls)
        assert c.calls == [("all_gather", 14), ("all_reduce", n), ("all_reduce", packed * n)], c.calls
        with Collectives() as c:
            loss.backward()
        assert c.calls == [], c.calls
    empty = shard(torch.randn(0, V, generator=gen), rank, world).requires_grad_()
    with Collectives() as c:  # no position: the header only, and torch's values (NaN mean, 0 sum)
        means = vocab_parallel_cross_entropy(empty, target[:0])
        sums = vocab_parallel_cross_entropy(empty, target[:0], reduction="sum")
    assert c.calls == [("all_gather", 14)] * 2, c.calls
    assert_close(means, F.cross_entropy(torch.zeros(0, V), target[:0]))
    assert_close(sums, F.cross_entropy(torch.zeros(0, V), target[:0], reduction="sum"))
    h = torch.randn(n, d, generator=gen, requires_grad=True)
    w = shard(torch.randn(V, d, generator=gen), rank, world, 0).requires_grad_()
    with Collectives() as c:
        loss = vocab_parallel_linear_cross_entropy(h, w, target)
    assert c.calls == [("all_gather", 14), ("all_reduce", n), ("all_reduce", 2 * n), ("all_reduce", n * d)], c.calls
    with Collectives() as c:
        vocab_parallel_linear_cross_entropy(h.detach(), w, target)
    assert c.calls == [("all_gather", 14), ("all_reduce", n), ("all_reduce", 2 * n)], c.calls
    with Collectives() as c:
        loss.backward()
    assert c.calls == [], c.calls
    # reduction="none" with linear_weight requiring grad: d/dinput is reduced in backward instead.
    with Collectives() as c:
        loss = vocab_parallel_linear_cross_entropy(h, w, target, reduction="none")
    assert c.calls == [("all_gather", 14), ("all_reduce", n), ("all_reduce", 2 * n)], c.calls
    with Collectives() as c:
        loss.sum().backward()
    assert c.calls == [("all_reduce", n * d)], c.calls


def check_linear_options(rank: int, world: int) -> None:
    """The fused head against cross_entropy(F.linear(input, W, b)): input, weight and bias gradients."""
    gen = torch.Generator().manual_seed(5)
    d = 4
    for dtype, biased, options_on, reduction in itertools.product(
            (torch.float64, torch.float32), (False, True), (False, True), ("mean", "sum")):
        weighted, ls = options_on, 0.2 * options_on  # class weights and label smoothing together
        h_full = torch.randn(2, 5, d, generator=gen, dtype=dtype)
        w_full = torch.randn(V, d, generator=gen, dtype=dtype)
        b_full = torch.randn(V, generator=gen, dtype=dtype) if biased else None
        target = targets((2, 5), -100, gen)
        weight = torch.rand(V, generator=gen, dtype=dtype) + 0.5 if weighted else None
        h, h_ref = h_full.clone().requires_grad_(), h_full.clone().requires_grad_()
        w, w_ref = shard(w_full, rank, world, 0).clone().requires_grad_(), w_full.clone().requires_grad_()
        b = shard(b_full, rank, world, 0).clone().requires_grad_() if biased else None
        b_ref = b_full.clone().requires_grad_() if biased else None
        kw = dict(weight=weight, reduction=reduction, label_smoothing=ls)
        ours = vocab_parallel_linear_cross_entropy(h, w, target, linear_bias=b, **kw)
        ref = F.cross_entropy(F.linear(h_ref, w_ref, b_ref).flatten(0, 1), target.flatten(), **kw)
        msg = f"{dtype} bias={biased} {kw}"
        assert_close(ours, ref.detach(), msg=msg)
        ours.backward()
        ref.backward()
        assert_close(h.grad, h_ref.grad, msg=msg + " d/dinput")
        assert_close(w.grad, shard(w_ref.grad, rank, world, 0), msg=msg + " d/dlinear_weight")
        if biased:
            assert_close(b.grad, shard(b_ref.grad, rank, world, 0), msg=msg + " d/dlinear_bias")
    # reduction="none", for a random grad_output: the input gradient alone is precomputed; with
    # linear_weight and linear_bias requiring grad too, backward recomputes (and all-reduces d/dinput).
    h_full = torch.randn(3, d, generator=gen, dtype=torch.float64)
    w_full = torch.randn(V, d, generator=gen, dtype=torch.float64)
    b_full = torch.randn(V, generator=gen, dtype=torch.float64)
    target = targets((3,), -100, gen)
    for all_grads in (False, True):
        h, h_ref = h_full.clone().requires_grad_(), h_full.clone().requires_grad_()
        w = shard(w_full, rank, world, 0).clone().requires_grad_(all_grads)
        b = shard(b_full, rank, world, 0).clone().requires_grad_(all_grads)
        w_ref, b_ref = w_full.clone().requires_grad_(), b_full.clone().requires_grad_()
        ours = vocab_parallel_linear_cross_entropy(h, w, target, linear_bias=b, reduction="none", label_smoothing=0.1)
        ref = F.cross_entropy(F.linear(h_ref, w_ref, b_ref), target, reduction="none", label_smoothing=0.1)
        backward_and_compare(ours, ref, h, h_ref, rank, world, gen, dim=None, msg=f"none, all grads {all_grads}")
        if all_grads:
            assert_close(w.grad, shard(w_ref.grad, rank, world, 0))
            assert_close(b.grad, shard(b_ref.grad, rank, world, 0))


def check_linear_low_precision(rank: int, world: int) -> None:
    """bfloat16 with the weight gradient's products in bfloat16 (CPUs with AMX/AVX512-BF16) and in
    float32 (the others), whatever this CPU is: within fixed eps of float64 on the same inputs."""
    gen = torch.Generator().manual_seed(6)
    h64 = torch.randn(12, 8, generator=gen, dtype=torch.float64).bfloat16().double()
    w64 = torch.randn(V, 8, generator=gen, dtype=torch.float64).bfloat16().double()
    target = targets((12,), -100, gen)
    truth_h, truth_w = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    truth = F.cross_entropy(truth_h @ truth_w.t(), target)
    truth.backward()
    truth_gw = shard(truth_w.grad, rank, world, 0)
    probe = linear_xent.cpu_multiplies_bfloat16
    try:
        for native in (True, False):
            linear_xent.cpu_multiplies_bfloat16 = lambda native=native: native
            h, w = h64.bfloat16().requires_grad_(), shard(w64.bfloat16(), rank, world, 0).requires_grad_()
            ours = vocab_parallel_linear_cross_entropy(h, w, target)
            ours.backward()
            msg = "bfloat16 products" if native else "float32 products"
            # loss: a float32 mean rounded once to bfloat16 (0.5 eps), bound 1. Gradients: products of the
            # bfloat16-rounded logits' gradient, rounded once: about one eps normwise (as eager), bound 2.
            assert_within_eps(ours, truth, 1, msg=f"{msg} loss")
            assert_within_eps(h.grad, truth_h.grad, 2, floor=truth_h.grad.abs().max().item(), msg=f"{msg} d/dinput")
            assert_within_eps(w.grad, truth_gw, 2, floor=truth_gw.abs().max().item(), msg=f"{msg} d/dlinear_weight")
    finally:
        linear_xent.cpu_multiplies_bfloat16 = probe


def check_no_rank_holds_full_logits(rank: int, world: int) -> None:
    """Peak memory of a rank: the fused head keeps its gradients and one logits chunk, never the logits
    (of its shard, let alone of the vocabulary); given logits, their gradient and one work block."""
    saved = _cross_entropy.LINEAR_BLOCK_BYTES
    _cross_entropy.LINEAR_BLOCK_BYTES = 1 << 20
    try:
        n, d, v_r = 256, 32, 8192  # this rank's logits (n, v_r) float32: 8 MiB, 8 * world MiB in all
        gen = torch.Generator().manual_seed(10 + rank)
        h = torch.randn(n, d, generator=torch.Generator().manual_seed(10)).requires_grad_()
        w = (torch.randn(v_r, d, generator=gen) / 8).requires_grad_()
        x = torch.randn(n, v_r, generator=gen).requires_grad_()
        target = torch.randint(0, v_r * world, (n,), generator=torch.Generator().manual_seed(11))
        mib = 1 << 20
        for name, call, budget in (
                # gradients: input 32 KiB, linear_weight 1 MiB; one 1 MiB chunk and its matmul temporaries
                ("linear", lambda: vocab_parallel_linear_cross_entropy(h, w, target, label_smoothing=0.1), 4 * mib),
                # the logits' gradient (8 MiB) + a work block + per-token vectors
                ("cross_entropy", lambda: vocab_parallel_cross_entropy(x, target, label_smoothing=0.1), 12 * mib)):
            call()  # first call: one-time allocations of torch's kernels, not the loss's
            peak = peak_memory_above(call)
            assert peak <= budget, f"{name}: {peak / mib:.1f} MiB above the inputs"
    finally:
        _cross_entropy.LINEAR_BLOCK_BYTES = saved


def check_group_choice(rank: int, world: int) -> None:
    """group=None runs no collective and is the single-process loss of this rank's tensor, as is a
    one-rank group; the world group splits; a rank outside the group is refused."""
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(5, V, generator=gen, dtype=torch.float64)
    target = targets((5,), -100, gen)
    x = shard(full, rank, world)
    hidden = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    classifier = torch.randn(V, 4, generator=gen, dtype=torch.float64)
    with Collectives() as c_none:
        by_default = vp_cross_entropy(full, target, label_smoothing=0.1)
        by_default_linear = vp_linear_cross_entropy(hidden, classifier, target)
    assert c_none.calls == [], c_none.calls
    assert_close(by_default, F.cross_entropy(full, target, label_smoothing=0.1))
    assert_close(by_default_linear, F.cross_entropy(hidden @ classifier.t(), target))
    with Collectives() as c_world:
        by_world = vp_cross_entropy(x, target, group=dist.group.WORLD)
    assert len(c_world.calls) == 3, c_world.calls
    assert_close(by_world, F.cross_entropy(full, target))

    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group, in order
    with Collectives() as c:
        alone = vocab_parallel_cross_entropy(full, target, group=singles[rank], label_smoothing=0.1)
        alone_linear = vocab_parallel_linear_cross_entropy(hidden, classifier, target, group=singles[rank])
    assert c.calls == [], c.calls
    assert_close(alone, F.cross_entropy(full, target, label_smoothing=0.1))
    assert_close(alone_linear, F.cross_entropy(hidden @ classifier.t(), target))

    if world >= 3:  # a tensor-parallel subgroup of ranks 0 and 1; rank 2 is not in it
        pair = dist.new_group([0, 1])
        if rank < 2:
            x2 = shard(full, rank, 2).clone().requires_grad_()
            x_ref = full.clone().requires_grad_()
            backward_and_compare(vocab_parallel_cross_entropy(x2, target, group=pair),
                                 F.cross_entropy(x_ref, target), x2, x_ref, rank, 2, gen)
        else:
            expect(ValueError, "group does not contain this process",
                   lambda: vocab_parallel_cross_entropy(full, target, group=pair))


def check_bad_input_raises_everywhere(rank: int, world: int) -> None:
    """Bad arguments, on all ranks or on one, raise on every rank (never a deadlock); the group stays usable."""
    gen = torch.Generator().manual_seed(8)
    full = torch.randn(6, V, generator=gen)
    target = targets((6,), -100, gen)
    x = shard(full, rank, world)
    last = world - 1
    here = rf"on rank {last}: " if rank != last else ""  # the other ranks name the failing one

    expect(ValueError, r"vocab_size is 12 but the vocabulary shards hold 11 classes split as \[",
           lambda: vocab_parallel_cross_entropy(x, target, vocab_size=V + 1))
    wrong = x[:, :2] if rank == last else x  # the last rank's shard is too small
    expect(ValueError, r"vocab_size is 11 but the vocabulary shards hold",
           lambda: vocab_parallel_cross_entropy(wrong, target, vocab_size=V))
    outside = target.clone()
    outside[2] = V
    expect(ValueError, r"target contains class index 11, outside \[0, 11\)",
           lambda: vocab_parallel_cross_entropy(x, outside))
    expect(ValueError, r"weight has 10 entries, one per class of the whole vocabulary, but the vocabulary "
                     r"shards hold 11 classes split as \[",
           lambda: vocab_parallel_cross_entropy(x, target, weight=torch.ones(V - 1)))
    # Errors on one rank only are shared; the others name the failing rank.
    bad_target = target.float() if rank == last else target
    expect(TypeError, here + "target must hold class indices",
           lambda: vocab_parallel_cross_entropy(x, bad_target))
    expect(ValueError, here + "reduction must be one of",
           lambda: vocab_parallel_cross_entropy(x, target, reduction="avg" if rank == last else "mean"))
    other = (target + 1) % V if rank == last else target
    expect(ValueError, "target differs between rank 0 and rank",
           lambda: vocab_parallel_cross_entropy(x, other))
    expect(ValueError, "label_smoothing differs between rank 0 and rank",
           lambda: vocab_parallel_cross_entropy(x, target, label_smoothing=0.1 * (rank == last)))
    expect(ValueError, "number of target positions differs",
           lambda: vocab_parallel_cross_entropy(x[:5] if rank == last else x, target[:5] if rank == last else target))
    h = torch.randn(6, 4, generator=gen)
    w = shard(torch.randn(V, 4, generator=gen), rank, world, 0)
    expect(ValueError, here + "linear_weight must have shape",
           lambda: vocab_parallel_linear_cross_entropy(h, w[:, :3] if rank == last else w, target))
    expect(ValueError, "input.requires_grad differs",
           lambda: vocab_parallel_linear_cross_entropy(h.requires_grad_(rank == last), w, target))
    expect(TypeError, here + r"target\[1\] must hold class indices",
           lambda: global_token_count([target, bad_target]))
    # Still in step after all that:
    assert_close(vocab_parallel_cross_entropy(x, target), F.cross_entropy(full, target))


def check_exact_normalisation(rank: int, world: int) -> None:
    """Data parallel x gradient accumulation with uneven token counts: the recipe equals the full batch,
    averaging per-micro-batch means does not."""
    torch.manual_seed(9)  # the same model and data on every rank
    d = 3
    model = torch.nn.Linear(d, V).double()
    lengths = [[5, 2], [1, 6], [3, 3]][:world]  # tokens per micro-batch, per rank
    pieces = []
    for r in range(world):
        for n in lengths[r]:
            x = torch.randn(n, d, dtype=torch.float64)
            t = torch.randint(0, V, (n,))
            t[torch.rand(n) < 0.4] = -100
            t[0] = 1  # at least one scored token per micro-batch, so that the naive mean is finite
            pieces.append((r, x, t))
    weight = torch.rand(V, dtype=torch.float64) + 0.5

    for w in (None, weight):
        model.zero_grad()
        full_loss = F.cross_entropy(model(torch.cat([p[1] for p in pieces])), torch.cat([p[2] for p in pieces]),
                                    weight=w)
        full_loss.backward()
        full_grads = [p.grad.clone() for p in model.parameters()]

        def step(recipe: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
            model.zero_grad()
            mine = [(x, t) for r, x, t in pieces if r == rank]
            count = global_token_count([t for _, t in mine], weight=w)
            total = torch.zeros((), dtype=torch.float64)
            for x, t in mine:
                if recipe == "exact":
                    loss = global_mean(LF.cross_entropy(model(x), t, weight=w, reduction="sum"), count)
                    # as under DistributedDataParallel, which averages gradients over the world
                    (loss * world).backward()
                else:  # mean per micro-batch, averaged over micro-batches (and over ranks below)
                    loss = LF.cross_entropy(model(x), t, weight=w) / len(mine)
                    loss.backward()
                total += loss.detach()
            grads = [p.grad.clone() for p in model.parameters()]
            for g in [total, *grads]:
                dist.all_reduce(g)
            return (total if recipe == "exact" else total / world), [g / world for g in grads]

        value, grads = step("exact")
        assert_close(value, full_loss.detach())
        for g, ref in zip(grads, full_grads):
            assert_close(g, ref)
        naive, naive_grads = step("naive")
        assert (naive - full_loss).abs() > 1e-3, (naive, full_loss)
        assert (naive_grads[0] - full_grads[0]).abs().max() > 1e-4


CHECKS: tuple[Callable[[int, int], None], ...] = (
    check_cross_entropy_options, check_cross_entropy_extremes, check_cross_entropy_low_precision,
    check_input_untouched, check_communication_counted, check_linear_options, check_linear_low_precision,
    check_no_rank_holds_full_logits, check_group_choice, check_bad_input_raises_everywhere, check_exact_normalisation,
)
NAMES = tuple(c.__name__ for c in CHECKS)


def run_all(rank: int, world: int) -> dict[str, str | None]:
    """Run every check; the traceback of each failed check (None when it passed), stopping at the first
    check that failed on any rank."""
    kblocks.BLOCK_BYTES = 256  # several blocks per call: rows = 256 // (V_r * itemsize) is 4 to 12
    _cross_entropy.LINEAR_BLOCK_BYTES = 256
    results: dict[str, str | None] = {}
    for check in CHECKS:
        try:
            check(rank, world)
            results[check.__name__] = None
        except Exception:  # noqa: BLE001 - reported to the parent
            results[check.__name__] = traceback.format_exc()
        failed = torch.tensor(float(results[check.__name__] is not None))
        dist.all_reduce(failed)
        if failed.item():
            for later in CHECKS[CHECKS.index(check) + 1:]:
                results[later.__name__] = f"not run: {check.__name__} failed on some rank"
            break
    return results


# ------------------------------------------------------------------ harness self-checks (dist_harness)

def raise_on_last_rank(rank: int, world: int) -> None:
    """The last rank raises while the others wait in a collective it never joins."""
    if rank == world - 1:
        raise RuntimeError("deliberate failure before the collective")
    dist.all_reduce(torch.zeros(1))


def hang_on_last_rank(rank: int, world: int) -> None:
    """The last rank never reaches the collective the others wait in (nor returns)."""
    if rank == world - 1:
        threading.Event().wait()
    dist.all_reduce(torch.zeros(1))
