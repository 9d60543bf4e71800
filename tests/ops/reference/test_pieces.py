"""The chunked elementwise driver: pieces cover a tensor exactly once, and a fused loss keeps nothing of
the input's size but its gradients (and a "none" output)."""

from __future__ import annotations

import textwrap

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losskit.ops.reference.elementwise import CHUNK, pieces
from losskit.testing import measure_peaks_in_child


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 6), min_size=0, max_size=4), chunk=st.integers(1, 40))
def test_pieces_cover_every_element_once(shape, chunk):
    hits = torch.zeros(shape, dtype=torch.int32)
    for idx in pieces(shape, chunk):
        view = hits[idx]
        assert view.numel() <= chunk
        view += 1
    assert bool((hits == 1).all())


def test_pieces_are_few_and_balanced():
    # A long last dim is cut into equal slices, not one full slice and a sliver.
    sizes = [hits.stop - hits.start for (*_, hits) in pieces((2, 2 * CHUNK + 2), CHUNK)]
    assert len(sizes) == 6 and max(sizes) - min(sizes) <= 1
    assert list(pieces((3, 5), CHUNK)) == [()]


_PROBE = textwrap.dedent("""
    import torch, losskit.functional as LF
    n = 1 << 22  # 4M float32 elements: 16 MiB per input-sized tensor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g).requires_grad_()
    t = torch.rand(n, generator=g).requires_grad_()
    w = torch.rand(n, generator=g)
    calls = {
        "bce_with_logits": lambda: LF.binary_cross_entropy_with_logits(x, t, w, pos_weight=w),
        "bce": lambda: LF.binary_cross_entropy(t, w, w),
        "soft_margin": lambda: LF.multilabel_soft_margin_loss(x.view(64, -1), t.view(64, -1)),
        "focal": lambda: LF.sigmoid_focal_loss(x, t, reduction="mean"),
        "mse": lambda: LF.mse_loss(x, t, weight=w),
        "rmse": lambda: LF.rmse_loss(x, t),
        "mse_none": lambda: LF.mse_loss(x, t, reduction="none"),
    }
""")


def test_only_gradients_and_output_are_input_sized():
    peaks = measure_peaks_in_child(_PROBE)
    tensor = (1 << 22) * 4
    # Budget beyond the input-sized results: about a dozen live float32 pieces of CHUNK elements.
    pieces_budget = 12 * CHUNK * 4
    results = {"bce_with_logits": 2, "bce": 1, "soft_margin": 2, "focal": 2, "mse": 2, "rmse": 2, "mse_none": 3}
    for name, n_tensors in results.items():
        assert peaks[name] <= n_tensors * tensor + pieces_budget, (name, peaks[name] / 2**20)
