"""A learner's view of the losses: one PNG of how each loss treats a prediction (``losskit plot curves``).

Left: the loss of one example against ``p``, the predicted probability of its true class, for
cross-entropy (``-log p``), focal loss at several ``gamma`` (``-(1 - p)**gamma * log p``: confident,
correct predictions are down-weighted), binary cross-entropy of a positive example (also ``-log p``, drawn
dashed over cross-entropy) and the squared error ``(1 - p)**2`` (bounded: a confident mistake costs at most 1).
Middle and right: a vector of logits beside its ``softmax`` (positive, sums to 1, order kept) and
its ``log_softmax`` (the log-probabilities cross-entropy reads, all <= 0).

Every curve is computed by ``losskit.functional`` itself, so the picture shows what the library computes.
matplotlib is imported only here (``pip install 'losskit[plot]'``) and drawn on a pyplot-free ``Figure``
(the Agg canvas), so no display or global backend is touched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import _checks
from . import functional as LF

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DEFAULT_GAMMAS", "DEFAULT_VECTOR", "plot_curves"]

DEFAULT_GAMMAS: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0)
DEFAULT_VECTOR: tuple[float, ...] = (2.0, 1.0, 0.1, -1.0, 3.0)
#: Probabilities of the true class on the x axis: (0, 1], from where -log p is about 7 up to exactly 1.
_P = torch.linspace(1e-3, 1.0, 400, dtype=torch.float64)


def _matplotlib_figure() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("losskit's plots need matplotlib; install it with pip install 'losskit[plot]'") from error
    return Figure


def loss_curves(gammas: Sequence[float] = DEFAULT_GAMMAS) -> dict[str, torch.Tensor]:
    """Each loss of one example as a function of ``p`` (the values of ``_P``): label -> (len(_P),) tensor."""
    # Two classes with probabilities (p, 1 - p): the logits log(p), log(1 - p) and the true class 0.
    # -log p does not depend on how the remaining 1 - p is split, so two classes show every C.
    logits = torch.stack([_P.log(), torch.log1p(-_P)], dim=1)  # (P, 2), -inf at p == 1 is a valid logit
    true = torch.zeros(len(_P), dtype=torch.long)
    ones = torch.ones_like(_P)
    curves = {"cross-entropy  -log p": LF.cross_entropy(logits, true, reduction="none")}
    for g in gammas:
        curves[f"focal loss, gamma={g:g}"] = LF.focal_loss(logits, true, gamma=g, reduction="none")
    curves["binary cross-entropy (target 1)"] = LF.binary_cross_entropy(_P, ones, reduction="none")
    curves["squared error  (1 - p)^2"] = LF.mse_loss(_P, ones, reduction="none")
    return curves


def plot_curves(path: str | os.PathLike[str], *, gammas: Sequence[float] = DEFAULT_GAMMAS,
                vector: Sequence[float] = DEFAULT_VECTOR) -> Figure:
    """Write the loss curves and the softmax / log_softmax of ``vector`` to the PNG file ``path``.

    ``gammas``: the focal-loss exponents drawn (each >= 0). ``vector``: the logits shown in the two bar
    charts. Returns the matplotlib ``Figure`` (already saved) so that callers can inspect or re-save it.
    """
    for g in gammas:
        _checks.number_in("gammas", g, 0.0)
    x = torch.as_tensor(vector, dtype=torch.float64)
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"vector must be a non-empty 1-D sequence of numbers, got shape {tuple(x.shape)}")
    if not os.fspath(path).lower().endswith(".png"):
        raise ValueError(f"path must name a .png file, got {os.fspath(path)!r}")

    figure = _matplotlib_figure()(figsize=(15, 4.6), layout="constrained")
    ax_loss, ax_soft, ax_log = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1.5, 1, 1]})
    p = _P.numpy()
    for label, curve in loss_curves(gammas).items():
        style = "--" if label.startswith("binary") else "-"
        ax_loss.plot(p, curve.numpy(), style, label=label)
    ax_loss.set(title="Loss of one example vs. confidence in the true class",
                xlabel="predicted probability of the true class, p", ylabel="loss", xlim=(0, 1), ylim=(0, 5))
    ax_loss.legend(fontsize="small")
    ax_loss.grid(alpha=0.3)

    index = range(x.numel())
    panels = ((ax_soft, "softmax", LF.softmax(x, dim=0)), (ax_log, "log_softmax", LF.log_softmax(x, dim=0)))
    for ax, name, values in panels:
        ax.bar([i - 0.2 for i in index], x.numpy(), width=0.4, label="logits x", color="tab:gray")
        ax.bar([i + 0.2 for i in index], values.numpy(), width=0.4, label=f"{name}(x)", color="tab:blue")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(title=f"{name} of a vector", xlabel="component i", ylabel="value", xticks=list(index))
        ax.legend(fontsize="small")
    figure.savefig(path, format="png", dpi=100)
    return figure
