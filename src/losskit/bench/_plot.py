"""The bench figure: a summary row, then time and peak memory against size for every (case, dtype).

The summary row is what a reader takes in at a glance: per loss, how many times faster losskit is than
eager torch and than ``torch.compile``, and how many times less memory it takes than eager (one bar each,
log scale, 1x marked). Below it, one pair of panels per (case, dtype): time and peak memory of every
implementation, lines against size for sweeps, bars for a single size.

Drawn from tidy records (what ``losskit bench`` writes to CSV), so ``losskit bench`` and ``losskit plot``
draw the same figure. matplotlib is imported here, lazily, and draws on a pyplot-free ``Figure`` (the Agg
canvas): no display, no global backend touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ._cases import COMPILED, EAGER, LOSSKIT, ROOFLINE
from ._report import GRADIENT, number
from ._sizes import parse_size

_METRICS = (("time_ms", "forward+backward ms"), ("peak_mib", "peak MiB above inputs"))
#: The two pseudo-implementations that are floors, not measurements: drawn grey (dashed in line plots).
_FLOORS = (ROOFLINE, GRADIENT)
_GROUPS_PER_ROW = 2  # each group takes two axes (time, memory): four axes per row
_FIG_WIDTH = 18  # inches; at dpi=80 a 1440-pixel-wide PNG
_CASE_ROW_HEIGHT = 3.2  # inches per row of per-case panels
_BAR_HEIGHT = 0.22  # inches per bar of the summary


@dataclass(frozen=True)
class Summary:
    """One bar group of the summary row: a (case, dtype) at its largest measured size."""
    label: str
    size: str
    #: Eager's time over losskit's: how many times faster losskit is. None where not measured.
    vs_eager: float | None
    vs_compiled: float | None
    #: Eager's peak memory over losskit's: how many times less memory losskit takes.
    memory: float | None


def _numel(size: str) -> int:
    return math.prod(parse_size(size))


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator or numerator <= 0:
        return None  # not measured, or a zero peak (a tiny size) that no ratio can show
    return numerator / denominator


def summary(rows: list[dict[str, str]]) -> list[Summary]:
    """Per (case, dtype), in the order of ``rows``, the ratios at its largest size where losskit was
    timed: eager / losskit and torch.compile / losskit time, eager / losskit peak memory."""
    groups: dict[tuple[str, str], dict[str, dict[tuple[str, str], float]]] = {}
    for row in rows:
        sizes = groups.setdefault((row["case"], row["dtype"]), {})
        sizes.setdefault(row["size"], {})[(row["impl"], row["metric"])] = float(row["value"])
    dtypes = {dtype for _, dtype in groups}
    entries = []
    for (case, dtype), sizes in groups.items():
        timed = [size for size, values in sizes.items() if (LOSSKIT, "time_ms") in values]
        if not timed:
            continue
        size = max(timed, key=_numel)
        values = sizes[size]
        ours_ms, ours_peak = values[(LOSSKIT, "time_ms")], values.get((LOSSKIT, "peak_mib"))
        entries.append(Summary(
            label=case if len(dtypes) == 1 else f"{case} ({dtype})", size=size,
            vs_eager=_ratio(values.get((EAGER, "time_ms")), ours_ms),
            vs_compiled=_ratio(values.get((COMPILED, "time_ms")), ours_ms),
            memory=_ratio(values.get((EAGER, "peak_mib")), ours_peak)))
    return entries


def _log_scale(ax, values: list[float], axis: str) -> None:
    if values and min(values) > 0:  # a log axis cannot show a zero (a tiny size's peak)
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        ax.minorticks_off()  # hundreds of tick artists per axes otherwise; slow to draw


def _summary_panel(ax, entries: list[Summary], field: str, title: str) -> None:
    """One summary panel: a bar per entry for ``field`` (a ratio; > 1 means losskit is ahead)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_title(title, fontsize=10)
    measured = [(i, getattr(e, field)) for i, e in enumerate(entries) if getattr(e, field) is not None]
    if not measured:
        ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", fontsize=9,
                color="0.4")
        ax.set_xticks([])
        return
    ys, values = zip(*measured)
    # Green where losskit is ahead, red where it is behind, grey within 5% of even.
    ax.barh(ys, values, height=0.7,
            color=["tab:green" if v >= 1.05 else "tab:red" if v <= 0.95 else "0.6" for v in values])
    ax.axvline(1, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    low, high = min(min(values), 1.0), max(max(values), 1.0)
    ax.set_xlim(low / 1.5, high * 3)  # room for the value labels right of the bars
    for y, value in measured:
        ax.text(value, y, f" {value:.2f}x", va="center", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)


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


def figure(rows: list[dict[str, str]]):
    """The matplotlib Figure of ``rows`` (tidy records): the summary row above the per-case panels."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("losskit plots need matplotlib: pip install 'losskit[bench]'") from error

    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault((row["case"], row["dtype"]), []).append(row)
    if not groups:
        raise ValueError("nothing to plot: no measurements")
    entries = summary(rows)
    n_rows = math.ceil(len(groups) / _GROUPS_PER_ROW)
    # Heights in inches: the summary's bars, a gap for titles and labels, the per-case rows.
    top, gap, bottom = 0.5, 0.9, 0.6
    summary_h = _BAR_HEIGHT * max(len(entries), 3) + 0.3
    height = top + summary_h + gap + _CASE_ROW_HEIGHT * n_rows + bottom
    fig = Figure(figsize=(_FIG_WIDTH, height))
    # Fixed margins: tight_layout measures every tick label of every axes and costs seconds on big grids.
    summary_grid = fig.add_gridspec(1, 3, left=0.14, right=0.97, wspace=0.12,
                                    top=1 - top / height, bottom=1 - (top + summary_h) / height)
    first = fig.add_subplot(summary_grid[0])
    axes = [first, fig.add_subplot(summary_grid[1], sharey=first), fig.add_subplot(summary_grid[2], sharey=first)]
    panels = (("vs_eager", f"speed-up over {EAGER} (its time / losskit's)"),
              ("vs_compiled", f"speed-up over {COMPILED} (its time / losskit's)"),
              ("memory", f"memory: {EAGER}'s peak / losskit's"))
    for ax, (field, title) in zip(axes, panels):
        _summary_panel(ax, entries, field, title)
    first.set_yticks(range(len(entries)), [f"{e.label} {e.size}" for e in entries], fontsize=7)
    first.set_ylim(len(entries) - 0.5, -0.5)  # first entry on top
    for ax in axes[1:]:
        ax.tick_params(axis="y", labelleft=False)

    case_grid = fig.add_gridspec(n_rows, 2 * _GROUPS_PER_ROW, left=0.06, right=0.99, wspace=0.45, hspace=0.7,
                                 top=1 - (top + summary_h + gap) / height, bottom=bottom / height)
    flat = [fig.add_subplot(case_grid[r, c]) for r in range(n_rows) for c in range(2 * _GROUPS_PER_ROW)]
    # One colour per implementation across the whole figure.
    palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
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
    return fig


def plot(rows: list[dict[str, str]], path: Path) -> Path:
    """Write the figure of ``rows`` (tidy records) to ``path`` as PNG and return ``path``."""
    fig = figure(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
