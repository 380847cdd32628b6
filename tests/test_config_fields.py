"""Every config.json field transformers reads, and the tokenizer files' settings, are mapped into the GGUF,
checked against what llama.cpp runs, or refused by name: a checkpoint llama.cpp would run differently from
transformers is never exported without a word."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest

from conftest import assert_clean_failure, build_bpe_tokenizer, build_tiny_llama, run_export

from converters import WRITERS, write_gguf
from converters.config import config_defaults
from converters.base import ConversionInput
from edgeprune.core.families import family_for_model_type
from edgeprune.build.loading import load_model, open_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny random llama and qwen2, each with a real byte-level BPE tokenizer (built once per module)."""
    made = {}
    for family in ("llama", "qwen2"):
        d = tmp_path_factory.mktemp(family)
        build_bpe_tokenizer(d)
        vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
        made[family] = build_tiny_llama(d, len(vocab) + 3, family=family)
    return made


def edited(source: Path, tmp_path: Path, file: str, edit) -> Path:
    """A copy of `source` whose JSON `file` went through `edit` (which changes the dict in place)."""
    d = tmp_path / "edited"
    shutil.copytree(source, d)
    data = json.loads((d / file).read_text(encoding="utf-8"))
    edit(data)
    (d / file).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return d


def f16_gguf(loaded, path: Path) -> Path:
    """The loaded model written by edgeprune's converter at F16."""
    return write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length), path, "F16")


def llama_cpp_tokens(gguf_path: Path, text: str) -> list[int]:
    """How llama.cpp tokenizes `text` with the GGUF's vocabulary (no BOS, special tokens as text)."""
    from llama_cpp import Llama

    vocab = Llama(str(gguf_path), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    vocab.close()
    return tokens


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_every_field_transformers_reads_is_classified(model_type):
    """A transformers release that reads a new field fails here until the family's table says what it does."""
    table = WRITERS[family_for_model_type(model_type, "test").module][0].config_fields
    assert sorted(set(config_defaults(model_type)) - set(table)) == []


def set_key(key, value):
    return lambda data: data.__setitem__(key, value)


def set_rope(scaling):
    def edit(config):
        config.pop("rope_parameters", None)
        config["rope_scaling"] = {"rope_theta": 10000.0, **scaling}
    return edit


def set_pre_tokenizer_part(**settings):
    return lambda spec: spec["pre_tokenizer"].update(settings)


CONFIG_REFUSALS = {  # case: (family, edit of config.json, what the one error line must say)
    "hidden_act_gelu": ("llama", set_key("hidden_act", "gelu_pytorch_tanh"),
                        "hidden_act = 'gelu_pytorch_tanh': supported: 'silu'"),
    "quantization_config_gptq": ("llama", set_key("quantization_config", {"quant_method": "gptq", "bits": 4}),
                                 "quantization_config = {'quant_method': 'gptq', 'bits': 4}: not supported"),
    "quantization_config_fp8": ("qwen2", set_key("quantization_config", {"quant_method": "fp8"}),
                                "quantization_config = {'quant_method': 'fp8'}: not supported"),
    "rope_linear_without_factor": ("llama", set_rope({"rope_type": "linear"}),
                                   "linear rope scaling without factor: that scaling needs factor"),
    "rope_yarn_without_factor": ("llama", set_rope({"rope_type": "yarn", "original_max_position_embeddings": 64}),
                                 "yarn rope scaling without factor"),
    "rope_llama3_without_low_freq_factor": (
        "llama", set_rope({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}), "llama3 rope scaling without low_freq_factor"),
    "qwen2_sliding_window": ("qwen2", set_key("use_sliding_window", True),
                             "use_sliding_window = true: supported: false"),
    "qwen2_sliding_layer": ("qwen2", set_key("layer_types", ["full_attention", "sliding_attention", "full_attention"]),
                            "layer_types = ['full_attention', 'sliding_attention', 'full_attention']: supported: "
                            "'full_attention'"),
}


@pytest.mark.parametrize("case", CONFIG_REFUSALS)
def test_config_field_llama_cpp_would_run_differently_is_refused(case, checkpoints, tmp_path):
    family, edit, expected = CONFIG_REFUSALS[case]
    d = edited(checkpoints[family], tmp_path, "config.json", edit)
    out = tmp_path / "out"
    line = assert_clean_failure(run_export(d, out), out, expected)
    assert "config.json" in line


@pytest.mark.parametrize("streaming", ["on", "off"])
def test_gelu_llama_is_refused_by_name_streamed_and_in_memory(streaming, checkpoints, tmp_path):
    """The issue's case: a Llama-shaped checkpoint with a GELU FFN, which llama.cpp's llama graph would run as SiLU."""
    d = edited(checkpoints["llama"], tmp_path, "config.json", set_key("hidden_act", "gelu_pytorch_tanh"))
    out = tmp_path / "out"
    assert_clean_failure(run_export(d, out, "--streaming", streaming), out,
                         "config.json sets hidden_act = 'gelu_pytorch_tanh': supported: 'silu'")


TOKENIZER_REFUSALS = {  # case: (file, edit, what the one error line must say)
    "normalizer_nfkc": ("tokenizer.json", set_key("normalizer", {"type": "NFKC"}),
                        "normalizer NFKC: supported: none, or NFC"),
    "byte_level_add_prefix_space": ("tokenizer.json", set_pre_tokenizer_part(add_prefix_space=True),
                                    "ByteLevel pre-tokenizer sets add_prefix_space = true: supported: false"),
    "no_pre_tokenizer": ("tokenizer.json", set_key("pre_tokenizer", None), "no pre_tokenizer: supported"),
    "byte_level_without_regex": ("tokenizer.json", set_pre_tokenizer_part(use_regex=False),
                                 "unsupported BPE pre-tokenizer ['ByteLevel']"),
    "decoder_of_sentencepiece": ("tokenizer.json", set_key("decoder", {"type": "Metaspace", "replacement": "\u2581"}),
                                 "decoder Metaspace for a byte-level BPE: supported: ByteLevel"),
    "tokenizer_config_add_prefix_space": ("tokenizer_config.json", set_key("add_prefix_space", True),
                                          "add_prefix_space = true: supported for a byte-level BPE tokenizer: false"),
}


@pytest.mark.parametrize("case", TOKENIZER_REFUSALS)
def test_tokenizer_setting_llama_cpp_does_not_apply_is_refused(case, checkpoints, tmp_path):
    file, edit, expected = TOKENIZER_REFUSALS[case]
    d = edited(checkpoints["llama"], tmp_path, file, edit)
    out = tmp_path / "out"
    line = assert_clean_failure(run_export(d, out), out, expected)
    assert file.split(".")[0] in line or "pre-tokenizer" in line


@pytest.mark.parametrize("model_type, family", [("qwen2", "qwen2"), ("mistral", "llama")])
def test_absent_context_length_is_the_one_transformers_runs(model_type, family, checkpoints, tmp_path):
    """config.json without max_position_embeddings: the GGUF's context length is transformers' default for the
    class (32768 for Qwen2, 131072 for Mistral), in memory and layer by layer."""
    from transformers import AutoConfig

    def edit(config):
        config.pop("max_position_embeddings")
        config["model_type"] = model_type
    d = edited(checkpoints[family], tmp_path, "config.json", edit)
    expected = AutoConfig.from_pretrained(d).max_position_embeddings
    assert expected == {"qwen2": 32768, "mistral": 131072}[model_type]
    assert open_model(d).context_length == expected
    loaded = load_model(d)
    path = f16_gguf(loaded, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.context_length"].contents() == expected


@pytest.mark.parametrize("settings", [{}, {"legacy": True}, {"legacy": False}, {"add_prefix_space": False},
                                      {"add_prefix_space": False, "legacy": True}])
def test_sentencepiece_space_settings_split_text_as_transformers(settings, tiny_spm_llama, tmp_path):
    """tokenizer_config.json's add_prefix_space is mapped to tokenizer.ggml.add_space_prefix, and legacy is
    accepted: llama.cpp splits text as transformers does under each."""
    d = edited(tiny_spm_llama, tmp_path, "tokenizer_config.json", lambda config: config.update(settings))
    loaded = load_model(d)
    path = f16_gguf(loaded, tmp_path / "m.gguf")
    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.add_space_prefix")
    assert (field.contents() if field else None) == settings.get("add_prefix_space")
    text = "Hello world, 12345 times.\nNumbers and  two spaces"
    assert llama_cpp_tokens(path, text) == loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_writer_checks_a_config_built_in_memory(checkpoints, tmp_path):
    """A model whose config was never a config.json (built or edited in Python) is checked when it is written."""
    from edgeprune.core.errors import EdgepruneError

    loaded = load_model(checkpoints["llama"])
    loaded.model.config.hidden_act = "gelu"
    with pytest.raises(EdgepruneError, match=r"hidden_act = 'gelu': supported: 'silu'"):
        write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length),
                   tmp_path / "m.gguf", "F16")
    assert not (tmp_path / "m.gguf").exists()


def digit_split_bpe_without_its_digits_step(directory: Path, join_space_and_digit: bool) -> None:
    """A byte-level BPE trained with digits split one by one, saved with a plain ByteLevel pre-tokenizer (as
    transformers rebuilds SmolLM's from a GGUF); optionally with one merge that joins a space to a digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import TRAINING_TEXT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TRAINING_TEXT], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(directory)
    spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if join_space_and_digit:
        spec["model"]["vocab"]["\u01201"] = max(spec["model"]["vocab"].values()) + 1
        spec["model"]["merges"].insert(0, ["\u0120", "1"] if isinstance(spec["model"]["merges"][0], list) else "\u0120 1")
    (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


@pytest.mark.parametrize("join_space_and_digit, pre", [(False, "smollm"), (True, "gpt-2")])
def test_plain_byte_level_pre_tokenizer_is_mapped_to_what_splits_as_transformers(join_space_and_digit, pre, tmp_path):
    """A plain ByteLevel pre-tokenizer splits by GPT-2's regex; it is written as `smollm` (llama.cpp's converter's
    name for it) only when no token joins a digit to anything, where both give the same tokens."""
    d = tmp_path / "m"
    d.mkdir()
    digit_split_bpe_without_its_digits_step(d, join_space_and_digit)
    build_tiny_llama(d, len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]) + 3,
                     bos_token_id=0, eos_token_id=0)
    loaded = load_model(d)
    assert loaded.vocab.pre == pre
    path = f16_gguf(loaded, tmp_path / "m.gguf")
    text = "in 2026, 1 and 12 and 12345 times x1 a1b 2 1"
    assert llama_cpp_tokens(path, text) == loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_nfc_normalizer_is_accepted_for_text_in_nfc_form(tiny_bpe_llama, tmp_path):
    """NFC (as Qwen2's tokenizer.json carries it) is the one byte-level normalizer accepted: llama.cpp applies
    none, and text already in NFC form, as typed, splits the same."""
    import unicodedata

    d = edited(tiny_bpe_llama, tmp_path, "tokenizer.json", set_key("normalizer", {"type": "NFC"}))
    loaded = load_model(d)
    path = f16_gguf(loaded, tmp_path / "m.gguf")
    text = "unicode café naïve 東京, Grüße aus Köln"
    assert unicodedata.normalize("NFC", text) == text
    assert llama_cpp_tokens(path, text) == loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
