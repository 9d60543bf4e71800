"""The bench figure from tidy records: a summary row of ratios per loss, then lines against size for
sweeps and bars for a single size."""

from __future__ import annotations

import matplotlib.image
import pytest

from losskit.bench import plot, read_csv, write_csv
from losskit.bench._plot import Summary, figure, summary


def rows(case: str, sizes: list[str], dtype: str = "float32", compiled: float | None = None) -> list[dict[str, str]]:
    """Records of one case: every value scales with the size's position, so ratios are the same at
    every size (losskit 2 ms against eager 5 ms, 8 MiB against 24 MiB, torch.compile ``compiled`` ms)."""
    measured = [("losskit", "time_ms", 2.0), ("torch eager", "time_ms", 5.0), ("roofline", "time_ms", 1.0),
                ("losskit", "peak_mib", 8.0), ("torch eager", "peak_mib", 24.0), ("gradient", "peak_mib", 8.0)]
    if compiled is not None:
        measured.append(("torch.compile", "time_ms", compiled))
    return [{"case": case, "impl": impl, "size": size, "dtype": dtype, "metric": metric,
             "value": str(value * (i + 1)), "machine": "m", "versions": "v"}
            for i, size in enumerate(sizes) for impl, metric, value in measured]


def test_sweep_and_single_size_groups_draw_one_png(tmp_path):
    records = rows("cross_entropy", ["1024x4096", "64x128", "4096x32768"]) + rows("mse_loss", ["16x32"])
    write_csv(records, tmp_path / "bench.csv")
    assert read_csv(tmp_path / "bench.csv") == records
    path = plot(records, tmp_path / "fig" / "bench.png")
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_summary_is_the_ratios_at_each_case_largest_size():
    records = rows("cross_entropy", ["1024x4096", "4096x32768", "64x128"], compiled=3.0) + rows("mse_loss", ["16x32"])
    # At the largest size a faster eager than the other sizes' would show: 4096x32768 must be picked.
    for r in records:
        if r["size"] == "4096x32768" and r["impl"] == "torch eager" and r["metric"] == "time_ms":
            r["value"] = "100"
    assert summary(records) == [
        Summary("cross_entropy", "4096x32768", vs_eager=100 / 4.0, vs_compiled=1.5, memory=3.0),
        Summary("mse_loss", "16x32", vs_eager=2.5, vs_compiled=None, memory=3.0),
    ]


def test_summary_names_the_dtype_when_several_and_skips_cases_losskit_did_not_run():
    records = rows("kl_div", ["8x8"]) + rows("kl_div", ["8x8"], dtype="bfloat16")
    records += [r for r in rows("entropy", ["8x8"]) if r["impl"] != "losskit"]
    labels = [entry.label for entry in summary(records)]
    assert labels == ["kl_div (float32)", "kl_div (bfloat16)"]


def test_a_zero_peak_has_no_memory_ratio():
    records = rows("softmax", ["2x2"])
    for r in records:
        if r["metric"] == "peak_mib":
            r["value"] = "0"
    assert summary(records)[0].memory is None


def test_figure_opens_with_the_summary_row():
    records = rows("cross_entropy", ["64x128"], compiled=4.0) + rows("mse_loss", ["16x32"])
    fig = figure(records)
    eager, compiled, memory = fig.axes[:3]
    assert "speed-up over torch eager" in eager.get_title()
    assert "speed-up over torch.compile" in compiled.get_title()
    assert "peak" in memory.get_title()
    assert [bar.get_width() for bar in eager.patches] == [2.5, 2.5]
    assert [bar.get_width() for bar in compiled.patches] == [2.0]  # mse_loss has no torch.compile time
    assert [bar.get_width() for bar in memory.patches] == [3.0, 3.0]
    assert [label.get_text() for label in eager.get_yticklabels()] == ["cross_entropy 64x128", "mse_loss 16x32"]
    # Then two panels (time, memory) per case.
    assert sum(ax.get_visible() for ax in fig.axes[3:]) == 4


def test_a_non_numeric_value_is_named(tmp_path):
    records = rows("mse_loss", ["16x32"])
    records[3]["value"] = "fast"
    write_csv(records, tmp_path / "bench.csv")
    with pytest.raises(ValueError, match="line 5: value 'fast'"):
        read_csv(tmp_path / "bench.csv")


def test_nothing_to_plot(tmp_path):
    with pytest.raises(ValueError, match="nothing to plot"):
        plot([], tmp_path / "empty.png")
