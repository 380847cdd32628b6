"""What the device must hold: the file, the KV cache and the compute buffers llama.cpp reported for the context
it created with the profile's runtime, and the measuring process's peak RSS."""

from __future__ import annotations

from pathlib import Path

from edgeprune.device.llamacpp.runtime import Runtime
from edgeprune.device.validation.results import MemoryResult


def memory_result(path: Path, probe: dict, runtime: Runtime) -> MemoryResult:
    """What the device must hold, from the sizes llama.cpp reported for the context it created with `runtime`
    (`llama_log.buffer_bytes` refuses a log that lacks them); `probe` is the speed measurement's result."""
    file_bytes = path.stat().st_size
    basis = {"file": "measured (file size)", "peak_rss": "measured (VmHWM of the measuring process)",
             "kv_cache": "measured (llama.cpp's KV buffer sizes)",
             "compute_buffer": "measured (llama.cpp's compute buffer sizes)"}
    kv_bytes, compute = probe["kv_cache_bytes"], probe["compute_buffer_bytes"]
    return MemoryResult(
        file_bytes=file_bytes, n_params=probe["n_params"], kv_cache_bytes=kv_bytes,
        peak_rss_bytes=probe["peak_rss_bytes"], context_length=runtime.context_length, compute_buffer_bytes=compute,
        total_bytes=file_bytes + kv_bytes + compute,
        kv_cache_type=runtime.kv_cache_type, flash_attention=runtime.flash_attention, basis=basis,
    )
