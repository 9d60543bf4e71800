"""The compiled kernels where they index memory in the ways most likely to go wrong, each on 1 and 2
threads: strided, transposed and expanded (stride-0) operands large enough to be split over two threads,
low-precision rows longer than the caches, and out-of-range targets of every dtype. .ci/sanitize runs
these (with the other kernel and functional tests) under AddressSanitizer; here, every result is also
compared with the pure-torch path's, and the two thread counts must give the same bits (each row, or
each block, is computed whole by one thread)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import losskit.functional as LF
from losskit.ops.cpu import native, native_softmax
from losskit.testing import assert_same_results, loss_and_grads

N, C = 64, 4099  # 262336 elements: two threads (one per 64K elements) split the rows unevenly
IGNORE = -100


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@contextmanager
def _threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _layout(name: str, dtype: torch.dtype, seed: int, shape: tuple[int, int] = (N, C), *,
            uniform: bool = False) -> torch.Tensor:
    """A ``shape`` view, normal or (``uniform``) in [0, 1), whose storage ends where the view does, so that
    a read past the view's last element is a read past the allocation."""
    n, c = shape
    storage = {"contiguous": (n, c), "expanded": (1, c), "transposed": (c, n), "strided": (2 * n - 1, 3 * c - 2)}
    values = (torch.rand if uniform else torch.randn)(storage[name], generator=_gen(seed)).to(dtype)
    if name == "expanded":
        return values.expand(n, c)  # row stride 0: every row reads the same c elements
    if name == "transposed":
        return values.t()  # class stride n, row stride 1
    return values[::2, ::3] if name == "strided" else values  # strided: both strides scaled


# name -> (call(x, t, impl), target): "index" (N,) classes, every 7th ignored; "dense" an (N, C) operand
# in the input's layout, in [0, 1) (probabilities, binary targets); None: no target
CALLS = {
    "cross_entropy": (lambda x, t, impl: LF.cross_entropy(
        x, t, torch.rand(x.shape[1], generator=_gen(9)) + 0.5, ignore_index=IGNORE, reduction="none",
        impl=impl), "index"),
    "cross_entropy probabilities": (lambda x, t, impl: LF.cross_entropy(
        x, t, label_smoothing=0.1, reduction="none", impl=impl), "dense"),
    "focal_loss": (lambda x, t, impl: LF.focal_loss(
        x, t, gamma=2.0, ignore_index=IGNORE, reduction="none", impl=impl), "index"),
    "nll_loss": (lambda x, t, impl: LF.nll_loss(x, t, ignore_index=IGNORE, reduction="none", impl=impl), "index"),
    "softmax": (lambda x, t, impl: LF.softmax(x, -1, impl=impl), None),
    "log_softmax": (lambda x, t, impl: LF.log_softmax(x, -1, impl=impl), None),
    "entropy of logits": (lambda x, t, impl: LF.entropy(x, -1, logits=True, impl=impl), None),
    "binary_cross_entropy_with_logits": (lambda x, t, impl: LF.binary_cross_entropy_with_logits(
        x, t, reduction="none", impl=impl), "dense"),
    "mse_loss": (lambda x, t, impl: LF.mse_loss(x, t, reduction="none", impl=impl), "dense"),
}
CLASS_TARGETS = [name for name, (_, target) in CALLS.items() if target == "index"]


def _operands(name: str, layout: str, dtype: torch.dtype, shape: tuple[int, int] = (N, C)):
    x = _layout(layout, dtype, 1, shape)
    target = CALLS[name][1]
    if target == "index":
        t = torch.randint(0, shape[1], (shape[0],), generator=_gen(2))
        t[::7] = IGNORE
        return x, t
    return x, (_layout(layout, dtype, 3, shape, uniform=True) if target == "dense" else None)


def _results(name: str, x: torch.Tensor, t: torch.Tensor | None, impl: str):
    """(loss, d/dinput) of ``name``; the loss is the output for the functions without a target."""
    fn = CALLS[name][0]
    t = torch.empty(0) if t is None else t  # unused by those functions
    return loss_and_grads(lambda a, b: fn(a, b, impl), x, t, target_requires_grad=False)[:2]


def _compiled_on_one_and_two_threads(name: str, x: torch.Tensor, t: torch.Tensor | None):
    results = []
    for threads in (1, 2):
        with _threads(threads):
            results.append(_results(name, x, t, "compiled"))
    for what, one, two in zip(("loss", "d/dinput"), *results):
        assert torch.equal(one, two), f"{name}: the {what} differs between 1 and 2 threads"
    return results[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["expanded", "transposed", "strided"])
@pytest.mark.parametrize("name", list(CALLS))
def test_strided_and_expanded_operands_over_two_threads(name, layout, dtype):
    x, t = _operands(name, layout, dtype)
    assert_same_results(_compiled_on_one_and_two_threads(name, x, t), _results(name, x, t, "torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", CLASS_TARGETS + ["cross_entropy probabilities", "log_softmax"])
def test_rows_beyond_the_caches_over_two_threads(name, dtype):
    # Rows of 2^20 + 7 classes, 2 MiB in bfloat16: beyond any L2, so the row's later passes re-read it
    # from L3 or memory; 3 rows, split over two threads (test_native*.py have float32 rows of 300007)
    x, t = _operands(name, "contiguous", dtype, (3, (1 << 20) + 7))
    assert_same_results(_compiled_on_one_and_two_threads(name, x, t), _results(name, x, t, "torch"))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_out_of_range_targets_never_reach_memory_in_any_dtype(dtype, threads):
    x = torch.randn(N, C, generator=_gen(4)).to(dtype)
    for bad, row in ((C, N - 1), (-1, N // 2), (1 << 40, 0)):  # the last row is the second thread's
        t = torch.randint(0, C, (N,), generator=_gen(5))
        t[row] = bad
        with _threads(threads):
            for name in CLASS_TARGETS:
                with pytest.raises(ValueError, match="target"):
                    CALLS[name][0](x, t, "compiled")
        # Called directly, past the losses' checks: the kernels refuse the row instead of indexing with it
        grad, loss = torch.empty(N, C, 1, dtype=dtype), torch.empty(N, 1)
        with pytest.raises(ValueError, match="class index outside"):
            native.xent_rows(x.unsqueeze(-1), t, grad, None, None, loss, ignore_index=IGNORE, label_smoothing=0.0,
                             gamma=0.0, scale=1.0, threads=threads)
        with pytest.raises(ValueError, match="class index outside"):
            native_softmax.nll_rows(x.unsqueeze(-1), t, grad, None, loss, ignore_index=IGNORE, scale=1.0,
                                    threads=threads)
