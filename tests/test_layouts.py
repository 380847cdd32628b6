"""The checkpoints people have: each Llama config variant and tokenizer layout, exported at F16, must compute
what transformers computes (mean KLD <= 1e-3 in llama.cpp) and be the GGUF llama.cpp's own convert_hf_to_gguf.py
writes for the same directory: same tensors, same metadata apart from general.*, same tokenization."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import agreement, build_spm_tokenizer, build_tiny_llama, llama_cpp_logits, torch_logits

from converters import ConversionInput, write_gguf
from edgeprune.build.bench.llamacpp import compare_ggufs, llama_cpp_convert, vocab_test_files
from edgeprune.core.errors import EdgepruneError
from edgeprune.build.loading import load_model

TEXT = ("The quick brown fox jumps over the lazy dog, 12345 times in 2026. Grüße aus Köln! "
        "def main():\n    return [x ** 2 for x in range(10)]\n") * 6
ROPE = {"rope_theta": 10000.0}
VARIANTS = {
    "attention_bias": dict(attention_bias=True),
    "mlp_bias": dict(mlp_bias=True),
    "both_biases": dict(attention_bias=True, mlp_bias=True),
    "explicit_head_dim": dict(head_dim=32),  # 4 heads of 32 on a hidden size of 64
    "rope_linear": dict(rope_scaling={**ROPE, "rope_type": "linear", "factor": 2.0}),
    "rope_yarn": dict(rope_scaling={**ROPE, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "rope_dynamic": dict(rope_scaling={**ROPE, "rope_type": "dynamic", "factor": 2.0}),
    "rope_llama3": dict(rope_scaling={**ROPE, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "tied_head": dict(tied=True),
    "mistral": dict(family="mistral"),
    "qwen2": dict(family="qwen2", head_dim=None),  # as Qwen2.5 ships: no head_dim in config.json
    "qwen2_explicit_head_dim": dict(family="qwen2"),
    "qwen2_tied_head": dict(family="qwen2", tied=True, head_dim=None),
    "qwen3": dict(family="qwen3"),
    "qwen3_tied_head": dict(family="qwen3", tied=True),
    "gemma3": dict(family="gemma3"),  # 7 layers, window 32: the 200-token text runs past it
    "gemma3_tied_head": dict(family="gemma3", tied=True),
}
# Tokenizer layouts, each a real tokenizer from llama.cpp's own test vocabularies, saved by transformers as a
# tokenizer.json only (no tokenizer.model), as a user's checkpoint has it.
TOKENIZERS = {  # layout: (llama.cpp test vocabulary, Meta's own tokenizer.json settings: ignore_merges and a BOS,
    #                   the model family it comes with)
    "sentencepiece_bpe_metaspace": ("llama-spm", False, "llama"),  # Llama-2 / Mistral / TinyLlama saved by transformers
    "sentencepiece_bpe_prepend_replace": ("phi-3", False, "llama"),  # the older normalizer form of the same
    "byte_level_llama3": ("llama-bpe", True, "llama"),  # as Meta ships it: llama.cpp calls it llama-bpe
    "byte_level_llama3_rebuilt": ("llama-bpe", False, "llama"),  # as transformers rebuilds it: llama.cpp says smaug-bpe
    "byte_level_qwen2": ("qwen2", False, "qwen2"),
}


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("spm")
    build_spm_tokenizer(d)
    return d


def make_like_meta_llama3(path: Path) -> None:
    """Meta's Llama-3 tokenizer.json applies whole-word tokens before merges and prepends <|begin_of_text|>."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["model"]["ignore_merges"] = True
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                 "tokens": ["<|begin_of_text|>"]}},
    }
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


def export_f16(directory: Path, out: Path):
    loaded = load_model(directory)
    path = write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length), out, "F16")
    return loaded, path


def assert_parity_with_transformers(loaded, path: Path) -> None:
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:200]
    assert len(ids) > 100
    top1, kld = agreement(torch_logits(loaded.model, ids), llama_cpp_logits(path, ids))
    assert kld <= 1e-3 and top1 >= 0.95, (kld, top1)


def assert_same_as_converter(ours: Path, directory: Path, tmp_path: Path, apart: tuple[str, ...] = ()) -> dict:
    """Tensors and metadata as llama.cpp's converter writes them, but for general.* and the keys `apart`."""
    theirs, _ = llama_cpp_convert(directory, tmp_path / "llama-cpp-converter.gguf", lambda _msg: None)
    found = compare_ggufs(ours, theirs)
    differing = {k: v for k, v in {**found["keys_only_ours"], **found["keys_only_theirs"], **found["keys_differing"]}.items()
                 if not k.startswith("general.") and k not in apart}
    assert differing == {}, differing
    for key in ("tensors_only_ours", "tensors_only_theirs", "shape_differences", "type_differences", "data_differences"):
        assert not found[key], (key, found[key])
    return found


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_variant_matches_transformers_and_llama_cpp_converter(variant, spm_tokenizer, tmp_path):
    d = tmp_path / variant
    shutil.copytree(spm_tokenizer, d)
    build_tiny_llama(d, 400, **{"tied": False, **VARIANTS[variant]})
    loaded, ours = export_f16(d, tmp_path / "ours.gguf")
    assert_parity_with_transformers(loaded, ours)
    found = assert_same_as_converter(ours, d, tmp_path)
    # and the GGUF as input: the model it reads back is the checkpoint's (rope scaling and biases included)
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:200]
    top1, kld = agreement(torch_logits(loaded.model, ids), torch_logits(load_model(ours).model, ids))
    assert kld <= 3e-4 and top1 >= 0.95, (kld, top1)  # F16 rounding only (Qwen3's q/k norms: 1.0e-4)
    if "bias" in variant:
        assert found["tensors"][0] > 3 * 9 + 3  # the bias tensors are there, on both sides


@pytest.mark.parametrize("layout", TOKENIZERS)
def test_tokenizer_layout_tokenizes_as_llama_cpp_converter(layout, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    name, as_meta_ships, family = TOKENIZERS[layout]
    vocab_file, inputs, expected = vocab_test_files(name)
    d = tmp_path / layout
    tokenizer = AutoTokenizer.from_pretrained(vocab_file.parent, gguf_file=vocab_file.name)
    tokenizer.save_pretrained(d)
    assert not (d / "tokenizer.model").exists()
    if as_meta_ships:
        make_like_meta_llama3(d / "tokenizer.json")
        tokenizer = AutoTokenizer.from_pretrained(d)
    special = {"bos_token_id": tokenizer.bos_token_id or 0, "eos_token_id": tokenizer.eos_token_id or 0}
    build_tiny_llama(d, len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, head_dim=8,
                     family=family, **special)
    loaded, ours = export_f16(d, tmp_path / "ours.gguf")
    # tokenizer keys included, but for a SentencePiece-style BPE's scores: llama.cpp's converter writes -1000 for
    # every piece, which merges in another order than transformers; edgeprune scores by merge rank
    sentencepiece = loaded.vocab.model == "llama"
    assert_same_as_converter(ours, d, tmp_path, ("tokenizer.ggml.scores",) if sentencepiece else ())
    vocab = Llama(str(ours), vocab_only=True, verbose=False)
    ids = [vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False) for text in inputs]
    vocab.close()
    if loaded.vocab.pre in ("llama-bpe", "qwen2"):  # llama.cpp's own tokenizer test passes on our file
        assert ids == expected
    if sentencepiece and layout != "sentencepiece_bpe_metaspace":  # and transformers tokenizes the directory alike
        # (a Metaspace pre-tokenizer splits runs of spaces otherwise than llama.cpp's SentencePiece tokenizer does)
        assert ids == [tokenizer(text, add_special_tokens=False)["input_ids"] for text in inputs]
    assert_parity_with_transformers(loaded, ours)


def test_unknown_split_pre_tokenizer_is_refused_by_name(tmp_path):
    from transformers import AutoTokenizer

    vocab_file, _, _ = vocab_test_files("qwen2")
    d = tmp_path / "odd"
    tokenizer = AutoTokenizer.from_pretrained(vocab_file.parent, gguf_file=vocab_file.name)
    tokenizer.save_pretrained(d)
    spec = (d / "tokenizer.json").read_text(encoding="utf-8")
    (d / "tokenizer.json").write_text(spec.replace("\\\\p{N}|", "\\\\p{N}{1,2}|", 1), encoding="utf-8")
    build_tiny_llama(d, len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=1, head_dim=4)
    with pytest.raises(EdgepruneError, match=r"unsupported BPE pre-tokenizer: a Split by the regex .*\\p\{N\}\{1,2\}"):
        load_model(d)


@pytest.mark.parametrize("scaling, expected", [
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}, "rope scaling 'longrope'"),
    ({"rope_type": "yarn", "factor": 4.0}, "without original_max_position_embeddings"),
])
def test_rope_scaling_llama_cpp_cannot_run_is_refused(spm_tokenizer, tmp_path, scaling, expected):
    d = tmp_path / "m"
    shutil.copytree(spm_tokenizer, d)
    build_tiny_llama(d, 400)
    config = json.loads((d / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {**ROPE, **scaling}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgepruneError, match=expected):
        load_model(d)


@pytest.mark.parametrize("family, options, architecture", [
    # uniform: a llama GGUF (auto is per-group when streamed)
    ("llama", dict(heads=0.5, ffn=0.5, head_mode="per-group"), "llama"),
    # widths differ: deci
    ("llama", dict(heads=0.5, ffn=0.4, allocation="adaptive", head_mode="per-group", recovery="bias"), "deci"),
    # Qwen2 with cut heads or recovery biases: llama.cpp's qwen2 loader cannot hold them, so llama and deci
    ("qwen2", dict(heads=0.5, ffn=0.5, head_mode="per-group"), "llama"),
    ("qwen2", dict(heads=0.5, ffn=0.4, allocation="adaptive", head_mode="per-group", recovery="bias"), "deci"),
    # uniform FFN channels only, no recovery biases: still a qwen2
    ("qwen2", dict(ffn=0.5, recovery="none"), "qwen2"),
])
def test_biased_model_is_pruned_with_its_biases(spm_tokenizer, tmp_path, family, options, architecture):
    """q/k/v and gate/up biases are cut with their heads and channels; the pruned GGUF, in the architecture
    llama.cpp can load it as, computes what the pruned transformers model computes, and the layer-streamed
    path writes the same bytes."""
    import filecmp

    import numpy as np
    import torch

    from edgeprune.build import streaming
    from edgeprune.device.gguf_check import read_gguf
    from edgeprune.build.loading import open_model
    from edgeprune.build.pruning import PruneOptions, prune_model
    from edgeprune.core.shapes import shape_of

    d = tmp_path / "biased"
    shutil.copytree(spm_tokenizer, d)
    biases = dict(attention_bias=True, mlp_bias=True) if family == "llama" else dict(head_dim=None)  # Qwen2's own
    build_tiny_llama(d, 400, tied=False, family=family, **biases)
    ids = np.random.default_rng(0).integers(3, 400, 6000).tolist()
    prune = PruneOptions(calib_sequences=8, calib_seq_len=64, **options)
    loaded = load_model(d)
    model = prune_model(loaded.model, ids, prune).model
    shape = shape_of(model)
    assert all(layer.attn_qkv_bias and layer.ffn_gate_up_bias == (family == "llama") for layer in shape.layers
               if layer.n_head)
    assert shape.decoder_params() < shape_of(load_model(d).model).decoder_params()
    ours = write_gguf(ConversionInput(model, loaded.vocab, loaded.name, loaded.context_length), tmp_path / "p.gguf")
    assert read_gguf(ours).architecture == architecture
    loaded.model = model
    assert_parity_with_transformers(loaded, ours)
    streamed = streaming.stream_write(open_model(d), tmp_path / "streamed.gguf", {}, token_ids=ids, options=prune,
                                      device=torch.device("cpu"))
    assert filecmp.cmp(ours, streamed.gguf, shallow=False)
    if architecture == "qwen2":  # and the qwen2 GGUF as input reads back the pruned model
        top1, kld = agreement(torch_logits(model, ids[:200]), torch_logits(load_model(ours).model, ids[:200]))
        assert kld <= 1e-4 and top1 >= 0.99, (kld, top1)


def test_tensor_the_converter_does_not_map_is_refused_by_name(spm_tokenizer, tmp_path):
    """A Qwen3-style q_norm in a qwen2 checkpoint: loading it in memory or layer by layer names the tensor."""
    from safetensors.torch import load_file, save_file

    from edgeprune.build.loading import open_model

    d = tmp_path / "extra"
    shutil.copytree(spm_tokenizer, d)
    build_tiny_llama(d, 400, family="qwen2")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.self_attn.q_norm.weight"] = tensors["model.norm.weight"][:16].clone()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    for load in (load_model, open_model):
        with pytest.raises(EdgepruneError, match=r"model\.layers\.1\.self_attn\.q_norm\.weight"):
            load(d)


def test_gguf_of_an_unknown_architecture_is_refused_by_name(spm_tokenizer, tmp_path):
    from edgeprune.build.pruning import PruneOptions, prune_model

    d = tmp_path / "m"
    shutil.copytree(spm_tokenizer, d)
    build_tiny_llama(d, 400)
    loaded = load_model(d)
    ids = list(range(3, 400)) * 4
    model = prune_model(loaded.model, ids, PruneOptions(heads=0.5, ffn=0.4, allocation="adaptive", calib_sequences=4,
                                                         calib_seq_len=64)).model
    deci = write_gguf(ConversionInput(model, loaded.vocab, loaded.name, loaded.context_length), tmp_path / "d.gguf")
    with pytest.raises(EdgepruneError, match=r"is a 'deci' GGUF: edgeprune reads llama, qwen2, qwen3, gemma3 GGUFs"):
        load_model(deci)
