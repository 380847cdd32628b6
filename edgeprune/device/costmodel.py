"""Predict a GGUF's size, memory, decode and prefill speed on a device, from its shape and per-tensor sizes.

Pure functions of (model shape, tensor sizes, profile). The sizes of a model not yet written come from
edgeprune.build.sizing (llama.cpp's quantizer in dry-run mode, on a skeleton GGUF written by the converters);
those of an existing GGUF are read off the file, so a device predicts without the converters or torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import gguf

from edgeprune.core.shapes import ModelShape
from edgeprune.device.llamacpp.quantizer import QUANT_TYPES
from edgeprune.device.profiles import MAX_TYPE_EFFICIENCY

KV_PAD = 256  # llama.cpp allocates KV cells in multiples of 256
N_UBATCH = 512  # llama.cpp's default micro-batch: the compute buffer is sized for it
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}


@dataclass(frozen=True)
class TensorCost:
    name: str
    row_length: int  # GGUF ne[0], the input width: what block alignment applies to
    rows: int
    type_name: str  # the type llama.cpp will really store it in
    nbytes: int


@dataclass(frozen=True)
class SizeEstimate:
    quant: str
    tensors: tuple[TensorCost, ...]
    metadata_bytes: int  # header, key/values (vocabulary included) and tensor infos, padded
    architecture: str  # the llama.cpp architecture the GGUF is (to be) written as

    @property
    def file_bytes(self) -> int:
        return self.metadata_bytes + sum(gguf.GGUFWriter.ggml_pad(t.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT) for t in self.tensors)


@dataclass(frozen=True)
class Prediction:
    size: SizeEstimate
    kv_cache_bytes: int
    compute_buffer_bytes: int
    decode_tps: float
    prefill_tps: float
    ttft_s: float

    @property
    def memory_bytes(self) -> int:
        """What validation measures as total memory: file + KV cache + llama.cpp's compute buffer."""
        return self.size.file_bytes + self.kv_cache_bytes + self.compute_buffer_bytes


def _cells(n_ctx: int) -> int:
    return -(-n_ctx // KV_PAD) * KV_PAD


def _window_cells(shape: ModelShape, n_ctx: int, swa_full: bool, ubatch: int) -> int:
    """The cells of the sliding-window layers' cache (llama-kv-cache-iswa.cpp): the whole context with `swa_full`,
    else the window plus a micro-batch, padded to 256 cells and never more than the context's."""
    return _cells(n_ctx) if swa_full else min(_cells(n_ctx), _cells(shape.sliding_window + ubatch))


def kv_cache_bytes(shape: ModelShape, n_ctx: int, kv_type: str = "f16", flash_attention: bool = False,
                   swa_full: bool = True, ubatch: int = N_UBATCH) -> int:
    """llama.cpp's KV cache (llama-kv-cache.cpp): every layer gets K at its own width; without flash attention V
    is stored transposed and every layer's V, attention-free layers included, is padded to the widest layer.
    Sliding-window layers (Gemma 3) have a cache of their own (_window_cells)."""
    cells, window = _cells(n_ctx), _window_cells(shape, n_ctx, swa_full, ubatch)
    widths = [l.n_head_kv * shape.head_dim for l in shape.layers]
    v_widths = widths if flash_attention else [max(widths)] * len(widths)
    per_layer = [window if l.sliding and shape.sliding_window else cells for l in shape.layers]
    return int(sum(n * (k + v) for n, k, v in zip(per_layer, widths, v_widths)) * KV_TYPE_BYTES[kv_type])


def compute_buffer_bytes(shape: ModelShape, n_ctx: int, flash_attention: bool = False, ubatch: int = N_UBATCH,
                         swa_full: bool = True) -> int:
    """llama.cpp's CPU compute buffer for one micro-batch (`ubatch` tokens, or the context when shorter): the most f32
    activations alive at once anywhere in the graph. That is the batch's logits (plus two hidden-size rows) at the
    output, or a layer's two FFN projections, or, without flash attention, the attention scores (a float per
    head, token and KV cell) with the f32 mask (a float per token and cell; a model with sliding-window layers
    has a second one over their cache), one f32 copy of K and four hidden-size rows per token. Measured
    (llama.cpp 0c1e57098): SmolLM2 98.25 MiB at 512–4096 cells either way (this gives 98.25) and 166.38 MiB at
    8192 cells without flash attention (170.5); a 4-head, 64-wide model with a 16384-token vocabulary 40.76 MiB
    at 4096 cells (41.0); Gemma 3 270M 514.50 MiB at 512 tokens, 32.16 at 32 (the logits: exact)."""
    cells = _cells(n_ctx)
    ubatch = min(ubatch, n_ctx)
    masks = cells + (_window_cells(shape, n_ctx, swa_full, ubatch) if shape.sliding_window else 0)
    n_ff = max(l.n_ff for l in shape.layers)
    n_head = max(l.n_head for l in shape.layers)
    kv_width = max(l.n_head_kv for l in shape.layers) * shape.head_dim
    per_token = max(shape.vocab_size, 2 * n_ff) + 2 * shape.hidden_size
    attention = 0 if flash_attention else ubatch * (cells * n_head + masks + 4 * shape.hidden_size) + cells * kv_width
    return 4 * max(ubatch * per_token, attention)


def read_per_token(size: SizeEstimate) -> list[TensorCost]:
    """The tensors decode reads whole for every token: all of them, except that an untied embedding is only
    gathered (one row per token)."""
    tied = not any(t.name == "output.weight" for t in size.tensors)
    return [t for t in size.tensors if t.name != "token_embd.weight" or tied]


def decode_seconds_per_token(size: SizeEstimate, device) -> float:
    """Bytes read per token over the bandwidth, each tensor at its type's efficiency (the device's decode
    efficiency where the profile measured none for that type), plus the device's fixed cost per layer."""
    return _decode_read_seconds(size, device) + layer_count(size) * (device.decode_layer_overhead_us or 0.0) * 1e-6


def _decode_read_seconds(size: SizeEstimate, device) -> float:
    return sum(tensor_decode_seconds(t, device) for t in read_per_token(size))


def tensor_decode_seconds(tensor: TensorCost, device) -> float:
    """Seconds to read one tensor for a decoded token, at its type's efficiency."""
    efficiency = (device.decode_type_efficiency or {}).get(tensor.type_name, device.decode_efficiency)
    return tensor.nbytes / (device.memory_bandwidth_gbs * 1e9 * efficiency)


def layer_count(size: SizeEstimate) -> int:
    """Decoder layers in the file: those with at least one tensor (blk.N.*)."""
    return len({t.name.split(".")[1] for t in size.tensors if t.name.startswith("blk.")})


def prefill_seconds_per_token(size: SizeEstimate, shape: ModelShape, n_prompt: int, device) -> float:
    """2 FLOPs per weight of every layer matrix and attention over the prompt (n_prompt/2 keys on average), at
    the compute rate and each type's efficiency; attention runs on the f16 KV cache, so at f16's. The output
    matrix runs once per prompt, for its last token."""
    per_type = device.prefill_type_efficiency or {}
    compute = device.compute_gflops * 1e9

    def seconds(t: TensorCost) -> float:
        return 2.0 * t.row_length * t.rows / (compute * per_type.get(t.type_name, device.prefill_efficiency))

    head = [t for t in read_per_token(size) if t.name in ("output.weight", "token_embd.weight")]
    layers = [t for t in size.tensors if t.name.startswith("blk.") and t.rows > 1]
    attention = sum(4 * l.n_head * shape.head_dim * n_prompt / 2 for l in shape.layers)
    return (sum(map(seconds, layers)) + sum(map(seconds, head)) / n_prompt
            + attention / (compute * per_type.get("f16", device.prefill_efficiency)))


def calibrated_device(device, size: SizeEstimate, shape: ModelShape, n_prompt: int, decode_tps: float,
                      prefill_tps: float):
    """`device` with its efficiencies scaled so that the cost model predicts the measured speeds of this file:
    every per-type entry by the same factor as the plain efficiency, the fixed per-layer cost left as it is.
    Scaled values stay within what a profile accepts (plain at most 1, per type at most 4)."""
    overhead = decode_seconds_per_token(size, device) - _decode_read_seconds(size, device)
    measured_read = max(1.0 / decode_tps - overhead, 1e-3 / decode_tps)  # positive even if the layer cost exceeds it
    decode = _decode_read_seconds(size, device) / measured_read
    prefill = prefill_tps * prefill_seconds_per_token(size, shape, n_prompt, device)

    def scaled(efficiency: float, factor: float, cap: float) -> float:
        return round(min(cap, efficiency * factor), 4)

    def scaled_table(table: dict[str, float] | None, factor: float) -> dict[str, float] | None:
        return {name: scaled(value, factor, MAX_TYPE_EFFICIENCY) for name, value in table.items()} if table else table

    return dataclasses.replace(
        device, decode_efficiency=scaled(device.decode_efficiency, decode, 1.0),
        prefill_efficiency=scaled(device.prefill_efficiency, prefill, 1.0),
        decode_type_efficiency=scaled_table(device.decode_type_efficiency, decode),
        prefill_type_efficiency=scaled_table(device.prefill_type_efficiency, prefill))


def size_of_gguf(info) -> SizeEstimate:
    """The same accounting, read off an existing GGUF (an edgeprune.device.gguf_check.GGUFInfo)."""
    tensors = tuple(
        TensorCost(t.name, int(t.shape[0]), int(t.shape[1]) if len(t.shape) > 1 else 1, t.tensor_type.name.lower(),
                   int(t.n_bytes))
        for t in info.reader.tensors
    )
    first_data = min(t.data_offset for t in info.reader.tensors)
    ftype = info.value("general.file_type")
    quant = next((name for name, value in QUANT_TYPES.items() if value == ftype), "unknown")
    return SizeEstimate(quant, tensors, int(first_data), info.architecture)


def predict_for_size(size: SizeEstimate, shape: ModelShape, profile) -> Prediction:
    b, dev, rt = profile.budgets, profile.device, profile.runtime
    decode = 1.0 / decode_seconds_per_token(size, dev)
    prefill = 1.0 / prefill_seconds_per_token(size, shape, b.ttft_prompt_tokens, dev)
    return Prediction(
        size=size,
        kv_cache_bytes=kv_cache_bytes(shape, b.context_length, rt.kv_cache_type, rt.flash_attention, rt.swa_full,
                                      rt.micro_batch),
        compute_buffer_bytes=compute_buffer_bytes(shape, b.context_length, rt.flash_attention, rt.micro_batch,
                                                  rt.swa_full),
        decode_tps=decode,
        prefill_tps=prefill,
        ttft_s=b.ttft_prompt_tokens / prefill + 1.0 / decode,
    )


def predict_gguf(info, profile) -> Prediction:
    """Predict an existing GGUF (an edgeprune.device.gguf_check.GGUFInfo) on `profile`'s device."""
    from edgeprune.core.shapes import shape_from_gguf

    return predict_for_size(size_of_gguf(info), shape_from_gguf(info), profile)
