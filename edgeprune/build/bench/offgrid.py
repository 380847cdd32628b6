"""Models whose weights lie on no quantization grid, for measuring mixed precision as most users meet it.

The real models the suites use offline come from quantized GGUFs: SmolLM2 is a dequantized Q4_1 file, on whose
grid q4_1 stores its decoder matrices almost exactly; Gemma 3 270M is a dequantized Q4_K_M file whose 640-wide
rows sit on a Q5_0 grid and whose embedding on a Q8_0 one, which that named type re-creates. Either flatters the
type that matches the grid.

Noise moves weights off a grid only at the grid's own scale, and that costs the model: Gaussian noise of a tenth
of each row's deviation cost SmolLM2 41% perplexity (11.50 → 16.21 on the odd reference topics), while at 3% of it
(+2.7%) q4_1 still stored blk.3.attn_q with 11× less imatrix-weighted error than q4_0. A permutation costs
nothing: every quantization block holds 32 consecutive weights of a row, and the model computes the same function
with its residual channels, its MLP channels and each head's value channels shuffled, consistently, through every
matrix and norm. Each new block then mixes weights from up to 32 old blocks, each on its own scale, which no block
grid holds. The seed is fixed, so every run builds the same model; `python -m edgeprune.build.bench.offgrid`
checks it: the same perplexity, and the grid's type no longer better than its neighbours. Measured (2 cores, 20
chunks of the odd reference topics): SmolLM2 PPL 11.504 as shipped and off its grid, blk.3.attn_q's squared error
at q4_1 from 0.0006 to 105.7 (q4_0 130.6, q5_0 32.4); Gemma 3 270M PPL 11.913 both, blk.3.ffn_up's at q5_0 from
2.4e-5 to 3.79 (q4_1 13.8, q5_1 3.23).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from converters import ConversionInput, write_gguf

from edgeprune.build.loading import LoadedModel, load_model
from edgeprune.build.quantize import quantize_gguf
from edgeprune.core.errors import EdgepruneError
from edgeprune.core.fetch import fetch_gemma3, fetch_smollm2
from edgeprune.core.texts import default_evaluation_text
from edgeprune.device.validation.quality import measure_perplexity

SEED = 1234
# the norms on the residual stream, by their transformers names (Llama, Mistral and Qwen have the first two)
RESIDUAL_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm")
HEAD_NORMS = ("q_norm", "k_norm")  # per query and key head dimension: rotary pairs, left as they are


def move_off_grid(model: torch.nn.Module, *, seed: int = SEED) -> int:
    """Shuffle, in place and consistently, the residual channels (every embedding column, norm, matrix input and
    output row on the stream), each layer's MLP channels and each key-value head's value channels; the function is
    unchanged (checked on a few tokens' logits). Returns the number of matrices moved. A parameter it does not know
    is refused by name."""
    probe = torch.arange(1, 17).remainder(model.get_input_embeddings().num_embeddings)[None]
    with torch.no_grad():
        before = model(probe).logits
    generator = torch.Generator().manual_seed(seed)
    config = getattr(model.config, "text_config", model.config)
    inner = model.model
    residual = torch.randperm(config.hidden_size, generator=generator)
    moved: set[int] = set()

    def take(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> None:
        tensor.copy_(tensor.index_select(dim, index))
        moved.add(id(tensor))

    with torch.no_grad():
        take(inner.embed_tokens.weight, residual, 1)
        if model.lm_head.weight is not inner.embed_tokens.weight:
            take(model.lm_head.weight, residual, 1)
        take(inner.norm.weight, residual, 0)
        for layer in inner.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for name in RESIDUAL_NORMS:
                if hasattr(layer, name):
                    take(getattr(layer, name).weight, residual, 0)
            for name in HEAD_NORMS:
                if hasattr(attention, name):
                    moved.add(id(getattr(attention, name).weight))
            for linear in (attention.q_proj, attention.k_proj):
                take(linear.weight, residual, 1)
                if linear.bias is not None:
                    moved.add(id(linear.bias))  # per head output: its channels stay
            for linear in (attention.o_proj, mlp.down_proj):
                take(linear.weight, residual, 0)
                if linear.bias is not None:
                    take(linear.bias, residual, 0)
            channels = torch.randperm(mlp.gate_proj.out_features, generator=generator)
            for linear in (mlp.gate_proj, mlp.up_proj):
                take(linear.weight, residual, 1)
                take(linear.weight, channels, 0)
            take(mlp.down_proj.weight, channels, 1)
            head_dim = attention.head_dim
            kv_heads = attention.v_proj.out_features // head_dim
            per_kv = attention.o_proj.in_features // attention.v_proj.out_features
            values = torch.cat([h * head_dim + torch.randperm(head_dim, generator=generator)
                                for h in range(kv_heads)])
            take(attention.v_proj.weight, residual, 1)
            take(attention.v_proj.weight, values, 0)
            if attention.v_proj.bias is not None:
                take(attention.v_proj.bias, values, 0)
            outputs = torch.cat([q * head_dim + values[(q // per_kv) * head_dim:(q // per_kv + 1) * head_dim]
                                 - (q // per_kv) * head_dim for q in range(kv_heads * per_kv)])
            take(attention.o_proj.weight, outputs, 1)
    unknown = [name for name, p in model.named_parameters() if id(p) not in moved]
    if unknown:
        raise EdgepruneError(f"cannot move {unknown[0]} off its grid: move_off_grid knows Llama-family and Gemma 3 "
                             "layers only")
    with torch.no_grad():
        after = model(probe).logits
    if not (after - before).abs().max() <= 1e-3 * before.abs().max():
        raise EdgepruneError("moving the weights off their grid changed the model's logits: a layer holds a "
                             "parameter move_off_grid does not shuffle right")
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m.weight) in moved
               and m.weight is not inner.embed_tokens.weight)


def off_grid(load, progress=None) -> LoadedModel:
    """A real model loaded by `load(progress)` with its weights moved off their grid (seed SEED)."""
    loaded = load(progress)
    move_off_grid(loaded.model)
    return loaded


def offgrid_smollm2(progress=None) -> LoadedModel:
    """SmolLM2-135M-Instruct off its Q4_1 grid."""
    return off_grid(lambda p: load_model(fetch_smollm2(), progress=p), progress)


def offgrid_gemma3(progress=None) -> LoadedModel:
    """Gemma 3 270M off its Q5_0 and Q8_0 grids."""
    return off_grid(lambda p: load_model(fetch_gemma3(), progress=p), progress)


def main() -> int:
    """Each real model beside itself off its grid: perplexity on the held-out text, and llama.cpp's error for one
    matrix at the grid's type and its neighbours."""
    threads = len(os.sched_getaffinity(0))
    text = default_evaluation_text()
    probe = {"SmolLM2": ("blk.3.attn_q.weight", ("q4_0", "q4_1", "q5_0")),
             "Gemma 3 270M": ("blk.3.ffn_up.weight", ("q4_1", "q5_0", "q5_1"))}
    with tempfile.TemporaryDirectory(prefix="edgeprune-offgrid-") as tmp:
        for label, fetch, moved in (("SmolLM2", fetch_smollm2, offgrid_smollm2),
                                    ("Gemma 3 270M", fetch_gemma3, offgrid_gemma3)):
            tensor, types = probe[label]
            for state, loaded in (("as shipped", load_model(fetch())), ("off its grid", moved())):
                path = write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length),
                                  Path(tmp) / "f16.gguf", "F16", None)
                ppl = measure_perplexity(path, text, max_chunks=20, threads=threads)[0].ppl
                reference = _dequantized(path, tensor)
                errors = []
                for type_name in types:
                    out = quantize_gguf(path, Path(tmp) / "q.gguf", "Q8_0", threads=threads,
                                        tensor_types={tensor: type_name}).path
                    errors.append(float(((_dequantized(out, tensor) - reference) ** 2).sum()))
                print(f"{label} {state}: PPL on {text.name} {ppl:.3f}; {tensor} squared error "
                      + ", ".join(f"{t} {e:.4g}" for t, e in zip(types, errors)))
    return 0


def _dequantized(path: Path, name: str) -> np.ndarray:
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float64)


if __name__ == "__main__":
    sys.exit(main())
