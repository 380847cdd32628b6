"""Prediction suite: the cost model against llama.cpp on this machine, across quant types and pruned shapes.

This machine is first measured as a device profile (`profiles measure`: bandwidth, compute, and efficiencies
fitted on the SmolLM2 Q4_1 GGUF, which is not one of the variants). Every variant is then predicted from its
GGUF alone and measured by llama.cpp: decode and prefill tokens/s, and total memory (file + KV cache at the
context + llama.cpp's compute buffer).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

from converters import ConversionInput, write_gguf

from ..costmodel import predict_gguf
from ..fetch import fetch_smollm2
from ..gguf_check import read_gguf
from ..hostprobe import measure_host_profile
from ..loading import load_model
from ..pruning import PruneOptions, prune_model
from ..quantize import quantize_gguf
from ..shapes import shape_of
from ..texts import default_calibration_text
from ..validate import MIB, measure_speed
from .tables import SuiteResult, table

# (label, quant, pruning or None); pruning only shapes the file here, so the quick bias recovery does.
VARIANTS = [
    ("F16", "F16", None),
    ("Q8_0", "Q8_0", None),
    ("Q4_K_M", "Q4_K_M", None),
    ("Q4_0", "Q4_0", None),
    ("Q4_K_M, FFN -33% uniform", "Q4_K_M", PruneOptions(ffn=1 / 3, allocation="uniform", align=256, recovery="bias",
                                                         calib_sequences=8)),
    ("Q4_0, FFN -30% heads -25% adaptive", "Q4_0", PruneOptions(ffn=0.3, heads=0.25, allocation="adaptive",
                                                               recovery="bias", calib_sequences=8)),
    ("Q6_K, -4 layers", "Q6_K", PruneOptions(layers=4, recovery="bias", calib_sequences=8)),
]
CONTEXT = 2048
LIMITS = {"decode": 0.10, "prefill": 0.20, "memory": 0.05}


def run(progress) -> SuiteResult:
    threads = os.cpu_count() or 1
    host = measure_host_profile(fetch_smollm2(), threads=threads, progress=progress)
    loaded = load_model(fetch_smollm2(), progress=progress)
    tokens = loaded.tokenizer(default_calibration_text().content, add_special_tokens=False)["input_ids"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-pred-") as tmp:
        for label, quant, pruning in VARIANTS:
            progress(f"prediction: building {label}")
            model = loaded.model if pruning is None else prune_model(copy.deepcopy(loaded.model), tokens, pruning).model
            source = ConversionInput(model, loaded.vocab, loaded.name, loaded.context_length)
            path = write_gguf(source, Path(tmp) / "f16.gguf", "F16")
            if quant != "F16":
                path = quantize_gguf(path, Path(tmp) / f"{quant}.gguf", quant).path
            predicted = predict_gguf(read_gguf(path), host)
            probe = measure_speed(path, threads=threads, n_ctx=CONTEXT, ttft_tokens=128, progress=progress)
            speed = probe["speed"]
            measured_memory = predicted.size.file_bytes + predicted.kv_cache_bytes + probe["compute_buffer_bytes"]
            rows.append({
                "variant": label, "architecture": shape_of(model).architecture, "file_mib": round(path.stat().st_size / MIB, 2),
                "decode": [predicted.decode_tps, speed["decode_tps"]],
                "prefill": [predicted.prefill_tps, speed["prefill_tps"]],
                "memory": [predicted.memory_bytes / MIB, measured_memory / MIB],
                "peak_rss_mib": probe["peak_rss_bytes"] / MIB,
            })
    within = {key: all(abs(r[key][0] / r[key][1] - 1) <= limit for r in rows) for key, limit in LIMITS.items()}
    return SuiteResult(
        title="Cost-model predictions against llama.cpp measurements on this machine (SmolLM2-135M variants)",
        method=__doc__.strip().replace("\n", " ") + f" Context {CONTEXT}, {threads} threads, llama-bench-style "
               "pp128 / tg32, median of 3.",
        data={"host_profile": {"bandwidth_gbs": host.device.memory_bandwidth_gbs, "compute_gflops": host.device.compute_gflops,
                               "decode_efficiency": host.device.decode_efficiency,
                               "prefill_efficiency": host.device.prefill_efficiency},
              "rows": rows, "within_limits": within},
        sections=["## Results", _table(rows), _verdict(within)],
    )


def _error(pair: list[float]) -> str:
    predicted, measured = pair
    return f"{predicted:.1f} / {measured:.1f} ({100 * (predicted / measured - 1):+.1f}%)"


def _table(rows: list[dict]) -> str:
    return table(
        ["variant", "arch", "file MiB", "decode tok/s pred / meas", "prefill tok/s pred / meas",
         "memory MiB pred / meas", "peak RSS MiB"],
        [[r["variant"], r["architecture"], f"{r['file_mib']:.1f}", _error(r["decode"]), _error(r["prefill"]),
          _error(r["memory"]), f"{r['peak_rss_mib']:.0f}"] for r in rows],
    )


def _verdict(within: dict) -> str:
    return "Within the targets (decode ±10%, prefill ±20%, memory ±5%): " + ", ".join(
        f"{key} {'yes' if ok else 'no'}" for key, ok in within.items())
