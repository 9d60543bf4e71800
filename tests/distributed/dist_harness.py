"""Run a function on ``W`` gloo processes on this machine and collect what each rank returns.

The parent hosts the rendezvous ``TCPStore`` on a free localhost port (port 0: the OS picks it, so two
test runs never race for a port) and starts ``W`` children from a fork server that imported torch, its
DTensor package (which ``torch.testing.assert_close`` loads, seconds on a busy machine) and the checks
once: each child is a fresh fork of a process that never computed anything, not a second import. The
fork server starts with ``MALLOC_MMAP_THRESHOLD_=65536`` so that a rank can measure its peak memory with
``losskit.testing.peak_memory_above`` (glibc reads it at process start). Each child joins the default group
(gloo, CPU; collectives time out after ``collective_timeout`` seconds), calls ``fn(rank, world)`` and
sends back its result or its traceback. The parent fails as soon as one rank fails, and kills the other
ranks instead of waiting for them: a rank that raises never leaves the test hanging. Every run is
bounded by ``timeout`` seconds, after which all children are killed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist


class RankFailed(AssertionError):
    """A rank raised; the message holds its rank and traceback."""


def _child(fn: Callable[[int, int], Any], rank: int, world: int, port: int, collective_timeout: float,
           results: Any) -> None:
    try:
        import torch

        torch.set_num_threads(1)  # W ranks share two cores
        store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False,
                              timeout=timedelta(seconds=collective_timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=collective_timeout))
        results.put((rank, True, fn(rank, world)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
        return
    dist.destroy_process_group()


def run(fn: Callable[[int, int], Any], world: int, *, timeout: float = 120.0,
        collective_timeout: float = 30.0) -> list[Any]:
    """``[fn(0, world), ..., fn(world - 1, world)]``, each on its own process; raises :class:`RankFailed`
    naming the first rank that raised, or ``TimeoutError`` after ``timeout`` seconds."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed.tensor", "losskit", fn.__module__])
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=collective_timeout))
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, r, world, store.port, collective_timeout, results), daemon=True)
             for r in range(world)]
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the fork server if this starts it
        try:
            for p in procs:
                p.start()
        finally:
            if saved is None:
                del os.environ["MALLOC_MMAP_THRESHOLD_"]
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
        while len(out) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(out))} of {world} did not finish "
                                   f"within {timeout} s; all ranks killed")
            # A rank that exited has flushed its result; wait a little longer before calling it dead.
            exited = [r for r, p in enumerate(procs) if r not in out and p.exitcode is not None]
            try:
                rank, ok, payload = results.get(timeout=2.0 if exited else 0.2)
            except queue.Empty:
                if exited:
                    raise RankFailed(f"rank {exited[0]} of {world} exited with code {procs[exited[0]].exitcode} "
                                     f"and no result") from None
                continue
            if not ok:
                raise RankFailed(f"rank {rank} of {world} raised:\n{payload}")
            out[rank] = payload
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        return [out[r] for r in range(world)]
    finally:
        for p in procs:  # only the processes started here, by handle
            if p.pid is not None:
                if p.is_alive():
                    p.kill()
                p.join()
        results.close()
