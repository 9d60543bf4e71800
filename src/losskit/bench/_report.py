"""What a run prints and writes: the terminal table, the acceptance verdicts and tidy CSV records."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from ._cases import EAGER, FAMILY_TARGETS, LOSSKIT, dtype_name
from ._measure import LOW_PRECISION
from ._run import COMPILED, LOSSKIT_FLOAT32, ROOFLINE, Result
from ._sizes import format_size

MIB = 1 << 20
#: Columns of the tidy CSV: one measured value per row.
FIELDS = ("case", "impl", "size", "dtype", "metric", "value", "machine", "versions")
#: The pseudo-implementation whose "peak_mib" is the size of the gradients (the memory floor).
GRADIENT = "gradient"


def records(results: list[Result], *, machine: str, versions: str) -> list[dict[str, str]]:
    """Tidy rows (see FIELDS): time_ms per implementation and the roofline, peak_mib per implementation
    and the gradient size."""
    rows = []
    for r in results:
        if r.error:
            continue
        peaks = {**r.peak, GRADIENT: r.grad_bytes}
        values = [*((impl, "time_ms", ms) for impl, ms in r.ms.items()),
                  *((impl, "peak_mib", b / MIB) for impl, b in peaks.items())]
        rows += [{"case": r.unit.case.name, "impl": impl, "size": format_size(r.unit.size),
                  "dtype": dtype_name(r.unit.dtype), "metric": metric, "value": f"{value:.6g}",
                  "machine": machine, "versions": versions} for impl, metric, value in values]
    return rows


def write_csv(rows: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV written by ``losskit bench --csv``; ValueError naming the file when it is not one."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [name for name in FIELDS if name not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} is not a losskit bench CSV: missing column(s) {', '.join(missing)} "
                             f"(expected {', '.join(FIELDS)})")
        rows = list(reader)
    for line, row in enumerate(rows, start=2):
        try:
            float(row["value"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}, line {line}: value {row['value']!r} is not a number") from None
    return rows


HEADER = ("case", "size", "dtype", "impl", "ms", "speed-up", "peak MiB", "peak/grad", "mem ratio", "calls", "note")
_LEFT = 4  # case, size, dtype and impl are left-aligned, the numbers right-aligned

LEGEND = "\n".join([
    "ms: median forward+backward time. speed-up: this row's ms / losskit's ms (how many times faster losskit is).",
    "peak MiB: peak resident memory above the inputs, loss and gradients included. peak/grad: peak / gradient size.",
    "mem ratio: losskit's peak / this row's peak. calls: timed calls (the fast implementations several a round).",
    "roofline: the bytes a fused kernel must move (read the inputs, write the gradients) at the copy bandwidth",
    "measured in the same rounds (a 256 MiB copy timed among the implementations); a floor for memory-bound losses",
    "(linear_cross_entropy is compute-bound: see its matmul floor).",
])


def number(x: float) -> str:
    """Three significant digits without exponents: 0.0123, 1.23, 12.3, 123, 1234."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def _rows(r: Result) -> list[list[str]]:
    head = [r.unit.case.name, format_size(r.unit.size), dtype_name(r.unit.dtype)]
    if r.error:
        return [[*head, LOSSKIT, "", "", "", "", "", "", r.error]]
    ours_ms, ours_peak = r.ms[LOSSKIT], r.peak.get(LOSSKIT)
    rows = []
    for impl, ms in r.ms.items():
        peak = r.peak.get(impl)
        baseline = impl != LOSSKIT
        mem_ratio = ours_peak / peak if baseline and peak and ours_peak is not None else None
        agrees = "within 2 eps of float64" if r.unit.dtype in LOW_PRECISION else "matches reference"
        note = "; ".join(filter(None, [r.check or agrees, r.memory_error])) if impl == LOSSKIT else ""
        rows.append([*(head if not rows else [""] * 3), impl, number(ms), _ratio(ms / ours_ms if baseline else None),
                     "" if peak is None else number(peak / MIB),
                     "" if peak is None or not r.grad_bytes else f"{peak / r.grad_bytes:.2f}",
                     _ratio(mem_ratio), str(r.calls.get(impl, "")), note])
    rows += [["", "", "", impl, "", "", "", "", "", "", f"raised {message}"] for impl, message in r.failed.items()]
    return rows


def table(results: list[Result]) -> str:
    rows = [row for r in results for row in _rows(r)]
    widths = [max(len(row[i]) for row in [list(HEADER), *rows]) for i in range(len(HEADER))]

    def line(row: list[str] | tuple[str, ...]) -> str:
        cells = [c.ljust(w) if i < _LEFT or i == len(row) - 1 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(HEADER))
    return "\n".join([line(HEADER), rule, *(line(row) for row in rows), rule, LEGEND])


def _verdict(what: str, value: float, op: str, limit: float) -> str:
    met = value >= limit if op == ">=" else value <= limit
    return f"{what} (target {op} {limit:g}x: {'met' if met else 'NOT met'})"


def verdicts(results: list[Result]) -> list[str]:
    """One line per acceptance target that this run measured: the cases' own targets, the family
    targets (FAMILY_TARGETS) when every case of a family ran at its size, and bfloat16 against float32
    per element for every bfloat16 unit (from its interleaved float32 twin, ``LOSSKIT_FLOAT32``)."""
    lines = []
    for r in results:
        for target in r.unit.case.targets:
            if r.error or (target.size, target.dtype) != (r.unit.size, r.unit.dtype):
                continue
            ours = r.ms[LOSSKIT]
            parts = [_verdict(f"{r.ms[EAGER] / ours:.2f}x faster than {EAGER}", r.ms[EAGER] / ours, ">=",
                              target.min_speedup)]
            if target.min_speedup_compiled is not None and COMPILED in r.ms:
                parts.append(_verdict(f"{r.ms[COMPILED] / ours:.2f}x faster than {COMPILED}", r.ms[COMPILED] / ours,
                                      ">=", target.min_speedup_compiled))
            if target.max_over_roofline is not None and ROOFLINE in r.ms:
                parts.append(_verdict(f"{ours / r.ms[ROOFLINE]:.2f}x the roofline", ours / r.ms[ROOFLINE], "<=",
                                      target.max_over_roofline))
            peak = r.peak.get(LOSSKIT)
            if peak is not None:
                over = peak / r.grad_bytes
                parts.append(_verdict(f"peak above inputs {over:.2f}x the gradient", over, "<=",
                                      target.max_peak_over_grad))
            lines.append(f"acceptance {r.unit.case.name} {format_size(r.unit.size)} {dtype_name(r.unit.dtype)}: "
                         + "; ".join(parts))
    measured = {(r.unit.case.name, r.unit.size, r.unit.dtype): r for r in results if not r.error}
    for family in FAMILY_TARGETS:
        found = [measured.get((name, family.size, family.dtype)) for name in family.cases]
        if not all(found):
            continue
        speedups = [r.ms[EAGER] / r.ms[LOSSKIT] for r in found]
        geomean = math.exp(sum(map(math.log, speedups)) / len(speedups))
        each = ", ".join(f"{name} {s:.2f}x" for name, s in zip(family.cases, speedups))
        lines.append(f"acceptance {family.name} family {format_size(family.size)} {dtype_name(family.dtype)}: "
                     + _verdict(f"geometric mean {geomean:.2f}x faster than {EAGER}", geomean, ">=",
                                family.min_geomean) + f" ({each})")
    for (name, size, dtype), r in measured.items():
        if dtype == torch.bfloat16 and LOSSKIT_FLOAT32 in r.ms:
            ratio = r.ms[LOSSKIT] / r.ms[LOSSKIT_FLOAT32]  # same size, timed interleaved: per element
            lines.append(f"acceptance {name} {format_size(size)} bfloat16: "
                         + _verdict(f"{ratio:.2f}x the float32 time per element", ratio, "<=", 1.0))
    return lines
