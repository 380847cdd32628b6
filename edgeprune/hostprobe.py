"""Measure this machine as a device profile: memory bandwidth, matmul compute, threads, and the efficiency
factors that turn them into llama.cpp's real decode and prefill speeds.

The bandwidth and compute figures only need to be consistent, not absolute: the efficiencies are fitted
from one real llama.cpp run on a small GGUF, so the cost model reproduces that run exactly and predicts the
others from bytes and FLOPs.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .costmodel import predict_gguf
from .gguf_check import read_gguf
from .profiles import Budgets, DeviceSpec, Profile, load_profile
from .validate import measure_speed

TEMPLATE_PROFILE = "x86-laptop-16gb"  # runtime settings for a host: llama-cpp-python's defaults, every quant type


def measure_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Streaming copy, best of `repeats`: bytes read plus bytes written per second."""
    src = np.ones(mib * (1 << 20) // 8)
    dst = np.empty_like(src)
    best = min(_timed(np.copyto, dst, src) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def measure_compute_gflops(n: int = 1024, repeats: int = 5) -> float:
    """float32 matrix product through numpy's BLAS on all cores, best of `repeats`."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = min(_timed(np.matmul, a, a) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure_host_profile(gguf_path: str | Path, *, threads: int | None = None,
                         progress: Callable[[str], None] = lambda _m: None) -> Profile:
    """A profile of this machine with efficiencies calibrated on a real llama.cpp run of `gguf_path`."""
    threads = threads or os.cpu_count() or 1
    progress("measuring memory bandwidth")
    bandwidth = measure_bandwidth_gbs()
    progress("measuring matmul compute")
    compute = measure_compute_gflops()
    template = load_profile(TEMPLATE_PROFILE)
    budgets = Budgets(memory_mib=_half_of_ram_mib(), context_length=2048, min_decode_tps=1.0, max_ttft_s=60.0,
                      ttft_prompt_tokens=128, max_file_mib=None)
    device = DeviceSpec(f"this machine ({platform.machine()}, {threads} threads)", round(bandwidth, 2),
                        round(compute, 2), threads, 1.0, 1.0)
    ideal = Profile("host", Path("host.toml"), device, dataclasses.replace(template.runtime), budgets)
    progress(f"calibrating efficiencies with llama.cpp on {gguf_path}")
    info = read_gguf(gguf_path)
    measured = measure_speed(Path(gguf_path), threads=threads, n_ctx=budgets.context_length,
                             ttft_tokens=budgets.ttft_prompt_tokens, progress=progress)["speed"]
    predicted = predict_gguf(info, ideal)
    device = dataclasses.replace(device, decode_efficiency=round(min(1.0, measured["decode_tps"] / predicted.decode_tps), 4),
                                 prefill_efficiency=round(min(1.0, measured["prefill_tps"] / predicted.prefill_tps), 4))
    return dataclasses.replace(ideal, device=device)


def _half_of_ram_mib() -> float:
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return float(pages * page_size // 2 // (1 << 20))
