"""Shrink a transformers Llama in place so that it still runs, generates, and reads back through shape_of."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeprune.core.shapes import shape_of


class NoAttention(nn.Module):
    """Stands in for a layer's attention once all its heads are pruned (deci's n_head = 0).

    It has no q_proj, which is how shape_of reads n_head = 0; it adds nothing to the residual stream.
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    bias = linear.bias[rows] if linear.bias is not None else None
    return _linear(linear.weight.detach()[rows], bias)


def head_index(heads: np.ndarray, head_dim: int) -> torch.Tensor:
    """Rows (or columns) of the listed heads in a projection laid out head by head."""
    return torch.as_tensor((heads[:, None] * head_dim + np.arange(head_dim)).reshape(-1), dtype=torch.long)


def shrink_attention(
    layer: nn.Module, keep_heads: np.ndarray, keep_kv: np.ndarray, head_dim: int,
    o_weight: torch.Tensor, o_bias: torch.Tensor | None,
) -> None:
    """Keep the listed query and KV heads; o_proj gets the recovered weight (and bias) for the kept columns."""
    attn = layer.self_attn
    if len(keep_heads) == 0:
        layer.self_attn = NoAttention(attn.layer_idx)
        return
    q_rows, kv_rows = head_index(keep_heads, head_dim), head_index(keep_kv, head_dim)
    attn.q_proj = _keep_rows(attn.q_proj, q_rows)
    attn.k_proj = _keep_rows(attn.k_proj, kv_rows)
    attn.v_proj = _keep_rows(attn.v_proj, kv_rows)
    attn.o_proj = _linear(o_weight, o_bias)
    attn.num_key_value_groups = len(keep_heads) // len(keep_kv)  # read by repeat_kv in every attention kernel


def shrink_mlp(layer: nn.Module, keep: np.ndarray, down_weight: torch.Tensor, down_bias: torch.Tensor | None) -> None:
    rows = torch.as_tensor(keep, dtype=torch.long)
    mlp = layer.mlp
    mlp.gate_proj = _keep_rows(mlp.gate_proj, rows)
    mlp.up_proj = _keep_rows(mlp.up_proj, rows)
    mlp.down_proj = _linear(down_weight, down_bias)


def add_output_bias(linear: nn.Linear, constant: torch.Tensor) -> nn.Linear:
    """Return the layer with `constant` added to its output (a bias is created if there was none)."""
    bias = constant if linear.bias is None else linear.bias.detach() + constant
    return _linear(linear.weight.detach(), bias.to(linear.weight.dtype))


def remove_layers(model: nn.Module, drop: list[int]) -> None:
    """Delete whole decoder layers and renumber the rest, whose layer_idx addresses the KV cache."""
    kept = [layer for i, layer in enumerate(model.model.layers) if i not in set(drop)]
    model.model.layers = nn.ModuleList(kept)
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    config = model.config
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in set(drop)]
    config.num_hidden_layers = len(kept)


def sync_config(model: nn.Module) -> None:
    """Make config.json describe the modules where one set of widths can (the model forward reads only
    num_hidden_layers; per-layer widths live in the modules and reach the GGUF through shape_of)."""
    shape = shape_of(model)
    config = model.config
    config.num_hidden_layers = shape.n_layers
    if shape.is_uniform:
        first = shape.layers[0]
        config.num_attention_heads = first.n_head
        config.num_key_value_heads = first.n_head_kv
        config.intermediate_size = first.n_ff
    # A config that names no head_dim (as Qwen2 ships, and its GGUF then has no key_length) keeps it unnamed
    # while hidden / heads still gives it
    if getattr(config, "head_dim", None) is not None or config.hidden_size != shape.head_dim * config.num_attention_heads:
        config.head_dim = shape.head_dim
