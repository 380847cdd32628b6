"""Memory suite: is the memory the planner predicts for a profile the memory llama.cpp allocates in that profile's
runtime?

SmolLM2-135M (the Q4_1 GGUF from PyPI) is loaded by llama.cpp once per shipped profile, with the context
length, KV cache type and flash attention the profile names, exactly as `edgeprune validate` runs it. The KV
cache and compute buffer are the sizes llama.cpp reports; the prediction is the cost model's for that file
(`predict_gguf`), the number the planner judges the memory budget on.
"""

from __future__ import annotations

from edgeprune.device.costmodel import predict_gguf
from edgeprune.core.fetch import fetch_smollm2
from edgeprune.device.gguf_check import read_gguf
from edgeprune.device.profiles import list_profiles
from edgeprune.device.llamacpp.runtime import Runtime
from edgeprune.device.validation.results import MIB
from edgeprune.device.validation.speed import measure_speed
from edgeprune.build.bench.tables import SuiteResult, relative, table


def run(progress) -> SuiteResult:
    path = fetch_smollm2()
    info = read_gguf(path)
    rows = []
    for profile in list_profiles():
        runtime = Runtime.of(profile, threads=1)
        progress(f"memory: {profile.name} ({runtime.describe()})")
        probe = measure_speed(path, runtime=runtime, progress=progress)
        predicted = predict_gguf(info, profile)
        measured_total = path.stat().st_size + probe["kv_cache_bytes"] + probe["compute_buffer_bytes"]
        rows.append({
            "profile": profile.name, "context_length": runtime.context_length, "kv_cache_type": runtime.kv_cache_type,
            "flash_attention": runtime.flash_attention,
            "kv_measured": probe["kv_cache_bytes"], "kv_predicted": predicted.kv_cache_bytes,
            "compute_measured": probe["compute_buffer_bytes"], "compute_predicted": predicted.compute_buffer_bytes,
            "total_measured": measured_total, "total_predicted": predicted.memory_bytes,
            "peak_rss": probe["peak_rss_bytes"],
        })
    cells = [[r["profile"], r["context_length"], r["kv_cache_type"], "on" if r["flash_attention"] else "off",
              f"{r['kv_measured'] / MIB:.2f} / {r['kv_predicted'] / MIB:.2f}",
              f"{r['compute_measured'] / MIB:.2f} / {r['compute_predicted'] / MIB:.2f}",
              f"{r['total_measured'] / MIB:.1f}", f"{r['total_predicted'] / MIB:.1f}",
              relative(r["total_measured"], r["total_predicted"]), f"{r['peak_rss'] / MIB:.1f}"] for r in rows]
    return SuiteResult(
        title="Planned memory against the memory llama.cpp allocates, per profile runtime",
        method=(f"{path.name} loaded by llama.cpp (llama-cpp-python) once per shipped profile, with its context "
                "length, KV cache type (K and V) and flash attention; KV cache and compute buffer as llama.cpp "
                "logs them for that context, total = file + KV + compute. Predicted: edgeprune.device.costmodel.predict_gguf "
                "for the same file and profile, what the planner judges the memory budget on."),
        data={"model": path.name, "rows": rows},
        sections=["## Results", table(
            ["profile", "ctx", "KV type", "flash attn", "KV MiB measured / predicted",
             "compute MiB measured / predicted", "total MiB measured", "total MiB predicted", "predicted − measured",
             "peak RSS MiB"], cells)],
    )
