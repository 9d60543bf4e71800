"""Every losskit function refuses a tensor argument in a sparse layout with a TypeError that names the
argument (the kernels index storage, which a sparse tensor lacks; torch's own errors there name no
argument). The calls are test_compile's: one case per function of losskit.functional."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_compile import CASES

import losskit.functional as LF


def _sparse_variants(name):
    """(argument name, args, kwargs) with that one tensor argument made sparse (COO), for each of them."""
    args, kwargs = CASES[name].make()
    names = list(inspect.signature(getattr(LF, name)).parameters)
    for k, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            yield names[k], args[:k] + (a.detach().to_sparse(),) + args[k + 1:], kwargs
    for key, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            yield key, args, {**kwargs, key: v.to_sparse()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sparse_arguments_are_refused_by_name(name):
    variants = list(_sparse_variants(name))
    assert variants  # every function takes at least one tensor
    for arg, args, kwargs in variants:
        with pytest.raises(TypeError, match=f"^{arg} must be a dense tensor, got layout torch.sparse_coo"):
            getattr(LF, name)(*args, **kwargs)


def test_modules_refuse_a_sparse_input():
    x, t = torch.randn(4, 5).to_sparse(), torch.tensor([0, 3, 1, 4])
    with pytest.raises(TypeError, match="^input must be a dense tensor"):
        CASES["cross_entropy"].module()(x, t)
