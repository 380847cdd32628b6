"""The per-layer shape of a (possibly pruned) Llama model, read from its weights, never from config.json.

One description shared by the converter (which picks `llama` or `deci` from it), the cost model and the
planner, so that what is predicted is exactly what is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for shape_of: reading a GGUF's shape must work on a device without torch
    import torch


DEFAULT_SWA_PATTERN = 6  # llama.cpp's gemma3 pattern when the GGUF names none (load_swa_pattern(ml, 6))


@dataclass(frozen=True)
class LayerShape:
    n_head: int  # query heads; 0 means the layer has no attention (deci only)
    n_head_kv: int
    n_ff: int
    attn_output_bias: bool = False  # blk.N.attn_output.bias: bias compensation, or attention_bias
    ffn_down_bias: bool = False  # blk.N.ffn_down.bias: bias compensation, or mlp_bias
    attn_qkv_bias: bool = False  # blk.N.attn_{q,k,v}.bias: the checkpoint's attention_bias, cut with its heads
    ffn_gate_up_bias: bool = False  # blk.N.ffn_{gate,up}.bias: the checkpoint's mlp_bias, cut with its channels
    sliding: bool = False  # attends within ModelShape.sliding_window only (Gemma 3's local layers)


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    head_dim: int
    layers: tuple[LayerShape, ...]
    tied_embeddings: bool
    sliding_window: int = 0  # the window of the sliding layers, in a GGUF that applies one (gemma3); 0: none

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def is_uniform(self) -> bool:
        """True when a `llama` GGUF can hold the model: llama.cpp builds every layer with layer 0's widths."""
        first = self.layers[0]
        same = all((l.n_head, l.n_head_kv, l.n_ff) == (first.n_head, first.n_head_kv, first.n_ff) for l in self.layers)
        return same and first.n_head > 0

    @property
    def architecture(self) -> str:
        """A Llama's GGUF architecture (other families may have their own: converters.writer_class)."""
        return "llama" if self.is_uniform else "deci"

    def decoder_params(self) -> int:
        """Attention plus MLP weights: the parameters that structured pruning removes."""
        d, hd = self.hidden_size, self.head_dim
        return sum(2 * d * hd * (l.n_head + l.n_head_kv) + 3 * d * l.n_ff for l in self.layers)

    @property
    def table_key(self) -> list[int]:
        """Vocabulary, width and layers: how the measured tables name the model they measured."""
        return [self.vocab_size, self.hidden_size, self.n_layers]

    def pass_params(self) -> int:
        """The weights each token's forward pass multiplies by: the decoder's and the output head's (tied or not),
        which sets the cost of training and of a teacher's pass. Gemma 3 270M's head is 1.7× its decoder."""
        return self.decoder_params() + self.vocab_size * self.hidden_size


def shape_of(model: torch.nn.Module) -> ModelShape:
    """Read the shape of a transformers LlamaForCausalLM (pruned or not) from its modules' weights."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window, sliding = sliding_layers(config)
    layers = []
    for index, block in enumerate(model.model.layers):
        attn, mlp = block.self_attn, block.mlp
        q_proj = getattr(attn, "q_proj", None)
        o_proj = getattr(attn, "o_proj", None)
        layers.append(
            LayerShape(
                n_head=q_proj.out_features // head_dim if q_proj is not None else 0,
                n_head_kv=attn.k_proj.out_features // head_dim if q_proj is not None else 0,
                n_ff=mlp.gate_proj.out_features,
                attn_output_bias=o_proj is not None and o_proj.bias is not None,
                ffn_down_bias=mlp.down_proj.bias is not None,
                attn_qkv_bias=q_proj is not None and q_proj.bias is not None,
                ffn_gate_up_bias=mlp.gate_proj.bias is not None,
                sliding=sliding[index],
            )
        )
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return ModelShape(
        vocab_size=embed.shape[0],
        hidden_size=embed.shape[1],
        head_dim=head_dim,
        layers=tuple(layers),
        tied_embeddings=head.data_ptr() == embed.data_ptr(),
        sliding_window=window,
    )


def swa_pattern(pattern, n_layers: int) -> list[bool]:
    """Which layers slide, from a GGUF's attention.sliding_window_pattern: a per-layer array, or a period whose
    last layer is global (llama_hparams::set_swa_pattern; 0: every layer slides)."""
    if isinstance(pattern, list):
        return [bool(v) for v in pattern]
    period = int(pattern)
    return [period == 0 or i % period < period - 1 for i in range(n_layers)]


def sliding_layers(config) -> tuple[int, list[bool]]:
    """The window and which layers use it, where llama.cpp applies a window: Gemma 3's (llama.cpp's llama and
    qwen2 graphs attend to the whole context whatever Mistral's or Qwen2's config says)."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None) or []
    if getattr(config, "model_type", None) != "gemma3_text" or not getattr(config, "sliding_window", None):
        return 0, [False] * n
    return int(config.sliding_window), [t == "sliding_attention" for t in types[:n]]


def shape_from_gguf(info) -> ModelShape:
    """Read the per-layer shape of a GGUF (an edgeprune.device.gguf_check.GGUFInfo): llama, deci, qwen2, qwen3 or
    gemma3 (with its sliding-window pattern)."""
    n_layer = info.block_count
    tensors = {t.name: t for t in info.reader.tensors}

    def per_layer(key: str, default=None) -> list[int]:
        value = info.arch_value(key, default)
        return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layer

    heads = per_layer("attention.head_count")
    heads_kv = per_layer("attention.head_count_kv", info.arch_value("attention.head_count"))
    n_ff = per_layer("feed_forward_length")
    n_embd = int(info.arch_value("embedding_length"))
    head_dim = int(info.arch_value("attention.key_length", n_embd // max(heads)))
    window = int(info.arch_value("attention.sliding_window", 0) or 0) if info.architecture == "gemma3" else 0
    sliding = swa_pattern(info.arch_value("attention.sliding_window_pattern", DEFAULT_SWA_PATTERN), n_layer)
    layers = tuple(
        LayerShape(heads[i], heads_kv[i], n_ff[i], f"blk.{i}.attn_output.bias" in tensors,
                   f"blk.{i}.ffn_down.bias" in tensors, f"blk.{i}.attn_q.bias" in tensors,
                   f"blk.{i}.ffn_gate.bias" in tensors, sliding=bool(window) and sliding[i])
        for i in range(n_layer)
    )
    embd = tensors.get("token_embd.weight")
    vocab = int(embd.shape[1]) if embd is not None else 0
    return ModelShape(vocab, n_embd, head_dim, layers, tied_embeddings="output.weight" not in tensors,
                      sliding_window=window)
