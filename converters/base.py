"""The machinery shared by every architecture: tensor naming, the Q/K permutation, dtypes and the write.

Modelled on llama.cpp's `conversion/` package: this base does the work, and each architecture module
(`llama.py`, `deci.py`, `qwen2.py`) only says how the per-layer shape goes into the metadata, which shapes it
can hold, and whether q/k rows are permuted for its RoPE. Shapes always come from
the model's weights (`edgeprune.core.shapes.shape_of`), so pruned models go through unchanged. The RoPE settings
are read and written by `rope.py`; the config.json field tables are checked by `config.py`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import gguf
import numpy as np
import torch

from edgeprune.core.atomic import atomic_output, write_error
from edgeprune.core.errors import EdgepruneError
from edgeprune.core.shapes import ModelShape, shape_of

from .rope import add_rope_scaling, llama3_rope_factors, rope_parameters
from .vocab import Vocab

T = gguf.MODEL_TENSOR
# transformers module path inside a Llama decoder layer -> GGUF tensor kind (a writer may have its own table:
# Gemma 3 names its norms differently). The linear projections are the same in every family.
LAYER_TENSORS: dict[str, gguf.MODEL_TENSOR] = {
    "input_layernorm": T.ATTN_NORM,
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.k_proj": T.ATTN_K,
    "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT,
    "post_attention_layernorm": T.FFN_NORM,
    "mlp.gate_proj": T.FFN_GATE,
    "mlp.up_proj": T.FFN_UP,
    "mlp.down_proj": T.FFN_DOWN,
}
# The per-head q/k norms of Qwen3 and Gemma 3 (one head_dim vector each, shared by every head)
QK_NORM_TENSORS = {"self_attn.q_norm": T.ATTN_Q_NORM, "self_attn.k_norm": T.ATTN_K_NORM}
# Tensors a layer without attention (deci's n_head == 0) does not have
ATTENTION_KINDS = {T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.ATTN_Q_NORM, T.ATTN_K_NORM, T.ATTN_POST_NORM}
NORM_KINDS = {T.ATTN_NORM, T.FFN_NORM, T.ATTN_Q_NORM, T.ATTN_K_NORM, T.ATTN_POST_NORM, T.FFN_POST_NORM, T.OUTPUT_NORM}
OUTPUT_TYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}


# Values converted to float32 at a time while a tensor is encoded (64 MiB of float32).
ENCODE_BLOCK_VALUES = 1 << 24


def gguf_tensor_name(hf_module: str) -> str | None:
    """GGUF name of the weight of a transformers linear module (the importance matrix's keys), e.g.
    model.layers.3.mlp.down_proj -> blk.3.ffn_down.weight."""
    if hf_module == "lm_head":
        return "output.weight"
    parts = hf_module.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"]:
        kind = LAYER_TENSORS.get(".".join(parts[3:]))
        if kind is not None:
            return f"{gguf.TENSOR_NAMES[kind].format(bid=int(parts[2]))}.weight"
    return None


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from transformers' rotate-half layout to llama.cpp's interleaved RoPE layout, per head."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass
class ConversionInput:
    """Everything the writer needs: a float torch Llama model (or, streamed, its config and the tensors as a
    stream given to `write`), its vocab and descriptive metadata."""

    model: torch.nn.Module | None
    vocab: Vocab
    name: str
    context_length: int
    metadata: dict[str, str] = field(default_factory=dict)  # extra edgeprune.* string keys (provenance)
    config: object | None = None  # transformers config; taken from the model when there is one

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = self.model.config


class ModelWriter:
    """Writes a GGUF for one architecture; subclasses fill in `arch` and the hooks below."""

    arch: gguf.MODEL_ARCH
    config_fields: dict  # the family's config.json fields and their handling (check_config_fields), on its first writer
    rope_permuted = True  # llama's NORM rope rotates interleaved pairs: q/k rows are reordered for it
    tensor_table: dict[str, gguf.MODEL_TENSOR] = LAYER_TENSORS  # a decoder layer's modules, in the file's order
    norm_offset = 0.0  # added to every RMSNorm weight: Gemma's norms multiply by 1 + w, llama.cpp's by the stored w

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.arch_name = gguf.MODEL_ARCH_NAMES[cls.arch]

    def __init__(self, source: ConversionInput, shape: ModelShape | None = None):
        self.source = source
        self.shape = shape or shape_of(source.model)
        self.config = source.config

    # --- the hooks each architecture implements
    @staticmethod
    def can_hold(shape: ModelShape) -> bool:
        """Whether llama.cpp's loader for this architecture can hold `shape`."""
        raise NotImplementedError

    def add_shape_parameters(self, writer: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def add_dimension_keys(self, writer: gguf.GGUFWriter) -> None:
        """The vocabulary and head sizes, as llama.cpp's converter writes them for a Llama."""
        writer.add_vocab_size(self.shape.vocab_size)
        writer.add_rope_dimension_count(self.shape.head_dim)
        writer.add_key_length(self.shape.head_dim)
        writer.add_value_length(self.shape.head_dim)

    # --- shared machinery
    def write(self, path: str | Path, out_type: str = "F16", progress: Callable[[str], None] | None = None,
              tensors: Iterable[tuple[str, torch.Tensor]] | None = None) -> Path:
        """Write tensor by tensor: the header comes from `self.shape`, then each tensor is encoded and written as
        it arrives, so at most one tensor is held. `tensors` defaults to the model's, in `tensor_layout` order."""
        if out_type not in OUTPUT_TYPES:
            raise EdgepruneError(f"unknown GGUF output type {out_type!r}: the converter writes {', '.join(OUTPUT_TYPES)}")
        tensor_type, file_type = OUTPUT_TYPES[out_type]
        path = Path(path)
        layout = self.tensor_layout()
        if progress:
            progress(f"writing {path.name} ({self.arch_name}, {out_type}, {len(self.shape.layers)} layers)")
        with atomic_output(path) as tmp:
            writer = gguf.GGUFWriter(tmp, self.arch_name)
            try:
                self._write_tensors(writer, path, layout, tensor_type, file_type, tensors)
            except BaseException:
                _release_files(writer)  # an open handle would keep a full disk full after the partial file is gone
                raise
        return path

    def _write_tensors(self, writer: gguf.GGUFWriter, path: Path, layout: list[tuple[str, tuple[int, ...]]],
                       tensor_type, file_type, tensors: Iterable[tuple[str, torch.Tensor]] | None) -> None:
        """The header from the layout, then each tensor as the stream yields it, checked against the header."""
        self.add_metadata(writer, file_type)
        for name, shape in layout:
            stored = tensor_type if len(shape) == 2 else gguf.GGMLQuantizationType.F32
            nbytes = int(np.prod(shape)) * (2 if stored != gguf.GGMLQuantizationType.F32 else 4)
            writer.add_tensor_info(name, shape, np.dtype(np.float16 if stored == gguf.GGMLQuantizationType.F16
                                                        else np.float32), nbytes, raw_dtype=stored)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        stream = iter(self.tensors() if tensors is None else tensors)
        for (name, shape), (given, data) in zip(layout, stream):
            if given != name or tuple(data.shape) != shape:
                raise EdgepruneError(f"tensor {given} {tuple(data.shape)} arrived where the header declares "
                                     f"{name} {shape}: the model and its shape disagree")
            array, _ = self.encode(data, tensor_type)
            writer.write_tensor_data(array)
            del data, array  # not held while the stream works out the next tensor (a whole layer, streamed)
        if next(stream, None) is not None or writer.tensors[0]:
            raise EdgepruneError(f"{path.name}: the tensors do not match the header's {len(layout)}")
        writer.close()

    def write_skeleton(self, path: str | Path, with_vocab: bool = False) -> Path:
        """An F16 GGUF of `self.shape` whose tensor data is left as a sparse hole: enough for llama.cpp's
        quantizer to plan every tensor's type in a dry run, for shapes that do not exist as weights yet.
        The vocabulary is left out unless asked for: the quantizer does not read it, and it is slow to write."""
        path = Path(path)
        try:
            return self._write_skeleton(path, with_vocab)
        except OSError as exc:
            raise write_error(exc, path) from exc

    def _write_skeleton(self, path: Path, with_vocab: bool) -> Path:
        writer = gguf.GGUFWriter(path, self.arch_name)
        self.add_metadata(writer, gguf.LlamaFileType.MOSTLY_F16, with_vocab)
        data_bytes = 0
        for name, shape in self.tensor_layout():
            dtype = np.float16 if len(shape) == 2 else np.float32
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes)
            data_bytes += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        with open(path, "r+b") as f:
            f.truncate(gguf.GGUFWriter.ggml_pad(path.stat().st_size, writer.data_alignment) + data_bytes)
        return path

    def tensor_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor the writer emits for `self.shape`, with its numpy-order shape, without needing weights."""
        s, d, hd = self.shape, self.shape.hidden_size, self.shape.head_dim
        layout = [(gguf.TENSOR_NAMES[T.TOKEN_EMBD] + ".weight", (s.vocab_size, d))]
        if self.llama3_rope_factors() is not None:
            layout.append((gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight", (hd // 2,)))
        for bid, layer in enumerate(s.layers):
            q, kv, ff = layer.n_head * hd, layer.n_head_kv * hd, layer.n_ff
            shapes = {T.ATTN_Q: (q, d), T.ATTN_K: (kv, d), T.ATTN_V: (kv, d), T.ATTN_OUT: (d, q), T.FFN_GATE: (ff, d),
                      T.FFN_UP: (ff, d), T.FFN_DOWN: (d, ff), T.ATTN_Q_NORM: (hd,), T.ATTN_K_NORM: (hd,)}
            biases = {T.ATTN_Q: layer.attn_qkv_bias, T.ATTN_K: layer.attn_qkv_bias, T.ATTN_V: layer.attn_qkv_bias,
                      T.ATTN_OUT: layer.attn_output_bias, T.FFN_GATE: layer.ffn_gate_up_bias,
                      T.FFN_UP: layer.ffn_gate_up_bias, T.FFN_DOWN: layer.ffn_down_bias}
            for kind in self.tensor_table.values():
                if kind in ATTENTION_KINDS and not layer.n_head:
                    continue
                name, shape = gguf.TENSOR_NAMES[kind].format(bid=bid), shapes.get(kind, (d,))
                layout.append((name + ".weight", shape))
                if biases.get(kind):
                    layout.append((name + ".bias", (shape[0],)))
        layout.append((gguf.TENSOR_NAMES[T.OUTPUT_NORM] + ".weight", (d,)))
        if not s.tied_embeddings:
            layout.append((gguf.TENSOR_NAMES[T.OUTPUT] + ".weight", (s.vocab_size, d)))
        return layout

    def add_metadata(self, writer: gguf.GGUFWriter, file_type: int, with_vocab: bool = True) -> None:
        c, s = self.config, self.shape
        writer.add_name(self.source.name)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(self.source.context_length)
        writer.add_embedding_length(s.hidden_size)
        writer.add_block_count(s.n_layers)
        self.add_dimension_keys(writer)
        writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
        rope = self.rope_parameters()
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        add_rope_scaling(writer, rope)
        self.add_shape_parameters(writer)
        if with_vocab:
            self.vocab().write_to(writer)
        for key, value in sorted(self.source.metadata.items()):
            writer.add_string(key, value)

    def vocab(self) -> Vocab:
        """The tokenizer section as this architecture stores it."""
        return self.source.vocab

    def rope_parameters(self) -> dict:
        return rope_parameters(self.config)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        model = self.source.model
        yield from self.head_tensors(model.model.embed_tokens.weight)
        for bid, block in enumerate(model.model.layers):
            yield from self.layer_tensors(bid, block)
        yield from self.tail_tensors(model.model.norm.weight, None if self.shape.tied_embeddings else model.lm_head.weight)

    def head_tensors(self, embedding: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        yield gguf.TENSOR_NAMES[T.TOKEN_EMBD] + ".weight", embedding
        if (rope_freqs := self.llama3_rope_factors()) is not None:
            yield gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight", rope_freqs

    def layer_tensors(self, bid: int, block: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """One decoder layer's tensors under their GGUF names, q/k rows permuted where llama.cpp's RoPE wants."""
        layer = self.shape.layers[bid]
        for module_path, kind in self.tensor_table.items():
            if kind in ATTENTION_KINDS and not layer.n_head:
                continue  # a layer without attention (deci n_head == 0) has no attention tensors, norm included
            module = block.get_submodule(module_path)
            name = gguf.TENSOR_NAMES[kind].format(bid=bid)
            heads = {T.ATTN_Q: layer.n_head, T.ATTN_K: layer.n_head_kv}.get(kind) if self.rope_permuted else None
            for part in ("weight", "bias"):
                tensor = getattr(module, part, None)
                if tensor is not None:  # q/k rows, biases included, in llama.cpp's RoPE layout
                    yield f"{name}.{part}", self.stored_norm(kind, permute_rows(tensor, heads) if heads else tensor)

    def tail_tensors(self, norm: torch.Tensor, output: torch.Tensor | None) -> Iterator[tuple[str, torch.Tensor]]:
        yield gguf.TENSOR_NAMES[T.OUTPUT_NORM] + ".weight", self.stored_norm(T.OUTPUT_NORM, norm)
        if output is not None:
            yield gguf.TENSOR_NAMES[T.OUTPUT] + ".weight", output

    def stored_norm(self, kind: gguf.MODEL_TENSOR, tensor: torch.Tensor) -> torch.Tensor:
        """A norm weight as llama.cpp multiplies by it (Gemma's 1 + w, in float32 as llama.cpp's converter adds it
        to a float32 checkpoint); every other tensor as it is."""
        if kind not in NORM_KINDS or not self.norm_offset:
            return tensor
        return tensor.detach().to(torch.float32) + self.norm_offset

    def llama3_rope_factors(self) -> torch.Tensor | None:
        return llama3_rope_factors(self.rope_parameters(), self.shape.head_dim)

    @staticmethod
    def encode(data: torch.Tensor, tensor_type: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
        """Vectors stay F32 as llama.cpp expects; matrices take the requested float type (BF16 as raw bytes).

        Converted in blocks of rows, so that an 8B model's embedding (0.5 G values) is never held in float32:
        the peak is the stored tensor plus its encoding. Every type here is per element or per row, so the
        blocks give the same bytes as the whole."""
        kind = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else tensor_type
        step = max(1, ENCODE_BLOCK_VALUES // max(1, data[0].numel()))
        encoded = None
        for start in range(0, data.shape[0], step):
            block = data[start:start + step].detach().to(torch.float32).cpu().numpy()
            if not np.isfinite(block).all():
                raise EdgepruneError("the model has NaN or Inf weights: the checkpoint is damaged or overflowed")
            if kind == gguf.GGMLQuantizationType.F16:
                block = block.astype(np.float16)
            elif kind != gguf.GGMLQuantizationType.F32:
                block = gguf.quants.quantize(block, kind)
            if encoded is None:
                encoded = np.empty((data.shape[0], *block.shape[1:]), block.dtype)
            encoded[start:start + len(block)] = block
        return encoded, (None if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else kind)


def _release_files(writer: gguf.GGUFWriter) -> None:
    """Close the writer's files without the flush that failed (a full disk refuses it again)."""
    for handle in writer.fout or []:
        with contextlib.suppress(OSError):
            handle.close()
