"""Vocab-parallel losses and exact normalisation on 2 and 3 gloo processes (CPU, localhost).

One spawn per world size runs every check of ``dist_rank_checks`` (each compares values and gradients
with torch on the full tensors in one process); each check is reported as its own test. The harness
itself is tested too: a rank that raises or hangs fails the run within its timeout, never hangs it.
"""

from __future__ import annotations

import pytest

import dist_harness
import dist_rank_checks

_RUNS: dict[int, object] = {}


@pytest.fixture(scope="session")
def ranks_ran():
    """``world -> [results of rank 0, rank 1, ...]``, one spawn per world size for the whole session."""
    def get(world: int) -> list[dict[str, str | None]]:
        if world not in _RUNS:
            try:
                _RUNS[world] = dist_harness.run(dist_rank_checks.run_all, world, timeout=150)
            except Exception as exc:  # noqa: BLE001 - every check of this world reports the same failure
                _RUNS[world] = exc
        run = _RUNS[world]
        if isinstance(run, Exception):
            raise run
        return run  # type: ignore[return-value]
    return get


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("check", dist_rank_checks.NAMES)
def test_check_on_every_rank(ranks_ran, world: int, check: str) -> None:
    failures = [f"--- rank {r} of {world}:\n{res[check]}" for r, res in enumerate(ranks_ran(world))
                if res[check] is not None]
    assert not failures, "\n".join(failures)


def test_a_rank_that_raises_fails_the_run_at_once() -> None:
    # The collective timeout is far longer than the run's: only the harness killing the waiting rank
    # can make this raise RankFailed rather than TimeoutError.
    with pytest.raises(dist_harness.RankFailed, match="rank 1 of 2 raised:(.|\n)*deliberate failure"):
        dist_harness.run(dist_rank_checks.raise_on_last_rank, 2, timeout=60, collective_timeout=600)


def test_a_hanging_rank_is_killed_at_the_timeout() -> None:
    with pytest.raises(TimeoutError, match="did not finish within 3 s; all ranks killed"):
        dist_harness.run(dist_rank_checks.hang_on_last_rank, 2, timeout=3, collective_timeout=600)
