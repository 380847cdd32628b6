"""RoPE settings: read from a transformers config (4.x or 5), refused by name when llama.cpp's Llama graph cannot
reproduce them, and written as llama.cpp's converter writes them (keys, or llama3's rope_freqs tensor)."""

from __future__ import annotations

import math

import gguf
import torch

from edgeprune.core.errors import EdgepruneError

# Rope scalings whose llama.cpp form is known (add_rope_scaling); "default" is none.
ROPE_SCALING = ("default", "linear", "yarn", "dynamic", "llama3")
# The settings each scaling cannot go without (transformers reads them with no default; llama.cpp writes them).
ROPE_SCALING_NEEDS = {
    "linear": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_parameters(config) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; 4.x in rope_theta/rope_scaling. A model with
    settings per layer type (Gemma 3) gives its global layers', which llama.cpp's rope keys describe."""
    params = layer_type_rope(config, "full_attention")
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None) or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def layer_type_rope(config, layer_type: str) -> dict:
    """The rope settings of one layer type (Gemma 3 keeps one dict per type), or the model's single ones."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get(layer_type), dict):
        return dict(params[layer_type])
    return params


def llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor | None:
    """Llama-3.1 style rope scaling is stored as a per-frequency factor tensor (rope_freqs)."""
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    check_rope_scaling(rope, "the model")
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_ctx = float(rope["original_max_position_embeddings"])
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def check_rope_scaling(params: dict, where: str) -> None:
    """Refuse, by name, a rope scaling that llama.cpp's Llama graph cannot reproduce (the GGUF would load and
    compute other positions), or one without a setting it needs (a `linear` scaling without its factor would
    be written as no scaling at all; llama3's would take numbers of ours)."""
    kind = str(params.get("rope_type") or "default").lower()
    if kind not in ROPE_SCALING:
        raise EdgepruneError(f"{where} uses rope scaling {kind!r}: edgeprune writes {', '.join(ROPE_SCALING)} "
                             "(llama.cpp's Llama graph has no other)")
    for key in ROPE_SCALING_NEEDS.get(kind, ()):
        if params.get(key) is None:
            raise EdgepruneError(f"{where} uses {kind} rope scaling without {key}: that scaling needs "
                                 f"{', '.join(ROPE_SCALING_NEEDS[kind])} in its rope_scaling")


def add_rope_scaling(writer: gguf.GGUFWriter, params: dict) -> None:
    """The rope scaling keys as llama.cpp's converter writes them. `dynamic` NTK writes nothing (llama.cpp does
    not implement it; it only changes positions past the trained context), `llama3` is the rope_freqs tensor."""
    check_rope_scaling(params, "the model")
    kind, factor = str(params.get("rope_type") or "default").lower(), params.get("factor")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        optional = {"extrapolation_factor": writer.add_rope_scaling_yarn_ext_factor,
                    "beta_fast": writer.add_rope_scaling_yarn_beta_fast,
                    "beta_slow": writer.add_rope_scaling_yarn_beta_slow}
        for key, add in optional.items():
            if params.get(key) is not None:
                add(params[key])
        attention_factor = params.get("attention_factor", params.get("attn_factor"))
        if attention_factor is not None:
            writer.add_rope_scaling_yarn_attn_factor(attention_factor)
