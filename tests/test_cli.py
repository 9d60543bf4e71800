"""The ``losskit`` command, run for real in a subprocess on tiny sizes (no timing assertions).

Cases whose losskit function is still missing must show up as unavailable, so the assertions here only
rely on the cases of the package skeleton (cross_entropy, softmax) being measured.
"""

from __future__ import annotations

import csv
import gc
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from losskit.bench import CASES, parse_size, parse_sizes
from losskit.bench._measure import MAX_CALLS_PER_ROUND, MIN_REPS
from losskit.bench._report import FIELDS
from losskit.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def losskit(*args: str, cwd: Path, **environ: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}  # the memory probe sets it
    env.update(OMP_NUM_THREADS="1", **environ)
    return subprocess.run([sys.executable, "-m", "losskit.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    done = losskit("bench", "--sizes", "16x32,8x16x32", "--reps", "2", "--out", str(out / "plots"),
                   "--csv", str(out / "tidy.csv"), cwd=out)
    assert done.returncode == 0, done.stderr
    return done, out


def table_lines(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("case "))
    return lines[start:]


def test_table_has_a_row_group_per_case(bench):
    done, _ = bench
    lines = table_lines(done.stdout)
    assert lines[0].split()[:5] == ["case", "size", "dtype", "impl", "ms"]
    starts = [line.split()[0] for line in lines[2:] if line and not line.startswith((" ", "-"))]
    for case in CASES:
        assert case.name in starts, f"{case.name} missing from\n{done.stdout}"
    row = next(i for i, line in enumerate(lines) if line.startswith("cross_entropy "))
    assert lines[row].split()[1:4] == ["16x32", "float32", "losskit"]
    assert "matches reference" in lines[row]
    assert lines[row + 1].split()[:2] == ["torch", "eager"]
    assert lines[row + 2].split()[0] == "roofline"


def test_progress_bar_goes_to_stderr(bench):
    done, _ = bench
    assert f"{len(CASES)}/{len(CASES)}" in done.stderr


def test_bench_prints_no_warning(bench):
    # The memory probe child once ran as `-m losskit.bench._memory_probe`, which runpy warns about.
    done, _ = bench
    assert "Warning" not in done.stderr, done.stderr


def test_help_states_the_repetition_floor_and_the_calls_a_round(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"never below {MIN_REPS}" in text and f"up to {MAX_CALLS_PER_ROUND} times" in text


def test_plot_written_where_printed(bench):
    done, out = bench
    printed = [line.removeprefix("plot: ") for line in done.stdout.splitlines() if line.startswith("plot: ")]
    assert printed == [str(out / "plots" / "bench.png")]
    assert_png(out / "plots" / "bench.png")


def test_csv_is_tidy(bench):
    _, out = bench
    with (out / "tidy.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == FIELDS
        rows = list(reader)
    ours = {(r["impl"], r["metric"]) for r in rows if r["case"] == "cross_entropy"}
    assert {("losskit", "time_ms"), ("torch eager", "time_ms"), ("losskit", "peak_mib"),
            ("torch eager", "peak_mib"), ("roofline", "time_ms"), ("gradient", "peak_mib")} <= ours
    for r in rows:
        assert float(r["value"]) >= 0
        assert r["size"] in ("16x32", "8x16x32") and r["dtype"] == "float32"
        assert f"torch={torch.__version__}" in r["versions"]


def test_plot_command_draws_the_csv(bench, tmp_path):
    _, out = bench
    done = losskit("plot", str(out / "tidy.csv"), "--out", str(tmp_path / "sweep.png"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_png(tmp_path / "sweep.png")


def test_env_prints_versions_and_machine(tmp_path):
    done = losskit("env", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert torch.__version__ in done.stdout
    for key in ("python", "losskit", "numpy", "cpu", "cores", "memory", "os"):
        assert f"  {key} " in done.stdout


def test_bad_argument_exits_non_zero_with_the_option_named(tmp_path):
    done = losskit("bench", "--sizes", "4096xabc", cwd=tmp_path)
    assert done.returncode == 2
    assert "--sizes" in done.stderr and "'abc'" in done.stderr


@pytest.mark.parametrize("argv, words", [
    (["bench", "--cases", "cross_entropy,nope"], ["--cases", "'nope'", "cross_entropy"]),
    (["bench", "--dtype", "float8"], ["--dtype", "'float8'", "bfloat16"]),
    (["bench", "--reps", "0"], ["--reps", "'0'"]),
    (["bench", "--device", "tpu"], ["--device", "'tpu'", "cuda"]),
    (["bench", "--budget", "-1"], ["--budget", "'-1'"]),
    (["bench", "--sizes", ""], ["--sizes"]),
    (["bench", "--cases", "linear_cross_entropy", "--sizes", "16x32"], ["--sizes", "NxDxV"]),
    (["bench", "--cases", "linear_cross_entropy", "--dtype", "float16"], ["--dtype", "float16", "AVX512-BF16"]),
    (["frobnicate"], ["frobnicate"]),
    ([], ["bench,plot,env"]),
])
def test_bad_arguments(argv, words, capsys):
    # Parse errors happen before the bench starts (and before it re-executes itself), so in-process.
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_cuda_without_a_device_says_what_torch_reports(monkeypatch, capsys):
    # as torch reports on a CUDA build without a driver (a CPU build: "Torch not compiled with CUDA enabled")
    def no_driver():
        raise RuntimeError("Found no NVIDIA driver on your system.")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", no_driver)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device: cuda" in err and "Found no NVIDIA driver on your system." in err


def test_cuda_without_a_device_exits_2_without_a_traceback(tmp_path):
    done = losskit("bench", "--device", "cuda", "--out", str(tmp_path), cwd=tmp_path, CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "argument --device: cuda, but torch finds no CUDA device" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing ran


def test_without_tqdm_and_matplotlib_the_bench_still_runs(monkeypatch, tmp_path, capsys):
    # a bare GPU machine may lack both: the progress is a line per phase, the CSV is written, the plot not
    for name in ("tqdm", "matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    try:
        assert main(["bench", "--cases", "mse_loss", "--sizes", "8x16", "--reps", "1", "--out", str(tmp_path)]) == 0
    finally:
        gc.unfreeze()  # the bench froze this process's objects
    out, err = capsys.readouterr()
    assert "mse_loss 8x16 float32: timing" in err.splitlines()
    assert "plot: not drawn (losskit plots need matplotlib" in out and (tmp_path / "bench.csv").is_file()


def test_plot_rejects_a_file_that_is_not_a_bench_csv(tmp_path, capsys):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for path, words in ((tmp_path / "other.csv", ["missing column", "metric"]), (tmp_path / "none.csv", ["none.csv"])):
        with pytest.raises(SystemExit) as exit_info:
            main(["plot", str(path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert all(word in err for word in words), err


def test_list_names_every_case_and_its_reference(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for case in CASES:
        assert case.name in out and case.reference_text in out


def test_size_grammar():
    assert parse_size("4kx32k") == (4096, 32768)
    assert parse_size("2048x1024x32768") == (2048, 1024, 32768)
    assert parse_size("1m") == (1 << 20,)
    assert parse_sizes("1024x4096, 4096x32768") == [(1024, 4096), (4096, 32768)]
    for bad in ("0x5", "4096x", "x", "4.5x2", "-3x4", "4kbx2"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)
