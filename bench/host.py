"""The machine a benchmark ran on, printed first by every bench so a figure never loses it."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def host_line() -> str:
    return f"host: {cpu_model()}, {os.cpu_count()} cores, load average {load_average()}"


def print_host() -> None:
    print(host_line(), flush=True)
