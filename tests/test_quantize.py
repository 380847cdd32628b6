"""llama.cpp's own quantizer through the bindings, with an importance matrix from our calibration pass."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import agreement, llama_cpp_logits

from converters import ConversionInput, gguf_tensor_name, write_gguf
from edgeprune.build.calibration import collect_calibration
from edgeprune.core.errors import EdgepruneError
from edgeprune.build.loading import load_model
from edgeprune.build.quantize import quantize_gguf
from edgeprune.device.llamacpp.quantizer import check_quant_type
from edgeprune.core.texts import default_calibration_text

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 8


@pytest.fixture
def tiny_f16(tiny_bpe_llama, tmp_path):
    loaded = load_model(tiny_bpe_llama)
    path = write_gguf(ConversionInput(loaded.model, loaded.vocab, "tiny", 256), tmp_path / "f16.gguf")
    return loaded, path


def tensor_types(path):
    return {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}


def test_q8_0_file_has_q8_0_tensors_and_agrees(tiny_f16, tmp_path):
    loaded, f16 = tiny_f16
    result = quantize_gguf(f16, tmp_path / "q8.gguf", "q8_0")
    assert result.quant_type == "Q8_0" and result.fallbacks == []
    assert tensor_types(result.path)["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    top1, kld = agreement(llama_cpp_logits(f16, ids), llama_cpp_logits(result.path, ids))
    assert top1 > 0.9 and kld < 0.01


def test_fallbacks_are_read_from_the_quantizer_and_match_the_file(tiny_f16, tmp_path):
    _, f16 = tiny_f16
    result = quantize_gguf(f16, tmp_path / "q4km.gguf", "Q4_K_M")
    assert result.fallbacks, "hidden size 64 is not a multiple of 256: every K-quant tensor must fall back"
    types = tensor_types(result.path)
    for fb in result.fallbacks:
        assert fb.row_length % 256 != 0
        assert types[fb.tensor].name.lower() == fb.used.lower()


def test_imatrix_is_used_and_recorded(tiny_f16, tmp_path):
    loaded, f16 = tiny_f16
    text = default_calibration_text()
    tokens = loaded.tokenizer(text.content[:20000], add_special_tokens=False)["input_ids"]
    stats = collect_calibration(loaded.model, tokens, n_seq=8, seq_len=64, text_name=text.name)
    imatrix = {gguf_tensor_name(k): v for k, v in stats.imatrix().items() if gguf_tensor_name(k)}
    assert "blk.0.attn_q.weight" in imatrix and imatrix["blk.0.ffn_down.weight"].shape == (96,)
    plain = quantize_gguf(f16, tmp_path / "plain.gguf", "Q4_0")
    weighted = quantize_gguf(f16, tmp_path / "imat.gguf", "Q4_0", imatrix=imatrix, imatrix_text=text.name)
    kv = {k: f.contents() for k, f in gguf.GGUFReader(weighted.path).fields.items()}
    assert kv["quantize.imatrix.dataset"] == text.name
    assert kv["quantize.imatrix.entries_count"] == len(imatrix)
    a = np.asarray(gguf.GGUFReader(plain.path).get_tensor(2).data)
    b = np.asarray(gguf.GGUFReader(weighted.path).get_tensor(2).data)
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_unknown_quant_type_is_one_line_error():
    with pytest.raises(EdgepruneError, match="unknown quant type 'Q4_K_X'") as info:
        check_quant_type("Q4_K_X")
    assert "\n" not in str(info.value)


def test_types_that_need_an_imatrix_are_refused_without_one(tiny_f16, tmp_path):
    _, f16 = tiny_f16
    with pytest.raises(EdgepruneError, match="needs an importance matrix"):
        quantize_gguf(f16, tmp_path / "iq2.gguf", "IQ2_XXS")
    assert not (tmp_path / "iq2.gguf").exists()


def test_failed_quantization_leaves_no_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EdgepruneError, match="could not quantize"):
        quantize_gguf(bad, tmp_path / "out.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]
