"""The size grammar of ``losskit bench --sizes``.

A size is one or more extents joined by ``x``, each a positive integer with an optional ``k`` (x1024)
or ``m`` (x1024**2) suffix: ``4096x32768`` == ``4kx32k`` is ``(N, C) = (4096, 32768)``;
``2kx1kx32k`` is ``(N, D, V)``. A list is comma-separated. A case takes the sizes whose number of
extents matches its dimensions (two for ``(N, C)`` cases, three for ``linear_cross_entropy``).
"""

from __future__ import annotations

import re

Size = tuple[int, ...]

_EXTENT = re.compile(r"([1-9][0-9]*)([kKmM]?)")
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20}


def parse_size(text: str) -> Size:
    """``"4kx32768"`` -> ``(4096, 32768)``; ValueError naming the offending text otherwise."""
    extents = []
    for part in text.strip().split("x"):
        match = _EXTENT.fullmatch(part)
        if match is None:
            raise ValueError(f"size {text!r}: {part!r} is not a positive integer with optional k/m suffix "
                             "(expected e.g. 4096x32768 or 4kx32k)")
        extents.append(int(match.group(1)) * _SUFFIX[match.group(2).lower()])
    return tuple(extents)


def parse_sizes(text: str) -> list[Size]:
    """``"1024x4096,4kx32k"`` -> ``[(1024, 4096), (4096, 32768)]``."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"sizes {text!r}: give at least one size, e.g. 1024x4096,4096x32768")
    return [parse_size(item) for item in items]


def format_size(size: Size) -> str:
    """``(4096, 32768)`` -> ``"4096x32768"`` (the form ``parse_size`` reads back)."""
    return "x".join(str(extent) for extent in size)
