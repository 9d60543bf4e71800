"""What a run prints and writes: the terminal table, the acceptance verdicts and tidy CSV records."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from ._cases import EAGER, FAMILY_TARGETS, GIB, LOSSKIT, Target, dtype_name
from ._measure import LOW_PRECISION
from ._run import LOSSKIT_FLOAT32, Result
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
    "ms: median forward+backward time (CUDA events on the GPU). speed-up: this row's ms / losskit's ms (how many",
    "times faster losskit is). peak MiB: peak memory above the inputs, loss and gradients included (CPU: resident",
    "memory; CUDA: torch.cuda.max_memory_allocated). peak/grad: peak / gradient size. mem ratio: losskit's peak /",
    "this row's peak. calls: timed calls (the fast implementations several a round).",
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
    rows += [["", "", "", impl, "", "", "", "", "", "", why] for impl, why in r.absent.items()]
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


def _verdict(what: str, met: bool, target: str) -> str:
    return f"{what} (target {target}: {'met' if met else 'NOT met'})"


def _size(nbytes: float, fmt: str = ".2f") -> str:
    """Bytes in GiB from 1 GiB up, else in MiB."""
    return f"{nbytes / GIB:{fmt}} GiB" if abs(nbytes) >= GIB else f"{nbytes / (1 << 20):{fmt}} MiB"


def _judged(r: Result, target: Target) -> list[str]:
    """The parts of ``target`` this result measured, each with its verdict (a library that is not installed
    is named as not judged)."""
    ours = r.ms[LOSSKIT]
    parts = []
    for name, least in target.faster_than.items():
        if name in r.ms:
            speedup = r.ms[name] / ours
            parts.append(_verdict(f"{speedup:.2f}x faster than {name}", speedup >= least, f">= {least:g}x"))
        elif name in r.absent:
            parts.append(f"not judged against {name}: {r.absent[name]}")
    for name, most in target.within.items():
        if name in r.ms:
            over = ours / r.ms[name]
            parts.append(_verdict(f"{over:.2f}x the {name}", over <= most, f"<= {most:g}x"))
    peak = r.peak.get(LOSSKIT)
    if target.max_peak_over_grad is not None and peak is not None:
        met = peak <= target.max_peak_over_grad * r.grad_bytes + target.peak_slack
        if target.peak_slack:
            parts.append(_verdict(f"peak above inputs {_size(peak)} = the gradient ({_size(r.grad_bytes)}) + "
                                  f"{_size(peak - r.grad_bytes)}", met,
                                  f"<= {target.max_peak_over_grad:g}x gradient + {_size(target.peak_slack, '.0f')}"))
        else:
            parts.append(_verdict(f"peak above inputs {peak / r.grad_bytes:.2f}x the gradient", met,
                                  f"<= {target.max_peak_over_grad:g}x"))
    return parts


def verdicts(results: list[Result]) -> list[str]:
    """One line per acceptance target that this run measured: the cases' own targets on the unit's device,
    the family targets (FAMILY_TARGETS) when every case of a family ran at its size, and bfloat16 against
    float32 per element for every bfloat16 unit with an interleaved float32 twin (``LOSSKIT_FLOAT32``)."""
    lines = []
    for r in results:
        for target in r.unit.case.targets:
            if r.error or (target.size, target.dtype, target.device) != (r.unit.size, r.unit.dtype, r.unit.device):
                continue
            parts = _judged(r, target)
            if parts:
                lines.append(f"acceptance {r.unit.case.name} {format_size(r.unit.size)} {dtype_name(r.unit.dtype)}"
                             f"{' on cuda' if r.unit.device == 'cuda' else ''}: " + "; ".join(parts))
    measured = {(r.unit.case.name, r.unit.size, r.unit.dtype, r.unit.device): r for r in results if not r.error}
    for family in FAMILY_TARGETS:
        found = [measured.get((name, family.size, family.dtype, family.device)) for name in family.cases]
        if not all(found):
            continue
        speedups = [r.ms[EAGER] / r.ms[LOSSKIT] for r in found]
        geomean = math.exp(sum(map(math.log, speedups)) / len(speedups))
        each = ", ".join(f"{name} {s:.2f}x" for name, s in zip(family.cases, speedups))
        lines.append(f"acceptance {family.name} family {format_size(family.size)} {dtype_name(family.dtype)}: "
                     + _verdict(f"geometric mean {geomean:.2f}x faster than {EAGER}", geomean >= family.min_geomean,
                                f">= {family.min_geomean:g}x") + f" ({each})")
    for (name, size, dtype, _), r in measured.items():
        if dtype == torch.bfloat16 and LOSSKIT_FLOAT32 in r.ms:
            ratio = r.ms[LOSSKIT] / r.ms[LOSSKIT_FLOAT32]  # same size, timed interleaved: per element
            lines.append(f"acceptance {name} {format_size(size)} bfloat16: "
                         + _verdict(f"{ratio:.2f}x the float32 time per element", ratio <= 1.0, "<= 1x"))
    return lines
