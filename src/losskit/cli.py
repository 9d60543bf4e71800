"""The ``losskit`` command: ``losskit bench``, ``losskit plot`` and ``losskit env``.

``losskit bench`` runs every case of the catalogue (losskit against its torch reference) on quick
default sizes and prints a table, writes a PNG plot and a tidy CSV, and prints their paths. Timing runs
in this process with the default allocator; peak memory in a child process started with
``MALLOC_MMAP_THRESHOLD_=65536`` (see :mod:`losskit.bench._memory_probe`). ``losskit bench --device cuda``
runs the GPU-sized cases on the GPU (``benchmarks/gpu_bench.sh`` is the script a lent GPU machine runs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _arg_type(parse):  # argparse reports ArgumentTypeError's message next to the option's name
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    convert.__name__ = parse.__name__
    return convert


def _choose(text: str, choices: dict, what: str) -> list:
    """The values of a comma-separated list of keys of ``choices``; ValueError naming the unknown ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise ValueError(f"unknown {what}(s) {', '.join(map(repr, unknown)) or repr(text)}; "
                         f"choose from: {', '.join(choices)}")
    return [choices[name] for name in names]


def _cases(text: str) -> list:
    from .bench import BY_NAME

    return _choose(text, BY_NAME, "case")


def _dtypes(text: str) -> list[torch.dtype]:
    return _choose(text, _DTYPES, "dtype")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"must be a positive integer, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _sizes(text: str) -> list[tuple[int, ...]]:
    from .bench import parse_sizes

    return parse_sizes(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="losskit", description="losskit: benchmark, plot, environment.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,plot,env}")

    bench = sub.add_parser("bench", help="time and peak memory of every loss against torch",
                           description="Forward+backward time and peak memory of each losskit loss against its "
                                       "torch reference, side by side on the same inputs. Per case and size: the "
                                       "inputs are built once; each implementation is called once untimed "
                                       "(losskit's result is checked against the reference); peak memory above the "
                                       "inputs is measured in a child process (Linux VmHWM, "
                                       "MALLOC_MMAP_THRESHOLD_=65536); then the timed rounds call the "
                                       "implementations interleaved round-robin (the fast ones several times a "
                                       "round), and the median is reported. On CPU a bfloat16 case also times losskit "
                                       "on float32 inputs ('losskit float32') in the same rounds: its "
                                       "bfloat16-per-element verdict is the ratio of the two. With --device cuda, "
                                       "calls are timed with CUDA events and peak memory is read from the CUDA "
                                       "caching allocator in this process.")
    bench.add_argument("--cases", type=_arg_type(_cases), metavar="NAME,...",
                       help="cases to run (default: all; with --device cuda, those with GPU sizes; see --list)")
    bench.add_argument("--sizes", type=_arg_type(_sizes), metavar="SIZE,...",
                       help="sizes to sweep instead of each case's default, e.g. 1024x4096,4kx32k for (N, C) cases "
                            "and 2kx1kx32k for linear_cross_entropy's (N, D, V); a case runs the sizes whose number "
                            "of extents matches its dimensions")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="cpu (default), or cuda: the cases with GPU sizes (cross_entropy 8192x128256 in bfloat16 "
                            "and float32, the elementwise losses at 64M elements, linear_cross_entropy 8192x4096x128256 "
                            "in bfloat16) against torch eager, torch.compile (with --compile), Liger-Kernel and Cut "
                            "Cross-Entropy where they import; timed with CUDA events, peak memory from "
                            "torch.cuda.max_memory_allocated")
    bench.add_argument("--dtype", type=_arg_type(_dtypes), metavar="DTYPE,...",
                       help=f"input dtypes, from {', '.join(_DTYPES)} (default: float32; with --device cuda, each "
                            "case's GPU dtypes)")
    bench.add_argument("--reps", type=_arg_type(_positive_int), default=5,
                       help="timed rounds per case after the warm-up, each calling every implementation once and the "
                            "fast ones up to 5 times (default: 5)")
    bench.add_argument("--budget", type=_arg_type(_seconds), default=10.0, metavar="SECONDS",
                       help="cut the rounds of a case to what fits in this many seconds, never below 3 "
                            "(default: 10; 0: no limit)")
    bench.add_argument("--compile", action="store_true",
                       help="add torch.compile(reference) as a baseline (slow: compiles every case and size)")
    bench.add_argument("--out", type=Path, default=Path("losskit-bench"), metavar="DIR",
                       help="directory of the PNG plot and the CSV (default: ./losskit-bench)")
    bench.add_argument("--csv", type=Path, metavar="PATH", help="tidy CSV records (default: DIR/bench.csv)")
    bench.add_argument("--list", action="store_true", help="list the cases and their references, then exit")

    plot = sub.add_parser("plot", help="draw a bench CSV, or (`losskit plot curves`) how each loss behaves",
                          description="Draw time and peak memory against size per implementation from the CSV "
                                      "written by `losskit bench`. `losskit plot curves` instead draws each loss "
                                      "against the predicted probability of the true class, and the softmax and "
                                      "log_softmax of a vector (losskit.curves).")
    plot.add_argument("csv", type=Path, metavar="PATH.csv|curves")
    plot.add_argument("--out", type=Path, metavar="PNG",
                      help="output PNG (default: PATH.png; losskit-curves.png for curves)")

    sub.add_parser("env", help="print versions and the machine", description="Print the versions of python, "
                   "torch, losskit and optional dependencies, and the machine (CPU, cores, memory, OS).")
    return parser


def _list_cases() -> int:
    from .bench import CASES, format_size
    from .bench._cases import dtype_name

    for case in CASES:
        sizes = ", ".join(format_size(s) for s in case.sizes)
        print(f"{case.name}  ({'x'.join(case.dims)}; default {sizes})\n    reference: {case.reference_text}")
        if case.baselines:
            print(f"    also: {', '.join(case.baselines)}")
        if case.cuda:
            print(f"    cuda: {', '.join(format_size(s) for s in case.cuda.sizes)} in "
                  f"{', '.join(dtype_name(d) for d in case.cuda.dtypes)}"
                  + "".join(f"; also {name}" for name in case.cuda.libraries))
    return 0


def _progress(total: int):
    """A tqdm progress bar on stderr; None where tqdm is missing (a bare GPU machine): a line per phase."""
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext(None)
    return tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)


def _header(device: str, vers: dict[str, str], host: dict[str, str], load: float) -> str:
    """The line above the table, naming the processor the cases ran on: the CPU, or the GPU and its host."""
    where = (f"{host['cpu']}, {host['cores']} cores, {host['torch threads']} torch threads, load average {load:.1f}"
             if device == "cpu" else f"{host['gpu']} (host: {host['cpu']}, {host['cores']} cores)")
    return f"losskit {vers['losskit']}, torch {vers['torch']}, python {vers['python']} on {where}"


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.list:
        return _list_cases()
    from .bench import format_size, plan, plot, records, run, table, verdicts, write_csv
    from .bench._cases import dtype_name
    from .bench._env import cuda_unavailable, machine, one_line, versions

    why = cuda_unavailable() if args.device == "cuda" else ""
    if why:
        parser.error(f"argument --device: cuda, but torch finds no CUDA device: {why}")
    units, skipped = plan(args.device, args.cases, args.sizes, args.dtype)
    if not units:
        parser.error(f"no selected case runs with these --sizes and --dtype ({'; '.join(skipped)})")

    host, vers = machine(), versions()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(_header(args.device, vers, host, load))

    with _progress(len(units)) as bar:
        def progress(unit, phase: str) -> None:
            text = f"{unit.case.name} {format_size(unit.size)} {dtype_name(unit.dtype)}: {phase}"
            if bar is None:
                print(text, file=sys.stderr, flush=True)
            elif phase == "done":
                bar.update(1)
            else:
                bar.set_postfix_str(text)

        results, bandwidth, memory_error = run(units, reps=args.reps, budget=args.budget,
                                               compile_reference=args.compile, progress=progress)

    print(table(results))
    print(f"copy bandwidth at the start: {bandwidth / 1e9:.1f} GB/s (each case's roofline uses the bandwidth of a "
          "copy timed in its own rounds)")
    if memory_error:
        print(f"peak memory not measured: {memory_error}")
    for line in [*verdicts(results), *(f"skipped {s}" for s in skipped)]:
        print(line)
    cores = os.cpu_count() or 1
    if args.device == "cpu" and load > cores / 2:
        # Measured: on this 2-core VM under load, binary_cross_entropy's chunked kernel went from 0.18 s
        # (1 thread) to 6.3 s (2 threads) while eager stayed at 0.25-0.4 s.
        print(f"warning: load average {load:.1f} on {cores} cores when the run started. Other processes hold "
              "cores, so torch's intra-op threads wait for each other at every parallel op: implementations "
              "made of many small ops (chunked kernels) are slowed far more than eager's few large ops. Take "
              "the timings as indicative only; rerun on an idle machine.")
    rows = records(results, machine=one_line({**host, "device": args.device}), versions=one_line(vers))
    csv_path = args.csv or args.out / "bench.csv"
    write_csv(rows, csv_path)
    print(f"csv: {csv_path}")
    if rows:
        try:
            print(f"plot: {plot(rows, args.out / 'bench.png')}")
        except ImportError as error:  # the CSV is written: the plot can be drawn where matplotlib is
            print(f"plot: not drawn ({error}); draw it from the CSV with `losskit plot {csv_path}`")
    return 0


def _plot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .bench import plot, read_csv

    if args.csv == Path("curves"):
        return _plot_curves(parser, args.out or Path("losskit-curves.png"))
    if not args.csv.is_file():
        parser.error(f"argument PATH.csv: {args.csv}: no such file")
    try:
        rows = read_csv(args.csv)
    except (ValueError, UnicodeDecodeError) as error:
        parser.error(f"argument PATH.csv: {error}")
    if not rows:
        parser.error(f"argument PATH.csv: {args.csv} holds no measurements")
    print(f"plot: {plot(rows, args.out or args.csv.with_suffix('.png'))}")
    return 0


def _plot_curves(parser: argparse.ArgumentParser, out: Path) -> int:
    from .curves import plot_curves

    try:
        plot_curves(out)
    except (ValueError, OSError) as error:
        parser.error(f"argument --out: {error}")
    print(f"plot: {out}")
    return 0


def _env() -> int:
    from .bench._env import machine, versions

    for title, info in (("versions", versions()), ("machine", machine())):
        print(f"{title}:")
        width = max(map(len, info))
        for key, value in info.items():
            print(f"  {key.ljust(width)}  {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    subparser = parser._subparsers._group_actions[0].choices[args.command]  # for errors with the right usage
    if args.command == "bench":
        return _bench(subparser, args)
    if args.command == "plot":
        return _plot(subparser, args)
    return _env()


if __name__ == "__main__":
    sys.exit(main())
