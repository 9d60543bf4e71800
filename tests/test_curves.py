"""losskit.curves: the PNG is written and valid, every panel is titled and labelled, the curves are the
formulas they claim to be."""

from __future__ import annotations

import re
import sys

import matplotlib.image
import pytest
import torch

from losskit.cli import main
from losskit.curves import _P, loss_curves, plot_curves
from losskit.testing import assert_close

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_png_written_and_valid(tmp_path):
    path = tmp_path / "curves.png"
    plot_curves(path, gammas=(1.0, 3.0), vector=[0.5, -2.0, 4.0])
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)  # decodes the whole file
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 600
    assert pixels.std() > 0  # something was drawn


def test_panels_are_titled_labelled_and_hold_the_curves(tmp_path):
    figure = plot_curves(tmp_path / "c.png", gammas=(2.0,), vector=[1.0, 2.0])
    loss, soft, log = figure.axes
    assert loss.get_title() == "Loss of one example vs. confidence in the true class"
    assert loss.get_xlabel() == "predicted probability of the true class, p"
    assert loss.get_ylabel() == "loss"
    assert [line.get_label() for line in loss.get_lines()] == [
        "cross-entropy  -log p", "focal loss, gamma=2", "binary cross-entropy (target 1)", "squared error  (1 - p)^2"]
    for ax, name in ((soft, "softmax"), (log, "log_softmax")):
        assert ax.get_title() == f"{name} of a vector"
        assert ax.get_xlabel() and ax.get_ylabel()
        heights = [bar.get_height() for bar in ax.patches]
        expected = getattr(torch, name)(torch.tensor([1.0, 2.0], dtype=torch.float64), 0).tolist()
        assert heights == pytest.approx([1.0, 2.0] + expected)  # the logits, then the transform


def test_curves_are_their_formulas():
    p = _P
    curves = loss_curves(gammas=(0.0, 0.5, 2.0))
    assert_close(curves["cross-entropy  -log p"], -p.log())
    for g in (0.0, 0.5, 2.0):
        assert_close(curves[f"focal loss, gamma={g:g}"], -((1 - p) ** g) * p.log())
    assert_close(curves["binary cross-entropy (target 1)"], -p.log())
    assert_close(curves["squared error  (1 - p)^2"], (1 - p) ** 2)


@pytest.mark.parametrize("kwargs, name", [({"gammas": (1.0, -1.0)}, "gammas"), ({"vector": [[1.0, 2.0]]}, "vector"),
                                          ({"vector": []}, "vector")])
def test_bad_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        plot_curves(tmp_path / "c.png", **kwargs)


def test_path_must_be_png(tmp_path):
    with pytest.raises(ValueError, match="path"):
        plot_curves(tmp_path / "c.jpg")


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what the import meets when not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'losskit[plot]'")):
        plot_curves(tmp_path / "c.png")


def test_cli_plot_curves(tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", "curves", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"plot: {out}"]
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_cli_plot_curves_bad_out(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", "curves", "--out", str(tmp_path / "curves.jpg")])
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err
