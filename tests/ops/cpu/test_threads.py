"""The kernels' threads: the team of the OpenMP runtime torch runs on where it is found loaded (so the
kernels run on the workers torch's own ops use), else threads of the extensions' own. Either way the
rows are handed out in chunks from one counter and every result is the same, bit for bit."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import losskit.functional as LF
from losskit.ops.cpu import native, native_binary, native_pointwise, native_softmax

EXTENSIONS = (native.XENT, native_binary.EXTENSION, native_pointwise.EXTENSION, native_softmax.EXTENSION)


def _expects_openmp() -> bool:
    return (sys.platform.startswith("linux") and os.environ.get("LOSSKIT_OPENMP", "1") != "0"
            and "parallel backend: OpenMP" in torch.__config__.parallel_info())


def test_the_openmp_runtime_torch_runs_on_is_found():
    path, address = native.openmp_runtime()
    if _expects_openmp():
        assert address != 0 and os.path.basename(path).startswith(("libgomp", "libiomp5", "libomp")), path
    else:
        assert (path, address) == ("", 0)


def _calls():
    g = torch.Generator().manual_seed(0)
    n, c = 96, 4099  # 393504 elements: two threads, rows split unevenly between the chunks
    x = torch.randn(n, c, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    p = torch.rand(n, c, generator=g)
    return {
        "cross_entropy": (lambda a: LF.cross_entropy(a, y, label_smoothing=0.1), x),
        "cross_entropy bfloat16": (lambda a: LF.cross_entropy(a, y), x.bfloat16()),
        "focal_loss": (lambda a: LF.focal_loss(a, y, gamma=2.0), x),
        "binary_cross_entropy_with_logits": (lambda a: LF.binary_cross_entropy_with_logits(a, p), x),
        "kl_div": (lambda a: LF.kl_div(a.log_softmax(-1), p.softmax(-1), reduction="batchmean"), x),
        "mse_loss": (lambda a: LF.mse_loss(a, p), x),
        "entropy of logits": (lambda a: LF.entropy(a, logits=True).sum(), x),
        "softmax": (lambda a: LF.softmax(a, -1).square().sum(), x),
    }


def _loss_and_grad(fn, x):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("name", list(_calls()))
def test_openmp_team_and_own_threads_give_the_same_bits(name):
    address = native.openmp_runtime()[1]
    if not address:
        pytest.skip("no OpenMP runtime loaded by torch here: the kernels use their own threads only")
    fn, x = _calls()[name]
    saved = torch.get_num_threads()
    results = []
    try:
        torch.set_num_threads(2)
        for team in (address, 0):
            for ext in EXTENSIONS:
                native.module(ext).set_openmp(team)
            results.append(_loss_and_grad(fn, x))
    finally:
        torch.set_num_threads(saved)
        for ext in EXTENSIONS:
            native.module(ext).set_openmp(address)
    (loss_team, grad_team), (loss_own, grad_own) = results
    assert torch.equal(loss_team, loss_own) and torch.equal(grad_team, grad_own), name
