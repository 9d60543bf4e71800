"""Time and peak memory against size, one line per implementation, for every (case, dtype) of a run.

Drawn from tidy records (what ``losskit bench`` writes to CSV), so ``losskit bench`` and ``losskit plot``
draw the same figure. matplotlib is imported here, lazily, with the Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path

from ._report import GRADIENT, number
from ._run import ROOFLINE
from ._sizes import parse_size

_METRICS = (("time_ms", "forward+backward ms"), ("peak_mib", "peak MiB above inputs"))
#: The two pseudo-implementations that are floors, not measurements: drawn grey (dashed in line plots).
_FLOORS = (ROOFLINE, GRADIENT)
_GROUPS_PER_ROW = 2  # each group takes two axes (time, memory): four axes per row


def _numel(size: str) -> int:
    return math.prod(parse_size(size))


def _log_scale(ax, values: list[float], axis: str) -> None:
    if values and min(values) > 0:  # a log axis cannot show a zero (a tiny size's peak)
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        ax.minorticks_off()  # hundreds of tick artists per axes otherwise; slow to draw


def _bars(ax, series: dict[str, dict[str, float]], size: str, colors: dict[str, str]) -> None:
    """One size: a labelled horizontal bar per implementation."""
    impls = list(series)
    values = [series[impl][size] for impl in impls]
    ax.barh(range(len(impls)), values, color=[colors[impl] for impl in impls])
    ax.set_yticks(range(len(impls)), impls, fontsize=7)
    ax.invert_yaxis()
    _log_scale(ax, values, "x")
    for i, value in enumerate(values):
        ax.text(value, i, f" {number(value)}", va="center", fontsize=7)
    ax.margins(x=0.25)


def _lines(ax, series: dict[str, dict[str, float]], sizes: list[str], colors: dict[str, str]) -> None:
    """Several sizes: value against size, one line per implementation."""
    for impl, points in series.items():
        xs = [i for i, s in enumerate(sizes) if s in points]
        ax.plot(xs, [points[sizes[i]] for i in xs], marker="o", label=impl, color=colors[impl],
                linestyle="--" if impl in _FLOORS else "-")
    ax.set_xticks(range(len(sizes)), sizes, rotation=20, fontsize=7)
    _log_scale(ax, [v for points in series.values() for v in points.values()], "y")
    ax.legend(fontsize=7)


def plot(rows: list[dict[str, str]], path: Path) -> Path:
    """Write the figure of ``rows`` (tidy records) to ``path`` as PNG and return ``path``."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("losskit plots need matplotlib: pip install 'losskit[bench]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault((row["case"], row["dtype"]), []).append(row)
    if not groups:
        raise ValueError("nothing to plot: no measurements")
    n_rows = math.ceil(len(groups) / _GROUPS_PER_ROW)
    fig, axes = plt.subplots(n_rows, 2 * _GROUPS_PER_ROW, figsize=(18, 3.2 * n_rows), squeeze=False)
    flat = list(axes.flat)
    # One colour per implementation across the whole figure.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    impls = [impl for impl in dict.fromkeys(row["impl"] for row in rows) if impl not in _FLOORS]
    colors = {**{impl: palette[i % len(palette)] for i, impl in enumerate(impls)}, **dict.fromkeys(_FLOORS, "0.6")}
    for g, ((case, dtype), group) in enumerate(groups.items()):
        sizes = sorted({row["size"] for row in group}, key=_numel)
        for (metric, label), ax in zip(_METRICS, flat[2 * g:2 * g + 2]):
            series = {}  # impl -> {size: value}
            for row in group:
                if row["metric"] == metric:
                    series.setdefault(row["impl"], {})[row["size"]] = float(row["value"])
            if len(sizes) == 1:
                _bars(ax, series, sizes[0], colors)
            else:
                _lines(ax, series, sizes, colors)
            ax.set_title(f"{case} {sizes[0] + ' ' if len(sizes) == 1 else ''}({dtype})\n{label}", fontsize=9)
    for ax in flat[2 * len(groups):]:
        ax.set_visible(False)
    # Fixed margins: tight_layout measures every tick label of every axes and costs seconds on big grids.
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.4 / n_rows, top=1 - 0.25 / n_rows, wspace=0.45,
                        hspace=0.7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
