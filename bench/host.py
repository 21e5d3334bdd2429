"""The machine a benchmark ran on, printed first by every bench so a figure never loses it."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path


# The vector units that decide which kernels win (two "AMD EPYC" hosts differ by AVX-512 BF16).
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@cache  # read once per process: the host line and machine() both ask
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name", "unknown CPU")


def cpu_isa() -> str:
    """Family/model and the vector extensions present, e.g. "family 25 model 1: avx2"."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    vector = " ".join(flag for flag in VECTOR_FLAGS if flag in flags) or "no AVX2"
    return f"family {info.get('cpu family', '?')} model {info.get('model', '?')}: {vector}"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def host_line() -> str:
    return f"host: {cpu_model()} ({cpu_isa()}), {os.cpu_count()} cores, load average {load_average()}"


def print_host() -> None:
    print(host_line(), flush=True)
