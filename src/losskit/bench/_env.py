"""The versions and the machine a benchmark ran on (``losskit env``, and two columns of the CSV)."""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

#: Packages reported beside python and torch: losskit's extras and the libraries its paths may load.
_PACKAGES = ("losskit", "numpy", "tqdm", "matplotlib", "hypothesis", "pytest", "numba", "triton", "transformers")


def _proc_field(path: str, pattern: str) -> str | None:
    try:
        match = re.search(pattern, Path(path).read_text(), re.M)
    except OSError:
        return None
    return match.group(1).strip() if match else None


def versions() -> dict[str, str]:
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict[str, str]:
    import torch

    cpu = _proc_field("/proc/cpuinfo", r"^model name\s*:(.*)$") or platform.processor() or platform.machine()
    mem_kib = _proc_field("/proc/meminfo", r"^MemTotal:\s*(\d+) kB")
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "memory": f"{int(mem_kib) / (1 << 20):.1f} GiB" if mem_kib else "unknown",
        "os": platform.platform(),
        "accelerator": torch.accelerator.current_accelerator().type
        if hasattr(torch, "accelerator") and torch.accelerator.is_available() else "none",
        "executable": sys.executable,
    }


def one_line(info: dict[str, str]) -> str:
    """``{"torch": "2.13.0", ...}`` -> ``"torch=2.13.0; ..."`` (a CSV cell), leaving out absent packages."""
    return "; ".join(f"{k}={v}" for k, v in info.items() if v != "not installed" and k != "executable")
