"""losskit.ops.cpu.native.empty: kernel outputs in the extension's huge-page mappings, the last freed one
kept for reuse; never handed out while a tensor still uses it, and released on request."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import losskit.functional as LF
from losskit.ops.cpu import native

MIB = 1 << 20


def _rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


@pytest.fixture
def cache():
    native.set_buffer_cache(True)
    yield
    native.set_buffer_cache(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_an_output_is_a_plain_writable_contiguous_tensor(dtype, cache):
    t = native.empty((3, 5, 1 << 17), dtype, torch.device("cpu"))
    assert t.shape == (3, 5, 1 << 17) and t.dtype == dtype and t.is_contiguous()
    t.fill_(2)
    assert t.sum().item() == 2 * t.numel()
    small = native.empty((4, 4), dtype, torch.device("cpu"))  # below BLOCK_MIN_BYTES: torch.empty
    assert small.shape == (4, 4) and small.dtype == dtype


def test_a_freed_buffer_is_reused_and_a_live_one_never(cache):
    shape, dev = (8, MIB), torch.device("cpu")  # 32 MiB
    a = native.empty(shape, torch.float32, dev)
    a.fill_(1)
    ptr = a.data_ptr()
    view = a[2:4]
    del a  # the view keeps the memory: nothing to reuse yet
    b = native.empty(shape, torch.float32, dev)
    assert b.data_ptr() != ptr
    b.fill_(7)
    assert view.eq(1).all()  # b is other memory
    b_ptr = b.data_ptr()
    del view, b  # both mappings are kept
    c = native.empty(shape, torch.float32, dev)
    d = native.empty(shape, torch.float32, dev)
    assert {c.data_ptr(), d.data_ptr()} == {ptr, b_ptr}  # the same size takes the kept mappings back
    e = native.empty(shape, torch.float32, dev)  # none left: a new mapping
    assert e.data_ptr() not in (ptr, b_ptr)


def test_at_most_two_buffers_are_kept(cache):
    shape, dev = (16, MIB), torch.device("cpu")  # 64 MiB
    ts = [native.empty(shape, torch.float32, dev).fill_(1) for _ in range(3)]
    held = _rss()
    del ts
    assert held - 100 * MIB < _rss() < held - 48 * MIB  # one of three unmapped, two kept


def test_the_kept_buffer_is_resident_until_released_and_not_kept_when_off(cache):
    shape, dev = (64, MIB), torch.device("cpu")  # 256 MiB
    t = native.empty(shape, torch.float32, dev)
    t.fill_(1)
    held = _rss()
    del t
    assert _rss() > held - 16 * MIB  # kept, still mapped
    other = native.empty((2, MIB), torch.float32, dev)  # another size: the kept one is unmapped first
    assert _rss() < held - 200 * MIB
    del other
    native.release_buffer_cache()
    t = native.empty(shape, torch.float32, dev)
    t.fill_(1)
    del t
    native.release_buffer_cache()
    assert _rss() < held - 200 * MIB  # unmapped on request
    native.set_buffer_cache(False)
    t = native.empty(shape, torch.float32, dev)
    t.fill_(1)
    held = _rss()
    del t
    assert _rss() < held - 200 * MIB  # not kept


def test_gradients_in_reused_buffers_accumulate_and_stay_correct(cache):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1 << 15, generator=g).requires_grad_()  # 8 MiB gradients
    y = torch.randint(0, 1 << 15, (64,), generator=g)
    ref = x.detach().clone().requires_grad_()
    for _ in range(3):  # each step's gradient lands in the previous step's freed buffer
        x.grad = None
        LF.cross_entropy(x, y).backward()
        LF.cross_entropy(x, y, label_smoothing=0.1).backward()  # accumulates into x.grad
        ref.grad = None
        torch.nn.functional.cross_entropy(ref, y).backward()
        torch.nn.functional.cross_entropy(ref, y, label_smoothing=0.1).backward()
        torch.testing.assert_close(x.grad, ref.grad)


def test_environment_turns_the_cache_off():
    code = textwrap.dedent("""
        import re, torch
        from pathlib import Path
        from losskit.ops.cpu import native
        rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) << 10
        t = native.empty((64, 1 << 20), torch.float32, torch.device("cpu"))
        t.fill_(1)
        held = rss()
        del t
        print(held - rss() > 200 << 20)
    """)
    for value, released in (("0", "True"), ("1", "False")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LOSSKIT_BUFFER_CACHE": value},
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == released, value
