"""Measure this machine as a device profile: memory bandwidth, matmul compute, threads, and the efficiency
factors that turn them into llama.cpp's real decode and prefill speeds.

The bandwidth and compute figures only need to be consistent, not absolute: the efficiencies are fitted
per tensor type on real llama.cpp runs of one model written at a ladder of quant types, because on a CPU
the kernels differ more than the bytes do (a q5_0 matrix decodes slower than a larger q8_0 one). Pruned and
otherwise reshaped models are then predicted from their tensors' bytes and FLOPs. The same model with half
its FFN channels and with half its layers is measured too, at two types: together they separate the fixed
time every layer costs a decoded token (thread barriers, graph work: about 0.1 ms per layer on a 2-core VM)
from the bytes it reads. Without the narrow model the two trade off freely (a ladder of full-depth files fits
as well with 15 us as with 100 us), and pruned FFNs were predicted up to 14% too fast.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from converters import ConversionInput, write_gguf

from edgeprune.device.costmodel import SizeEstimate, decode_seconds_per_token, layer_count, prefill_seconds_per_token, size_of_gguf
from edgeprune.device.gguf_check import read_gguf
from edgeprune.build.loading import load_model
from edgeprune.device.profiles import MAX_TYPE_EFFICIENCY, Budgets, DeviceSpec, Profile, load_profile
from edgeprune.build.pruning.surgery import remove_layers, shrink_mlp, sync_config
from edgeprune.build.quantize import quantize_gguf
from edgeprune.core.shapes import ModelShape, shape_from_gguf
from edgeprune.device.validation.speed import N_PROMPT, measure_speed

TEMPLATE_PROFILE = "x86-laptop-16gb"  # runtime settings for a host: llama-cpp-python's defaults, every quant type
# Quant types whose files, together, give every common tensor type a large share in at least one of them.
CALIBRATION_LADDER = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q3_K_M")
OFF = 1e30  # an efficiency that makes a tensor cost nothing: how one family's column is isolated
CALIBRATION_PASSES = 2
SHAPE_PROBE_TYPES = ("Q8_0", "Q4_0")  # types at which the model is also measured at half FFN width and half depth
PROBE_ALIGN = 32  # the block size of those types
HOST_CONTEXT = 2048
# Tensor types whose llama.cpp CPU kernels work alike, fitted with one efficiency each.
TYPE_FAMILIES = {
    "float": ("f16", "bf16", "f32"),
    "q8": ("q8_0",),
    "q4": ("q4_0", "q4_1"),
    "q5_0": ("q5_0",),
    "q5_1": ("q5_1",),  # its own kernel, and where q5_k falls back for rows not a multiple of 256 (Q5_K_M)
    "k": ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k"),
}


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


def measure_host_profile(model_path: str | Path, *, threads: int | None = None,
                         progress: Callable[[str], None] = lambda _m: None) -> Profile:
    """A profile of this machine, its efficiencies fitted per tensor type on real llama.cpp runs of `model_path`
    (a Llama GGUF or HF directory) written at every type of CALIBRATION_LADDER."""
    threads = threads or os.cpu_count() or 1
    bandwidth, compute = measure_hardware(progress)
    with tempfile.TemporaryDirectory(prefix="edgeprune-measure-") as tmp:
        ladder = write_ladder(model_path, Path(tmp), threads=threads, progress=progress)
        runs = measured_runs(ladder, measure_interleaved(ladder, threads=threads, progress=progress))
    return fit_host_profile(runs, bandwidth, compute, threads)


def measure_hardware(progress: Callable[[str], None]) -> tuple[float, float]:
    """(memory bandwidth GB/s, matmul GFLOPS) of this machine."""
    progress("measuring memory bandwidth")
    bandwidth = measure_bandwidth_gbs()
    progress("measuring matmul compute")
    return bandwidth, measure_compute_gflops()


def write_ladder(model_path: str | Path, directory: Path, *, threads: int, progress) -> list[tuple[str, Path]]:
    """(label, path) of the model written at every type of the ladder into `directory`, and at the
    SHAPE_PROBE_TYPES with half its FFN channels and with half its layers: the three axes a plan changes."""
    loaded = load_model(model_path, progress=progress)

    def written(model, name: str) -> Path:
        source = ConversionInput(model, loaded.vocab, loaded.name, loaded.context_length)
        return write_gguf(source, directory / f"{name}.gguf", "F16")

    full = written(loaded.model, "F16")
    files = [(quant, full, quant) for quant in CALIBRATION_LADDER]
    narrow = copy.deepcopy(loaded.model)
    narrow_ff = _narrow_ffn(narrow)
    if narrow_ff:
        narrow_path = written(narrow, "narrow-F16")
        files += [(f"{quant}, FFN {narrow_ff}", narrow_path, quant) for quant in SHAPE_PROBE_TYPES]
    n_layers = len(loaded.model.model.layers)
    if n_layers >= 2:
        remove_layers(loaded.model, list(range(n_layers // 2, n_layers)))  # speed does not depend on which
        half = written(loaded.model, "half-F16")
        files += [(f"{quant}, {n_layers // 2} layers", half, quant) for quant in SHAPE_PROBE_TYPES]
    return [(label, source if quant == "F16" else
             quantize_gguf(source, directory / f"{source.stem}-{quant}.gguf", quant, threads=threads).path)
            for label, source, quant in files]


def _narrow_ffn(model) -> int | None:
    """Cut every layer's FFN to at most half its channels, PROBE_ALIGN-aligned, in place; the width kept, or None
    if the FFN is too narrow to cut. Speed does not depend on which channels are kept."""
    n_ff = model.model.layers[0].mlp.gate_proj.out_features
    keep = n_ff // 2 // PROBE_ALIGN * PROBE_ALIGN
    if keep == 0:
        return None
    for layer in model.model.layers:
        shrink_mlp(layer, np.arange(keep), layer.mlp.down_proj.weight.detach()[:, :keep], layer.mlp.down_proj.bias)
    sync_config(model)
    return keep


def measure_interleaved(files: list[tuple[str, Path]], *, threads: int, n_ctx: int = HOST_CONTEXT,
                        passes: int = CALIBRATION_PASSES, progress) -> list[list[dict]]:
    """llama.cpp's measurements (validation.speed.measure_speed) of every (label, path), `passes` times each, in
    interleaved passes: a slow spell of a shared machine then hits one pass of every file, not all of one file's."""
    measured: list[list[dict]] = [[] for _ in files]
    for number in range(passes):
        for (label, path), results in zip(files, measured):
            progress(f"measuring with llama.cpp (pass {number + 1}/{passes}): {label}")
            results.append(measure_speed(path, threads=threads, n_ctx=n_ctx, progress=progress))
    return measured


Run = tuple[SizeEstimate, ModelShape, dict]


def measured_runs(files: list[tuple[str, Path]], measured: list[list[dict]]) -> list[Run]:
    """(tensor sizes, shape, pooled speeds) of each file, what the fit takes."""
    infos = [read_gguf(path) for _, path in files]
    return [(size_of_gguf(info), shape_from_gguf(info), pooled_speed(results)) for info, results in zip(infos, measured)]


def pooled_speed(measured: list[dict]) -> dict[str, float]:
    """Decode and prefill tokens/s: the median of every repetition of every pass, which one slow pass cannot move
    far (the mean of the passes' medians moves with it; the fastest repetition is an outlier of its own)."""
    return {key: float(np.median([x for m in measured for x in m["per_repetition"][key]]))
            for key in ("decode_tps", "prefill_tps")}


def fit_host_profile(runs: list[Run], bandwidth_gbs: float, compute_gflops: float, threads: int) -> Profile:
    """The host profile whose cost model reproduces `runs` best; its budgets are placeholders to edit."""
    budgets = Budgets(memory_mib=_half_of_ram_mib(), context_length=HOST_CONTEXT, min_decode_tps=1.0,
                      max_ttft_s=60.0, ttft_prompt_tokens=N_PROMPT, max_file_mib=None)
    device = DeviceSpec(f"this machine ({platform.machine()}, {threads} threads)", round(bandwidth_gbs, 2),
                        round(compute_gflops, 2), threads, 1.0, 1.0)
    decode, layer_overhead_us = _fit_type_efficiency(runs, "decode", device)
    prefill, _ = _fit_type_efficiency(runs, "prefill", device)
    device = dataclasses.replace(
        device, decode_efficiency=_typical(decode), prefill_efficiency=_typical(prefill),
        decode_type_efficiency=decode, prefill_type_efficiency=prefill,
        decode_layer_overhead_us=layer_overhead_us or None)
    return Profile("host", Path("host.toml"), device, dataclasses.replace(load_profile(TEMPLATE_PROFILE).runtime),
                   budgets)


def _fit_type_efficiency(runs: list[Run], kind: str, device: DeviceSpec) -> tuple[dict[str, float], float]:
    """Per tensor type, the efficiency that makes the cost model reproduce the measured runs best (non-negative
    least squares on seconds per token, each run weighted by its own time so that errors count relatively), and
    for decode the fixed microseconds per layer (0 for prefill, where a micro-batch of tokens shares them).

    Types are fitted by kernel family (TYPE_FAMILIES): a ladder of ten files cannot separate a type that holds
    a few percent of one file from noise, and the types of a family share their kernel's cost. Seconds per
    token are linear in the per-family inverse efficiencies: each column holds what one family costs at
    efficiency 1, taken from the cost model itself with that family alone switched on (attention counts as f16)."""
    present = {t.type_name for size, _, _ in runs for t in size.tensors if t.rows > 1}
    families = {name: members for name, members in TYPE_FAMILIES.items() if present & set(members)}
    columns, measured = [], []
    for size, shape, speed in runs:
        row = []
        for members in families.values():
            alone = {n: 1.0 if n in members else OFF for family in families.values() for n in family}
            only = dataclasses.replace(device, decode_efficiency=OFF, prefill_efficiency=OFF,
                                       decode_type_efficiency=alone, prefill_type_efficiency=alone,
                                       decode_layer_overhead_us=None)
            if kind == "decode":
                row.append(decode_seconds_per_token(size, only))
            else:
                row.append(prefill_seconds_per_token(size, shape, N_PROMPT, only))
        if kind == "decode":
            row.append(layer_count(size) * 1e-6)
        columns.append(row)
        measured.append(1.0 / speed[f"{kind}_tps"])
    a, y = np.asarray(columns), np.asarray(measured)
    solution = _nonnegative_least_squares(a / y[:, None], np.ones_like(y))
    # A family the fit finds (nearly) free runs at the most a profile accepts, not at the untyped default.
    efficiencies = {member: round(float(min(MAX_TYPE_EFFICIENCY, 1.0 / max(x, 1e-12))), 4)
                    for members, x in zip(families.values(), solution) for member in members}
    return efficiencies, round(float(solution[len(families)]), 2) if kind == "decode" else 0.0


def _nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin |a x - b| with x >= 0 (Lawson and Hanson's active set), for the handful of columns fitted here."""
    x = np.zeros(a.shape[1])
    free: list[int] = []
    for _ in range(3 * a.shape[1]):
        gradient = a.T @ (b - a @ x)
        candidates = [j for j in range(a.shape[1]) if j not in free and gradient[j] > 1e-12]
        if not candidates:
            break
        free.append(max(candidates, key=lambda j: gradient[j]))
        while True:
            z = np.zeros_like(x)
            z[free] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
            if all(z[j] > 0 for j in free):
                x = z
                break
            blocked = [j for j in free if z[j] <= 0]
            step = min(x[j] / (x[j] - z[j]) for j in blocked)
            x = x + step * (z - x)
            free = [j for j in free if x[j] > 1e-15]
    return x


def _typical(efficiencies: dict[str, float]) -> float:
    """The efficiency for tensor types the ladder did not measure: the median of those it did, at most 1."""
    return round(min(1.0, float(np.median(list(efficiencies.values())))), 4) if efficiencies else 1.0


def _half_of_ram_mib() -> float:
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return float(pages * page_size // 2 // (1 << 20))
