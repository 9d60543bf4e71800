"""The bench figure from tidy records: lines against size for sweeps, bars for a single size."""

from __future__ import annotations

import matplotlib.image
import pytest

from losskit.bench import plot, read_csv, write_csv


def rows(case: str, sizes: list[str]) -> list[dict[str, str]]:
    return [{"case": case, "impl": impl, "size": size, "dtype": "float32", "metric": metric,
             "value": str(value * (i + 1)), "machine": "m", "versions": "v"}
            for i, size in enumerate(sizes)
            for impl, metric, value in (("losskit", "time_ms", 2.0), ("torch eager", "time_ms", 5.0),
                                        ("roofline", "time_ms", 1.0), ("losskit", "peak_mib", 8.0),
                                        ("torch eager", "peak_mib", 24.0), ("gradient", "peak_mib", 8.0))]


def test_sweep_and_single_size_groups_draw_one_png(tmp_path):
    records = rows("cross_entropy", ["1024x4096", "64x128", "4096x32768"]) + rows("mse_loss", ["16x32"])
    write_csv(records, tmp_path / "bench.csv")
    assert read_csv(tmp_path / "bench.csv") == records
    path = plot(records, tmp_path / "fig" / "bench.png")
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_a_non_numeric_value_is_named(tmp_path):
    records = rows("mse_loss", ["16x32"])
    records[3]["value"] = "fast"
    write_csv(records, tmp_path / "bench.csv")
    with pytest.raises(ValueError, match="line 5: value 'fast'"):
        read_csv(tmp_path / "bench.csv")


def test_nothing_to_plot(tmp_path):
    with pytest.raises(ValueError, match="nothing to plot"):
        plot([], tmp_path / "empty.png")
