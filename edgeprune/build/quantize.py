"""Quantization of a build's float GGUF by llama.cpp's own quantizer (edgeprune.device.llamacpp.quantizer).

The importance matrix comes from edgeprune's calibration pass (mean of x² per input column of each weight,
exactly what llama-imatrix computes) and is handed to the quantizer in memory; the GGUF records that it
was used and on what text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from edgeprune.core.atomic import atomic_output
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.llamacpp import log as llama_log
from edgeprune.device.llamacpp.log import Fallback
from edgeprune.device.llamacpp.quantizer import (NEEDS_IMATRIX, check_quant_type, imatrix_array, kv_overrides,
                                                 model_quantize, quantize_params, tensor_overrides)


@dataclass
class QuantizeResult:
    path: Path
    quant_type: str
    seconds: float
    imatrix_entries: int
    fallbacks: list[Fallback] = field(default_factory=list)


def quantize_gguf(src: str | Path, dst: str | Path, quant_type: str, *, imatrix: dict[str, np.ndarray] | None = None,
                  imatrix_text: str | None = None, threads: int = 0, tensor_types: dict[str, str] | None = None,
                  progress: Callable[[str], None] | None = None) -> QuantizeResult:
    """Quantize the float GGUF `src` into `dst` (written atomically). `imatrix` maps GGUF tensor names to mean x².
    `tensor_types` gives single tensors their own ggml type (e.g. {"blk.3.ffn_down.weight": "q6_k"}), through
    llama.cpp's per-tensor overrides; every other tensor takes `quant_type`'s choice."""
    quant_type = check_quant_type(quant_type)
    if quant_type in NEEDS_IMATRIX and not imatrix:
        raise EdgepruneError(f"{quant_type} needs an importance matrix: keep calibration on, or choose e.g. Q4_K_M")
    dst = Path(dst)
    params = quantize_params(quant_type, threads=threads)
    keep_alive = []  # ctypes buffers must outlive the native call
    if imatrix:
        params.imatrix = imatrix_array(imatrix, keep_alive)
        params.kv_overrides = kv_overrides({
            "quantize.imatrix.file": "edgeprune calibration pass",
            "quantize.imatrix.dataset": (imatrix_text or "unknown")[:120],
            "quantize.imatrix.entries_count": len(imatrix),
        }, keep_alive)
    if tensor_types:
        params.tt_overrides = tensor_overrides(tensor_types, keep_alive)
    if progress:
        progress(f"quantizing to {quant_type}{' with importance matrix' if imatrix else ''}")
    start = time.perf_counter()
    with atomic_output(dst) as tmp:
        text = model_quantize(src, tmp, params, f"llama.cpp could not quantize {src} to {quant_type}")
        fallbacks = checked_fallbacks(text, tmp)
    return QuantizeResult(dst, quant_type, time.perf_counter() - start, len(imatrix or {}), fallbacks)


def checked_fallbacks(text: str, path: Path) -> list[Fallback]:
    """The fallbacks llama.cpp logged while writing `path`, each checked against the type the file holds."""
    held = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}
    found = llama_log.fallbacks(text)
    for fb in found:
        if held.get(fb.tensor) != fb.used:
            raise llama_log.unreadable(f"says {fb.tensor} fell back to {fb.used}, but the file holds it as "
                                       f"{held.get(fb.tensor, 'no such tensor')}")
    return found
