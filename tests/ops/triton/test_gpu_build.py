"""Every Triton kernel launch of the public wrappers builds for an H100 (sm_90) without register pressure.

The interpreter that the other tests run the kernels in accepts code that the GPU compiler rejects (an
early ``return`` inside a constexpr ``if`` was one) and knows nothing of registers. ``gpu_build.py``
captures the launches of a representative set of wrapper calls at real GPU sizes, specialises each as
triton's JIT would on a CUDA device and compiles it with ``ptxas -v`` for sm_90, no GPU needed; it runs
in one subprocess without ``TRITON_INTERPRET`` (the kernels must be defined as compiled functions),
once for all the tests here. Each call is a test: every build it launches compiles, spills at most
``SPILL_BYTES`` and fits an H100 (registers times threads within the 64K-register file, shared memory
within 227 KiB, a grid within CUDA's limits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", minversion="3.8")  # the oldest the kernels build with

import gpu_build

HELPER = Path(gpu_build.__file__)
#: The ptxas shipped in the triton wheel: without it nothing is checked, which must fail, not skip.
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
#: An H100's limits per block: its register file, its shared memory (227 KiB opt-in), the grid's x size.
REGISTER_FILE, SHARED_BYTES, GRID_X = 65536, 227 * 1024, 2**31 - 1

#: Spill stores a build may have: a register or two. ptxas's allocation of the same kernel moves by a few
#: bytes with nothing but the source file's path in the PTX line info: the float32 entropy of 1000- and
#: 128256-class rows spilled 4-8 bytes from one checkout and none from another. A few bytes of local
#: memory stay in L1; register pressure spills tens to hundreds of bytes, which this catches.
SPILL_BYTES = 16
CALLS = [str(case) for case in gpu_build.CASES]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """gpu_build.py's report, built with an empty triton cache (every kernel compiled, ptxas run)."""
    assert PTXAS.is_file(), f"triton's ptxas is missing at {PTXAS}: the kernels cannot be built for sm_90"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    run = subprocess.run([sys.executable, str(HELPER)], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, f"{HELPER.name} failed:\n{run.stderr[-8000:]}"
    report = json.loads(run.stdout)
    assert Path(report["ptxas"]).resolve() == PTXAS.resolve(), f"triton ran {report['ptxas']}, not {PTXAS}"
    return report


def _problems(build: dict) -> list[str]:
    """Why ``build`` would not build or launch on an H100 (spills aside)."""
    if build["error"]:
        return [build["error"]]
    threads = 32 * build["num_warps"]
    problems = []
    if build["registers"] * threads > REGISTER_FILE:
        problems.append(f"{build['registers']} registers x {threads} threads exceed the register file")
    if build["shared"] > SHARED_BYTES:
        problems.append(f"{build['shared']} bytes of shared memory")
    return problems + [f"grid {grid}" for grid in build["grids"] if not 1 <= grid[0] <= GRID_X]


def _name(build: dict) -> str:
    return f"{build['kernel']} {build['constexprs']} num_warps={build['num_warps']} registers={build.get('registers')}"


@pytest.mark.parametrize("call", CALLS)
def test_builds_for_sm90_without_spills(built: dict, call: str) -> None:
    builds = [b for b in built["builds"] if call in b["calls"]]
    assert builds, f"{call} launched no kernel"
    failures = [f"{_name(b)}: {'; '.join(problems)}" for b in builds if (problems := _problems(b))]
    assert not failures, "\n".join(failures)
    spills = [f"{_name(b)}: {b['spill_stores']} bytes of spill stores" for b in builds
              if b["spill_stores"] > SPILL_BYTES]
    assert not spills, "\n".join(spills)


def test_every_kernel_is_built(built: dict) -> None:
    assert len(set(CALLS)) == len(CALLS), "two cases of gpu_build.CASES print alike"
    unbuilt = set(built["kernels"]) - {b["kernel"] for b in built["builds"]}
    assert not unbuilt, f"no case of gpu_build.CASES launches {sorted(unbuilt)}"
