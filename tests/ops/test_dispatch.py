"""The one table that chooses a backend: every rule of :mod:`losskit.ops._dispatch`, and that a loss
computed by each backend it can reach here agrees with the reference."""

from __future__ import annotations

import importlib

import pytest
import torch

import losskit.functional as LF
from losskit.ops import _dispatch
from losskit.ops.cpu import native
from losskit.testing import assert_close

OPS = sorted(_dispatch._TABLE)


def test_impl_is_validated():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'compiled', 'triton', 'torch'\), got 'fast'"):
        _dispatch.backend("xent_rows", "fast", x)
    with pytest.raises(ValueError, match="impl"):
        LF.cross_entropy(x, torch.tensor([0, 2]), impl="cuda")
    with pytest.raises(ValueError, match="impl"):
        LF.linear_cross_entropy(x, torch.randn(4, 3), torch.tensor([0, 2]), impl=None)


@pytest.mark.parametrize("op", OPS)
def test_torch_is_the_reference_everywhere(op):
    assert _dispatch.backend(op, "torch", torch.randn(2, 3)) == "reference"
    assert _dispatch.backend(op, "torch", torch.randn(2, 3, device="meta")) == "reference"


def test_auto_on_cpu_is_the_c_kernel_when_built_else_the_composite(monkeypatch):
    x = torch.randn(2, 3)
    for op in ("xent_rows", "nll_rows", "softmax_rows", "entropy_rows", "binary", "pointwise"):
        assert _dispatch.backend(op, "auto", x) == "cpu"
    assert _dispatch.backend("shard_stats", "auto", x) == "composite"  # no C kernel of its own
    monkeypatch.setattr(native, "available", lambda name=None: False)
    assert _dispatch.backend("xent_rows", "auto", x) == "composite"


def test_auto_elsewhere_is_the_composite():
    meta = torch.randn(2, 3, device="meta")
    assert _dispatch.backend("xent_rows", "auto", meta) == "composite"
    # a dtype the kernels do not store
    x8 = torch.randn(2, 3).to(torch.float8_e4m3fn)
    assert _dispatch.backend("binary", "auto", x8) == "composite"


def test_auto_under_torch_compile_and_vmap_is_the_composite():
    x = torch.randn(4, 6)
    seen = []

    def probe(a):
        seen.append(_dispatch.backend("xent_rows", "auto", a))
        return a.sum()

    torch.compile(probe, backend="eager", fullgraph=True)(x)
    torch.vmap(probe)(x)
    assert seen == ["composite", "composite"]


def test_compiled_and_triton_refuse_what_they_cannot_run(monkeypatch):
    meta = torch.randn(2, 3, device="meta")
    with pytest.raises(ValueError, match="impl='compiled' runs on CPU tensors .* got tensors on meta"):
        _dispatch.backend("xent_rows", "compiled", meta)
    with pytest.raises(ValueError, match="impl='triton' runs on CUDA tensors"):
        _dispatch.backend("xent_rows", "triton", meta)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _dispatch.backend("xent_rows", "triton", torch.randn(2, 3))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        LF.softmax(torch.randn(2, 3), 1, impl="triton")


def test_missing_triton_is_an_import_error_naming_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_dispatch, "_triton", [ImportError("No module named 'triton'")])
    with pytest.raises(ImportError, match=r"needs triton 3.8 or newer, .*No module named 'triton'.*pip install 'triton>=3.8'"):
        _dispatch.backend("xent_rows", "triton", torch.randn(2, 3))


def test_triton_takes_no_float64(monkeypatch):
    pytest.importorskip("triton", minversion="3.8")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.backend("xent_rows", "triton", torch.randn(2, 3)) == "triton"
    with pytest.raises(ValueError, match="does not take torch.float64"):
        _dispatch.backend("xent_rows", "triton", torch.randn(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("op", OPS)
def test_every_table_entry_names_a_function(op):
    for backend, entry in _dispatch._TABLE[op].items():
        if backend == "triton" and importlib.util.find_spec("triton") is None:
            continue
        module, function = entry.split(":")[:2]
        if backend == "triton":
            continue  # imported by tests/ops/triton under the interpreter (a plain import needs a GPU driver)
        assert callable(getattr(importlib.import_module(f"losskit.ops.{module}"), function)), entry


def test_composite_is_reached_and_agrees_with_the_reference(monkeypatch):
    # The C kernels made unavailable: "auto" is then torch's own loss, whose result is the reference's.
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, 3, 3, 1])
    ref = LF.cross_entropy(x, t, label_smoothing=0.1, impl="torch")
    (g_ref,) = torch.autograd.grad(ref, x)
    monkeypatch.setattr(native, "available", lambda name=None: False)
    out = LF.cross_entropy(x, t, label_smoothing=0.1)
    (g,) = torch.autograd.grad(out, x)
    assert out.grad_fn.name() != "_PrecomputedGradBackward"  # torch's own autograd, not a fused gradient
    assert_close(out, ref)
    assert_close(g, g_ref)


def test_a_triton_too_old_for_the_kernels_counts_as_absent(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.6.0"))
    monkeypatch.setattr(_dispatch, "_triton", [])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ImportError, match=r"triton 3.6.0 is older than 3.8"):
        _dispatch.backend("xent_rows", "triton", torch.randn(2, 3))
    monkeypatch.setattr(_dispatch, "_triton", [])
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.8.0+git1234"))
    assert _dispatch.triton_error() is None


def test_gpus_older_than_the_kernels_get_the_composite(monkeypatch):
    capability = {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability["now"])
    cuda = torch.device("cuda", 0)
    for cap, f32, bf16 in (((7, 0), False, False), ((7, 5), True, False), ((8, 0), True, True), ((9, 0), True, True)):
        capability["now"] = cap
        _dispatch._capability.cache_clear()
        assert _dispatch.gpu_runs_triton(cuda, [torch.float32, torch.int64]) is f32, cap
        assert _dispatch.gpu_runs_triton(cuda, [torch.bfloat16]) is bf16, cap
    _dispatch._capability.cache_clear()
