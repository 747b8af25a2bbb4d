"""The CPU a figure was measured on, as every benchmark prints it beside its numbers."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch


@functools.cache
def cpu_description() -> str:
    """The CPU as benchmarks should print it: model, family/model numbers, vector extensions, cores."""
    name, family, model, flags = "unknown CPU", "?", "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (p.strip() for p in line.partition(":"))
            if key == "model name" and name == "unknown CPU":
                name = value
            elif key == "cpu family" and family == "?":
                family = value
            elif key == "model" and model == "?":
                model = value
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        import platform

        name = platform.processor() or name
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile") if f in flags]
    return (f"{name} (family {family}, model {model}; {' '.join(isa) or 'no AVX2'}; torch capability "
            f"{torch.backends.cpu.get_cpu_capability()}; {os.cpu_count()} cores)")
