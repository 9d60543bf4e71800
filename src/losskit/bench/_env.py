"""The versions and the machine a benchmark ran on (``losskit env``, and two columns of the CSV), and
whether a CUDA device is there to run ``losskit bench --device cuda``."""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

#: Packages reported beside python and torch: losskit's extras, the libraries its paths may load and the GPU
#: libraries the CUDA bench compares with.
_PACKAGES = ("losskit", "numpy", "tqdm", "matplotlib", "hypothesis", "pytest", "numba", "triton", "transformers",
             "liger-kernel", "cut-cross-entropy")


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


def gpu() -> str:
    """The CUDA device, as the CUDA bench's header names it: ``NVIDIA H100 80GB HBM3 (79 GiB, compute
    capability 9.0, CUDA 12.4)``."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return (f"{torch.cuda.get_device_name()} ({props.total_memory / (1 << 30):.0f} GiB, compute capability "
            f"{props.major}.{props.minor}, CUDA {torch.version.cuda})")


def cuda_unavailable() -> str:
    """"" when torch sees a CUDA device, else what torch reports: the error of ``torch.cuda.init()`` (a CPU
    build: "Torch not compiled with CUDA enabled"; no driver: "Found no NVIDIA driver ..."), or the
    device count."""
    import torch

    if torch.cuda.is_available():
        return ""
    try:
        torch.cuda.init()
    except (AssertionError, RuntimeError) as error:  # torch raises AssertionError on a CPU-only build
        return f"{error} (torch {torch.__version__}, torch.cuda.is_available() is False)"
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees {torch.cuda.device_count()} CUDA "
            "devices; torch.cuda.is_available() is False")


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
        **({"gpu": gpu()} if torch.cuda.is_available() else {}),
        "executable": sys.executable,
    }


def one_line(info: dict[str, str]) -> str:
    """``{"torch": "2.13.0", ...}`` -> ``"torch=2.13.0; ..."`` (a CSV cell), leaving out absent packages."""
    return "; ".join(f"{k}={v}" for k, v in info.items() if v != "not installed" and k != "executable")
