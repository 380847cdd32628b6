"""The converter on tiny random Llama models: llama.cpp must compute what transformers computes."""

from __future__ import annotations

import gguf
import pytest
import torch
from conftest import agreement, build_bpe_tokenizer, build_tiny_llama, llama_cpp_logits, torch_logits

from converters import ConversionInput, gguf_tensor_name, write_gguf
from edgeprune.core.errors import EdgepruneError
from edgeprune.build.loading import load_model
from edgeprune.core.shapes import shape_of

TEXT = "Pack my box with five dozen liquor jugs. The quick brown fox 12345 café\n\tdef main(): return 42"


def convert(model_dir, path, out_type="F16"):
    loaded = load_model(model_dir)
    write_gguf(ConversionInput(loaded.model, loaded.vocab, "tiny", 256), path, out_type)
    return loaded


def fields(path):
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("out_type", ["F32", "F16"])
def test_bpe_model_logits_and_tokens_match(tiny_bpe_llama, tmp_path, out_type):
    path = tmp_path / "m.gguf"
    loaded = convert(tiny_bpe_llama, path, out_type)
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=64, verbose=False, vocab_only=True)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
    top1, kld = agreement(torch_logits(loaded.model, ids), llama_cpp_logits(path, ids))
    assert top1 == 1.0 and kld < 1e-3


def test_bf16_output_loads_and_agrees(tiny_bpe_llama, tmp_path):
    path = tmp_path / "m.gguf"
    loaded = convert(tiny_bpe_llama, path, "BF16")
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    _, kld = agreement(torch_logits(loaded.model, ids), llama_cpp_logits(path, ids))
    assert kld < 0.01
    assert fields(path)[1]["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.BF16


def test_bpe_metadata(tiny_bpe_llama, tmp_path):
    path = tmp_path / "m.gguf"
    convert(tiny_bpe_llama, path)
    kv, tensors = fields(path)
    assert kv["general.architecture"] == "llama"
    assert kv["llama.attention.head_count"] == 4 and kv["llama.attention.head_count_kv"] == 2
    assert kv["llama.feed_forward_length"] == 96 and kv["llama.rope.dimension_count"] == 16
    assert kv["llama.attention.key_length"] == 16
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert kv["tokenizer.ggml.bos_token_id"] == 1 and kv["tokenizer.ggml.eos_token_id"] == 2
    assert len(kv["tokenizer.ggml.merges"]) > 100
    assert "<|im_start|>" in kv["tokenizer.chat_template"]
    types = kv["tokenizer.ggml.token_type"]
    assert types[1] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert "output.weight" not in tensors  # tied embeddings


def test_sentencepiece_untied_model(tiny_spm_llama, tmp_path):
    path = tmp_path / "m.gguf"
    loaded = convert(tiny_spm_llama, path)
    kv, tensors = fields(path)
    assert kv["tokenizer.ggml.model"] == "llama" and len(kv["tokenizer.ggml.scores"]) == 400
    assert "output.weight" in tensors
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    from llama_cpp import Llama

    assert Llama(str(path), n_ctx=64, verbose=False, vocab_only=True).tokenize(TEXT.encode(), add_bos=False) == ids
    top1, kld = agreement(torch_logits(loaded.model, ids), llama_cpp_logits(path, ids))
    assert top1 == 1.0 and kld < 1e-3


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    build_bpe_tokenizer(d)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    build_tiny_llama(d, 389, rope_scaling=scaling)
    path = tmp_path / "m.gguf"
    loaded = convert(d, path)
    _, tensors = fields(path)
    assert "rope_freqs.weight" in tensors and list(tensors["rope_freqs.weight"].shape) == [8]
    ids = loaded.tokenizer(TEXT * 3, add_special_tokens=False)["input_ids"]
    top1, kld = agreement(torch_logits(loaded.model, ids), llama_cpp_logits(path, ids))
    assert top1 > 0.98 and kld < 1e-3


def shrink_layer(model, layer: int, n_ff: int, n_groups: int) -> None:
    """Hand-prune one layer (keep the first n_ff channels and n_groups KV groups) and add output biases."""
    block = model.model.layers[layer]
    mlp, attn = block.mlp, block.self_attn
    head_dim = model.config.head_dim
    group = model.config.num_attention_heads // model.config.num_key_value_heads

    def cut(linear, rows=None, cols=None, bias=False):
        w = linear.weight.data
        w = w[:rows] if rows is not None else w
        w = w[:, :cols] if cols is not None else w
        new = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias)
        new.weight.data = w.clone()
        if bias:
            new.bias.data = torch.randn(w.shape[0]) * 0.5
        return new

    mlp.gate_proj, mlp.up_proj = cut(mlp.gate_proj, rows=n_ff), cut(mlp.up_proj, rows=n_ff)
    mlp.down_proj = cut(mlp.down_proj, cols=n_ff, bias=True)
    attn.q_proj = cut(attn.q_proj, rows=n_groups * group * head_dim)
    attn.k_proj = cut(attn.k_proj, rows=n_groups * head_dim)
    attn.v_proj = cut(attn.v_proj, rows=n_groups * head_dim)
    attn.o_proj = cut(attn.o_proj, cols=n_groups * group * head_dim, bias=True)


def test_per_layer_shapes_become_deci_and_match(tiny_bpe_llama, tmp_path):
    loaded = load_model(tiny_bpe_llama)
    shrink_layer(loaded.model, 1, n_ff=32, n_groups=1)
    shape = shape_of(loaded.model)
    assert shape.architecture == "deci"
    path = write_gguf(ConversionInput(loaded.model, loaded.vocab, "tiny", 256), tmp_path / "d.gguf")
    kv, tensors = fields(path)
    assert kv["general.architecture"] == "deci"
    assert kv["deci.feed_forward_length"] == [96, 32, 96] and kv["deci.attention.head_count_kv"] == [2, 1, 2]
    assert "blk.1.attn_output.bias" in tensors and "blk.1.ffn_down.bias" in tensors
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    top1, kld = agreement(torch_logits(loaded.model, ids), llama_cpp_logits(path, ids))
    assert top1 == 1.0 and kld < 1e-3


def test_uniform_pruned_model_stays_llama_with_biases(tiny_bpe_llama, tmp_path):
    loaded = load_model(tiny_bpe_llama)
    for layer in range(3):
        shrink_layer(loaded.model, layer, n_ff=64, n_groups=1)
    path = write_gguf(ConversionInput(loaded.model, loaded.vocab, "tiny", 256), tmp_path / "u.gguf")
    kv, _ = fields(path)
    assert kv["general.architecture"] == "llama" and kv["llama.feed_forward_length"] == 64
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    top1, kld = agreement(torch_logits(loaded.model, ids), llama_cpp_logits(path, ids))
    assert top1 == 1.0 and kld < 1e-3


def test_nan_weights_are_refused_and_nothing_is_written(tiny_bpe_llama, tmp_path):
    loaded = load_model(tiny_bpe_llama)
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(EdgepruneError, match="NaN"):
        write_gguf(ConversionInput(loaded.model, loaded.vocab, "tiny", 256), tmp_path / "x.gguf")
    assert [p.name for p in tmp_path.iterdir() if "gguf" in p.name] == []  # no partial file either


def test_tensor_name_mapping():
    assert gguf_tensor_name("model.layers.3.mlp.down_proj") == "blk.3.ffn_down.weight"
    assert gguf_tensor_name("model.layers.0.self_attn.q_proj") == "blk.0.attn_q.weight"
    assert gguf_tensor_name("lm_head") == "output.weight"
    assert gguf_tensor_name("model.embed_tokens") is None
