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


# --- round_in_place: a float32 buffer rounded to 16 bits over its own first half -----------------------

def _specials(n: int, dtype: torch.dtype) -> torch.Tensor:
    """(n,) float32 normals, with the values the rounding must carry: NaN, infinities, zeros of both signs,
    ties, the largest float32 (inf in float16), subnormals of the target, float16's overflow."""
    t = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e3
    info = torch.finfo(dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8,
                            3.4e38, -3.4e38, info.tiny / 3, -info.tiny / 5, 65520.0, 65519.0])
    for start in (0, n // 2 - 3, n - len(special)):  # in the first, a middle and the last step
        t[start:start + len(special)] = special
    return t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [(1 << 20) + 3, 3 << 20], ids=["1M+3", "3M"])
def test_round_in_place_equals_to_and_releases_the_second_half(dtype, n, cache):
    t = native.empty((n,), torch.float32, torch.device("cpu"))
    t.copy_(_specials(n, torch.float32 if dtype == torch.bfloat16 else dtype))
    expected = t.to(dtype)  # torch's rounding, on another copy
    shape = (n // 3, 3) if n % 3 == 0 else (n,)
    held = _rss()
    out = native.round_in_place(t.view(shape), dtype)
    assert out is not None and out.dtype == dtype and out.shape == shape and out.is_contiguous()
    assert out.data_ptr() == t.data_ptr()
    assert out.untyped_storage().nbytes() == 2 * n  # its storage is the first half, no more
    assert torch.equal(out.view(-1).view(torch.int16), expected.view(torch.int16))  # bit for bit, NaN too
    if n * 4 >= 8 * MIB:
        assert _rss() < held - n * 2 + 2 * MIB  # the second half's pages are gone
    del t
    out.view(-1)[-1] = 1  # the Block lives with the result
    assert out.view(-1)[-1].item() == 1 and torch.equal(out.view(-1)[:-1].view(torch.int16),
                                                      expected[:-1].view(torch.int16))


def test_round_in_place_takes_only_a_whole_block_of_four_byte_floats(cache):
    dev = torch.device("cpu")
    block = native.empty((2 * MIB,), torch.float32, dev).fill_(1.5)
    assert native.round_in_place(block[1:], torch.bfloat16) is None  # not the whole buffer
    assert native.round_in_place(block[:-1], torch.bfloat16) is None
    assert native.round_in_place(block.view(1024, -1).T, torch.bfloat16) is None  # not contiguous
    assert native.round_in_place(block, torch.float32) is None  # nothing to halve
    assert native.round_in_place(torch.ones(2 * MIB), torch.bfloat16) is None  # torch's own memory
    wide = native.empty((2 * MIB,), torch.float64, dev)
    assert native.round_in_place(wide, torch.float32) is None  # 8 -> 4 bytes: not this function's case
    assert block.eq(1.5).all()  # none of these touched it
    assert native.round_in_place(block, torch.bfloat16).eq(1.5).all()


def test_a_rounded_buffer_is_reused_and_written_whole_again(cache):
    dev, n = torch.device("cpu"), 4 * MIB  # a 16 MiB sum
    out = native.round_in_place(native.empty((n,), torch.float32, dev).fill_(3), torch.bfloat16)
    ptr = out.data_ptr()
    del out  # the Block is freed: its mapping, half released, is kept
    again = native.empty((n,), torch.float32, dev)
    assert again.data_ptr() == ptr
    again.fill_(-2)  # the released half faults back in
    assert again.eq(-2).all()


def test_linear_cross_entropy_bfloat16_weight_gradient_rounded_in_place(monkeypatch, cache):
    """The functional's (C, D) float32 sum, 4 MiB and up, is rounded in its own buffer: the weight
    gradient is the same bits as the copy it replaces, accumulates over two backward calls as torch's
    AccumulateGrad does, and matches a float64 truth within bfloat16's error of one rounding."""
    from losskit.ops import linear_xent

    g = torch.Generator().manual_seed(0)
    n, d, v = 96, 256, 4096  # a 4 MiB sum: the extension's buffer
    x = torch.randn(n, d, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, d, generator=g) / 16).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    calls = []
    monkeypatch.setattr(linear_xent, "round_in_place",
                        lambda s, dtype: calls.append(s.shape) or native.round_in_place(s, dtype))
    LF.linear_cross_entropy(x, w, t).backward()
    assert calls == [(v, d)] and w.grad.untyped_storage().nbytes() == v * d * 2
    in_place = w.grad.clone()
    monkeypatch.setattr(linear_xent, "round_in_place", lambda s, dtype: None)  # the copy
    w.grad = None
    LF.linear_cross_entropy(x, w, t).backward()
    assert torch.equal(w.grad.view(torch.int16), in_place.view(torch.int16))
    xd, wd = x.detach().double(), w.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(xd @ wd.T, t).backward()
    eps = torch.finfo(torch.bfloat16).eps
    assert (in_place.double() - wd.grad).abs().max() <= 2 * eps * wd.grad.abs().max()
    LF.linear_cross_entropy(x, w, t).backward()  # accumulates: AccumulateGrad adds in place
    assert torch.equal(w.grad, in_place * 2)  # doubling is exact


def test_block_release_refuses_an_offset_past_its_buffer(cache):
    block = native.load().block(4 * MIB)
    with pytest.raises(ValueError, match=r"offset 4194305 is past the buffer's 4194304 bytes"):
        block.release(4 * MIB + 1)
    block.release(4 * MIB)  # the end itself: nothing past it but the mapping's slack
