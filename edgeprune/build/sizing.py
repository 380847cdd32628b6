"""The size of a model not yet written, quantized: llama.cpp's quantizer in dry-run mode decides every tensor's
type (K-quant fallbacks and the Q4_K_M "more bits" layers included) on a skeleton GGUF whose data is a sparse
hole, so nothing here re-implements llama.cpp's type rules. The skeleton comes from the converters (torch), so
this is the build's side of the cost model (edgeprune.device.costmodel), which predicts from the sizes.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import gguf

from converters import ConversionInput, writer_class
from edgeprune.core.shapes import ModelShape
from edgeprune.device.costmodel import Prediction, SizeEstimate, TensorCost, predict_for_size
from edgeprune.device.llamacpp.quantizer import check_quant_type, dry_run_types


def estimate_size(source: ConversionInput, shape: ModelShape, quant: str) -> SizeEstimate:
    """Exact per-tensor types and bytes of `shape` quantized to `quant`, from llama.cpp's dry run."""
    quant = check_quant_type(quant)
    writer = writer_class(source.config, shape)(source, shape)
    metadata = _metadata_bytes(writer)
    types = _dry_run_types(writer, quant)
    tensors = []
    for name, dims in writer.tensor_layout():
        row_length, rows = dims[-1], (dims[0] if len(dims) == 2 else 1)
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[types[name].upper()]]
        tensors.append(TensorCost(name, row_length, rows, types[name], rows * row_length // block * type_size))
    return SizeEstimate(quant, tuple(tensors), metadata, writer.arch_name)


def _metadata_bytes(writer) -> int:
    """Bytes before the tensor data: a skeleton's header without the vocabulary (cheap, measured every time) plus
    what the vocabulary's key/values add (slow to write: measured once per vocabulary content). The header's
    padding to the 32-byte alignment is counted once, so this may be up to 31 bytes off."""
    with tempfile.TemporaryDirectory() as tmp:
        path = writer.write_skeleton(Path(tmp) / "skeleton.gguf")
        data = sum(gguf.GGUFWriter.ggml_pad(_nbytes(dims), gguf.GGUF_DEFAULT_ALIGNMENT) for _, dims in writer.tensor_layout())
        header = path.stat().st_size - data
    return header + _vocab_bytes(writer.source.vocab, writer.arch_name) + _IMATRIX_KEYS_BYTES


def _vocab_bytes(vocab, arch_name: str) -> int:
    """The bytes a vocabulary's key/values take in a GGUF, cached under its content (a tuple of its fields: hashing
    it reuses each string's cached hash, so a SmolLM2-sized vocabulary is looked up in milliseconds)."""
    key = tuple(_frozen(getattr(vocab, f.name)) for f in dataclasses.fields(vocab))
    if key not in _VOCAB_BYTES:
        with tempfile.TemporaryDirectory() as tmp:
            sizes = []
            for with_vocab in (False, True):
                writer = gguf.GGUFWriter(Path(tmp) / f"{with_vocab}.gguf", arch_name)
                if with_vocab:
                    vocab.write_to(writer)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.close()
                sizes.append((Path(tmp) / f"{with_vocab}.gguf").stat().st_size)
        _VOCAB_BYTES[key] = sizes[1] - sizes[0]
    return _VOCAB_BYTES[key]


def _frozen(value):
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    return tuple(value) if isinstance(value, list) else value


_VOCAB_BYTES: dict[tuple, int] = {}
_IMATRIX_KEYS_BYTES = 256  # quantize.imatrix.* keys added by the quantizer


def _nbytes(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n * (2 if len(dims) == 2 else 4)


def _dry_run_types(writer, quant: str) -> dict[str, str]:
    key = (writer.arch_name, writer.shape, quant, writer.llama3_rope_factors() is not None)
    if key not in _DRY_RUN_CACHE:
        _DRY_RUN_CACHE[key] = _run_dry_run(writer, quant)
    return _DRY_RUN_CACHE[key]


_DRY_RUN_CACHE: dict[tuple, dict[str, str]] = {}


def _run_dry_run(writer, quant: str) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        names = [name for name, _ in writer.tensor_layout()]  # the skeleton's tensors, as it was written
        return dry_run_types(writer.write_skeleton(Path(tmp) / "skeleton.gguf"), quant, names)


def predict(source: ConversionInput, shape: ModelShape, quant: str, profile) -> Prediction:
    """Everything the budgets are judged on, predicted for `profile`'s device and runtime."""
    return predict_for_size(estimate_size(source, shape, quant), shape, profile)
