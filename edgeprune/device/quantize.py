"""Quantization by llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python).

gguf-py has no K-quants or IQ types, and any quantizer of our own would drift from llama.cpp's. The
importance matrix comes from edgeprune's calibration pass (mean of x² per input column of each weight,
exactly what llama-imatrix computes) and is handed to the quantizer in memory; the GGUF records that it
was used and on what text.
"""

from __future__ import annotations

import ctypes
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from edgeprune.device import llama_log
from edgeprune.core.atomic import atomic_output, raise_if_interrupted
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.llama_log import Fallback

# llama.cpp's llama_ftype values by the names llama-quantize uses.
QUANT_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17,
    "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24,
    "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31,
    "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
}
# llama.cpp refuses these without an importance matrix (tensor_requires_imatrix in llama-quant.cpp).
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"}

@dataclass
class QuantizeResult:
    path: Path
    quant_type: str
    seconds: float
    imatrix_entries: int
    fallbacks: list[Fallback] = field(default_factory=list)


def check_quant_type(name: str) -> str:
    """Normalise a quant type name, or fail with the list of known ones."""
    upper = name.upper()
    if upper not in QUANT_TYPES:
        raise EdgepruneError(f"unknown quant type {name!r}: choose one of {', '.join(QUANT_TYPES)}")
    return upper


def quantize_gguf(src: str | Path, dst: str | Path, quant_type: str, *, imatrix: dict[str, np.ndarray] | None = None,
                  imatrix_text: str | None = None, threads: int = 0, tensor_types: dict[str, str] | None = None,
                  progress: Callable[[str], None] | None = None) -> QuantizeResult:
    """Quantize the float GGUF `src` into `dst` (written atomically). `imatrix` maps GGUF tensor names to mean x².
    `tensor_types` gives single tensors their own ggml type (e.g. {"blk.3.ffn_down.weight": "q6_k"}), through
    llama.cpp's per-tensor overrides; every other tensor takes `quant_type`'s choice."""
    import llama_cpp

    quant_type = check_quant_type(quant_type)
    if quant_type in NEEDS_IMATRIX and not imatrix:
        raise EdgepruneError(f"{quant_type} needs an importance matrix: keep calibration on, or choose e.g. Q4_K_M")
    dst = Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = QUANT_TYPES[quant_type]
    keep_alive = []  # ctypes buffers must outlive the native call
    if imatrix:
        params.imatrix = _imatrix_array(imatrix, keep_alive)
        params.kv_overrides = _kv_overrides({
            "quantize.imatrix.file": "edgeprune calibration pass",
            "quantize.imatrix.dataset": (imatrix_text or "unknown")[:120],
            "quantize.imatrix.entries_count": len(imatrix),
        }, keep_alive)
    if tensor_types:
        params.tt_overrides = _tensor_overrides(tensor_types, keep_alive)
    if progress:
        progress(f"quantizing to {quant_type}{' with importance matrix' if imatrix else ''}")
    start = time.perf_counter()
    with atomic_output(dst) as tmp:
        with llama_log.captured() as log:
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        raise_if_interrupted()
        if status != 0:
            detail = llama_log.error_line(log.text()) or "see llama.cpp's log"
            raise EdgepruneError(f"llama.cpp could not quantize {src} to {quant_type}: {detail}")
        fallbacks = checked_fallbacks(log.text(), tmp)
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


def _imatrix_array(imatrix: dict[str, np.ndarray], keep_alive: list):
    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(sorted(imatrix.items())):
        data = np.ascontiguousarray(values, dtype=np.float32)
        if not np.isfinite(data).all():
            raise EdgepruneError(f"importance matrix for {name} has NaN or Inf: the calibration pass overflowed")
        keep_alive.append(data)
        entries[i].name = name.encode()
        entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = data.size
    entries[len(imatrix)].name = None
    keep_alive.append(entries)
    return ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


def _tensor_overrides(tensor_types: dict[str, str], keep_alive: list):
    """llama.cpp matches override patterns as regexes on tensor names: each name is anchored and escaped."""
    import llama_cpp

    overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
    for i, (name, type_name) in enumerate(sorted(tensor_types.items())):
        ggml_type = getattr(gguf.GGMLQuantizationType, type_name.upper(), None)
        if ggml_type is None:
            raise EdgepruneError(f"unknown tensor type {type_name!r} for {name}: give a ggml type such as q4_k or q6_k")
        pattern = f"^{re.escape(name)}$".encode()
        keep_alive.append(pattern)
        overrides[i].pattern = pattern
        overrides[i].type = int(ggml_type)
    overrides[len(tensor_types)].pattern = None
    keep_alive.append(overrides)
    return ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))


def _kv_overrides(values: dict[str, str | int], keep_alive: list):
    import llama_cpp

    overrides = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for i, (key, value) in enumerate(values.items()):
        overrides[i].key = key.encode()
        if isinstance(value, int):
            overrides[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            overrides[i].value.val_i64 = value
        else:
            overrides[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            overrides[i].value.val_str = value.encode()[:127]
    overrides[len(values)].key = b""
    keep_alive.append(overrides)
    return ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
