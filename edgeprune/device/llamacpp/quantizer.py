"""llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python): its type names, its parameters
and the call itself, for a real quantization (a build's) or a dry run (the cost model's exact per-tensor types).

gguf-py has no K-quants or IQ types, and any quantizer of our own would drift from llama.cpp's.
"""

from __future__ import annotations

import ctypes
import re
import tempfile
from pathlib import Path

import gguf
import numpy as np

from edgeprune.core.atomic import raise_if_interrupted
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.llamacpp import log as llama_log

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


def check_quant_type(name: str) -> str:
    """Normalise a quant type name, or fail with the list of known ones."""
    upper = name.upper()
    if upper not in QUANT_TYPES:
        raise EdgepruneError(f"unknown quant type {name!r}: choose one of {', '.join(QUANT_TYPES)}")
    return upper


def quantize_params(quant_type: str, *, threads: int | None = None, dry_run: bool = False):
    """llama.cpp's default quantization parameters for `quant_type` (a QUANT_TYPES name); `threads` when given."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    if threads is not None:
        params.nthread = threads
    params.ftype = QUANT_TYPES[quant_type]
    if dry_run:
        params.dry_run = True
    return params


def model_quantize(src: str | Path, dst: str | Path, params, failure: str) -> str:
    """Run llama_model_quantize with llama.cpp's log captured, and return the log. A failure raises one line:
    `failure`, then the reason llama.cpp logged."""
    import llama_cpp

    with llama_log.captured() as log:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    raise_if_interrupted()
    if status != 0:
        detail = llama_log.error_line(log.text()) or "see llama.cpp's log"
        raise EdgepruneError(f"{failure}: {detail}")
    return log.text()


def dry_run_types(path: Path, quant: str, names: list[str] | None = None) -> dict[str, str]:
    """The type llama.cpp's quantizer would give each tensor of the GGUF at `path` for `quant`, without
    quantizing: its dry run logs them (a dry run writes no file to read them from, and a real quantization
    of SmolLM2's skeleton takes 2.4 s where the dry run takes 0.013 s). Every tensor of the file, `names` or
    as gguf-py's reader lists them, must get a type."""
    params = quantize_params(quant, dry_run=True)
    with tempfile.TemporaryDirectory() as tmp:
        text = model_quantize(path, Path(tmp) / "out.gguf", params,
                              f"llama.cpp could not plan a {quant} quantization of this shape")
    names = names if names is not None else [t.name for t in gguf.GGUFReader(path).tensors]
    return llama_log.tensor_types(text, names, Path(path).name)


# --- parameters that point at Python data: each buffer goes into `keep_alive`, which must outlive the call ---


def imatrix_array(imatrix: dict[str, np.ndarray], keep_alive: list):
    """The importance matrix (GGUF tensor name -> mean x² per input column) as llama.cpp's imatrix entries."""
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


def tensor_overrides(tensor_types: dict[str, str], keep_alive: list):
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


def kv_overrides(values: dict[str, str | int], keep_alive: list):
    """Metadata key/values the quantizer writes into its output (strings cut to llama.cpp's 127 bytes)."""
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
