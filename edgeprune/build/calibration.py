"""Activation statistics from one forward pass over calibration text.

Every consumer (the quantizer's importance matrix, the pruning criteria, block influence) needs the same
per-input-column moments of the linear layers, so they are collected once, in float64 so that sums over
tens of thousands of tokens do not lose precision.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgeprune.core.errors import EdgepruneError

Progress = Callable[[str], None]
FULL = "full_attention"  # the layer type of a model without sliding-window layers


@dataclass
class CalibrationStats:
    """Per input column of each nn.Linear: sum x, sum x², token count; per layer: input/output cosine."""

    text_name: str
    n_tokens: int
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    square_sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    layer_cosines: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def _known(self, name: str) -> None:
        if name not in self.counts:
            raise KeyError(f"no calibration statistics for module {name!r}")

    def mean(self, name: str) -> np.ndarray:
        self._known(name)
        return self.sums[name] / self.counts[name]

    def mean_square(self, name: str) -> np.ndarray:
        self._known(name)
        return self.square_sums[name] / self.counts[name]

    def variance(self, name: str) -> np.ndarray:
        """Population variance per column; clipped at 0 because E[x²]−E[x]² can round below it."""
        return np.maximum(self.mean_square(name) - self.mean(name) ** 2, 0.0)

    def imatrix(self) -> dict[str, np.ndarray]:
        """Mean of x² per input column, keyed by HF module name: exactly what llama-imatrix computes."""
        return {name: self.mean_square(name).astype(np.float32) for name in self.counts}

    def gguf_imatrix(self) -> dict[str, np.ndarray]:
        """imatrix() keyed by GGUF tensor name, the way llama.cpp's quantizer looks its entries up."""
        from converters import gguf_tensor_name

        named = {gguf_tensor_name(hf): values for hf, values in self.imatrix().items()}
        return {name: values for name, values in named.items() if name}

    def block_influence(self) -> np.ndarray:
        """1 − mean cosine(input, output) per decoder layer (ShortGPT): low means the layer barely acts."""
        return 1.0 - self.layer_cosines


class _Accumulator:
    """Forward hooks that add each linear input's column moments into a CalibrationStats."""

    def __init__(self, stats: CalibrationStats, n_layers: int):
        self.stats = stats
        self.cos_sum = np.zeros(n_layers)
        self.cos_count = np.zeros(n_layers)
        # q/k/v (and gate/up) receive the same tensor; remember the last one so its moments are computed once.
        self._last: tuple[torch.Tensor, np.ndarray, np.ndarray, int] | None = None

    def add(self, name: str, x: torch.Tensor) -> None:
        if self._last is None or self._last[0] is not x:
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            self._last = (x, flat.sum(0).cpu().numpy(), flat.square().sum(0).cpu().numpy(), flat.shape[0])
        _, s, sq, n = self._last
        st = self.stats
        if name in st.counts:
            st.sums[name] += s
            st.square_sums[name] += sq
            st.counts[name] += n
        else:
            st.sums[name], st.square_sums[name], st.counts[name] = s.copy(), sq.copy(), n

    def linear_hook(self, name: str):
        return lambda module, args: self.add(name, args[0])

    def layer_hook(self, index: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            self.cos_sum[index] += cos.sum().item()
            self.cos_count[index] += cos.numel()

        return hook


def check_calibration_length(n_tokens: int, seq_len: int) -> None:
    """At least one whole calibration sequence is needed; checked early so that nothing is written first."""
    if n_tokens < seq_len:
        raise EdgepruneError(f"calibration text has {n_tokens} tokens, need at least {seq_len}: give a longer --calib file")


def calibration_batches(token_ids: list[int], n_seq: int, seq_len: int, bos_id: int | None) -> torch.Tensor:
    """Cut consecutive sequences from the token list; each starts with BOS, as llama-imatrix does."""
    check_calibration_length(len(token_ids), seq_len)
    available = len(token_ids) // seq_len
    n = min(n_seq, available)
    batch = torch.tensor(token_ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)
    if bos_id is not None:
        batch[:, 0] = bos_id
    return batch


class ChunkStore:
    """Hidden states of the calibration sequences between two layers, chunk by chunk: in RAM, or in files under
    `spill_dir` when a whole stream would be large (big models with many calibration tokens)."""

    def __init__(self, device: torch.device, spill_dir: Path | None = None):
        self.device, self.spill_dir = device, spill_dir
        self._chunks: list[torch.Tensor | tuple[Path, torch.Size]] = []

    def append(self, chunk: torch.Tensor) -> None:
        if self.spill_dir is None:
            self._chunks.append(chunk)
            return
        fd, name = tempfile.mkstemp(dir=self.spill_dir, suffix=".f32")
        with os.fdopen(fd, "wb") as f:
            chunk.detach().to("cpu", torch.float32).numpy().tofile(f)
        self._chunks.append((Path(name), chunk.shape))

    def __len__(self) -> int:
        return len(self._chunks)

    def __iter__(self):
        for chunk in self._chunks:
            if isinstance(chunk, torch.Tensor):
                yield chunk
            else:
                path, shape = chunk
                yield torch.from_numpy(np.fromfile(path, dtype=np.float32).reshape(shape)).to(self.device)

    def __del__(self) -> None:
        for chunk in self._chunks:
            if not isinstance(chunk, torch.Tensor):
                chunk[0].unlink(missing_ok=True)


def has_sandwich_norms(layer) -> bool:
    """Gemma 3's layers normalise each sub-layer's output too (post_attention_layernorm is that norm there, the
    FFN's input norm in Llama): the sub-layer adds norm(output) to the residual stream, not the output."""
    return hasattr(layer, "pre_feedforward_layernorm")


class LayerContext:
    """What every decoder layer needs besides its input, for chunks of equal-length calibration sequences:
    positions, rotary embeddings and causal masks, built once per layer type (Gemma 3's sliding-window layers
    have their own mask and rope base). Layers run one at a time over all chunks (layer-major), so only the
    hidden states between two layers are ever held. `fn(x, chunk)` in `run` gets each chunk's index."""

    def __init__(self, config, rotary_emb: torch.nn.Module, chunk_sizes: list[int], seq_len: int,
                 device: torch.device, spill_dir: Path | None = None):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        self.device, self.spill_dir = device, spill_dir
        self.pos = torch.arange(seq_len, device=device)[None]
        example = torch.zeros(1, seq_len, config.hidden_size, device=device)
        per_type = hasattr(rotary_emb, "layer_types")  # Gemma 3's rotary embedding takes the layer type
        self.rope, self.masks = {}, {}
        for kind in set(getattr(config, "layer_types", None) or [FULL]):
            self.rope[kind] = rotary_emb(example, position_ids=self.pos, **({"layer_type": kind} if per_type else {}))
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            self.masks[kind] = [make(config=config, inputs_embeds=example.expand(n, -1, -1), attention_mask=None,
                                     cache=None, position_ids=self.pos) for n in chunk_sizes]

    def store(self) -> ChunkStore:
        return ChunkStore(self.device, self.spill_dir)

    def run(self, fn, xs) -> ChunkStore:
        out = self.store()
        for chunk, x in enumerate(xs):
            out.append(fn(x, chunk))
        return out

    def _inputs(self, layer, chunk: int) -> dict:
        kind = getattr(layer.self_attn, "layer_type", None) or FULL
        return dict(attention_mask=self.masks[kind][chunk], position_embeddings=self.rope[kind], position_ids=self.pos)

    def attention(self, layer):
        """The attention sub-layer's residual step (Gemma 3 normalises the attention output before adding it)."""
        def f(x, chunk):
            out, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **self._inputs(layer, chunk))
            return x + (layer.post_attention_layernorm(out) if has_sandwich_norms(layer) else out)

        return f

    @staticmethod
    def mlp(layer):
        """The FFN sub-layer's residual step: Llama's norm then MLP, or Gemma 3's norm, MLP, norm."""
        if has_sandwich_norms(layer):
            return lambda x, chunk: x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        return lambda x, chunk: x + layer.mlp(layer.post_attention_layernorm(x))

    def decoder(self, layer):
        """The whole decoder layer, as the family's model forward calls it."""
        return lambda x, chunk: layer(x, **self._inputs(layer, chunk))


class ModelLayers:
    """The layer-by-layer view of an in-memory transformers Llama (the lazy twin is edgeprune.build.streaming.LazyLayers)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.config = model, model.config
        self.device = next(model.parameters()).device
        self.n_layers = len(model.model.layers)
        self.rotary_emb = model.model.rotary_emb

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids.to(self.device))

    def layer(self, index: int) -> torch.nn.Module:
        return self.model.model.layers[index]

    def norm(self) -> torch.nn.Module:
        return self.model.model.norm


def embed_chunks(source, batches: torch.Tensor, ctx: LayerContext, batch_size: int) -> ChunkStore:
    out = ctx.store()
    for start in range(0, len(batches), batch_size):
        out.append(source.embed(batches[start : start + batch_size]))
    return out


def chunk_sizes(n_sequences: int, batch_size: int) -> list[int]:
    return [min(batch_size, n_sequences - s) for s in range(0, n_sequences, batch_size)]


def observe_layer(acc: "_Accumulator", index: int, layer: torch.nn.Module, ctx: LayerContext,
                  hidden: ChunkStore) -> ChunkStore:
    """Run one decoder layer over every chunk, adding its linear inputs' moments and its input/output cosine."""
    handles = [layer.register_forward_hook(acc.layer_hook(index), with_kwargs=True)]
    for sub, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(acc.linear_hook(f"model.layers.{index}.{sub}")))

    def step(x, chunk):
        y = ctx.decoder(layer)(x, chunk)
        acc._last = None
        return y[0] if isinstance(y, tuple) else y

    try:
        return ctx.run(step, hidden)
    finally:
        for h in handles:
            h.remove()


def observe_output(acc: "_Accumulator", norm: torch.nn.Module, hidden: ChunkStore) -> None:
    """lm_head's input statistics: the final norm's output, so the logits never need computing."""
    for x in hidden:
        acc.add("lm_head", norm(x))
        acc._last = None


def collect_calibration(
    model: torch.nn.Module,
    token_ids: list[int],
    *,
    n_seq: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    include_lm_head: bool = True,
    text_name: str = "",
    progress: Progress | None = None,
    spill_dir: Path | None = None,
) -> CalibrationStats:
    """Run the model (a transformers Llama, or a layer source such as edgeprune.build.streaming.LazyLayers) once over up to n_seq×seq_len calibration tokens and return activation statistics.

    The pass is layer-major, the same code the layer-streamed pipeline runs, so both give identical numbers."""
    source = model if hasattr(model, "layer") else ModelLayers(model)
    batches = calibration_batches(token_ids, n_seq, seq_len, source.config.bos_token_id)
    stats = CalibrationStats(text_name=text_name, n_tokens=batches.numel())
    acc = _Accumulator(stats, source.n_layers)
    ctx = LayerContext(source.config, source.rotary_emb, chunk_sizes(len(batches), batch_size), seq_len, source.device,
                       spill_dir)
    with torch.inference_mode():
        hidden = embed_chunks(source, batches, ctx, batch_size)
        for i in range(source.n_layers):
            hidden = observe_layer(acc, i, source.layer(i), ctx, hidden)
            if progress:
                progress(f"calibration: layer {i + 1}/{source.n_layers} ({len(batches)} sequences of {seq_len} tokens)")
        if include_lm_head:
            observe_output(acc, source.norm(), hidden)
    stats.layer_cosines = acc.cos_sum / np.maximum(acc.cos_count, 1)
    return stats
