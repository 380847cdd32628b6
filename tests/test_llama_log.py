"""llama.cpp's log is read in one place (edgeprune.device.llamacpp.log) and each read is checked: a log that lacks a tensor's
type, a fallback or a buffer is refused in one line naming the llama-cpp-python version, never guessed around."""

from __future__ import annotations

import ctypes
import dataclasses

import gguf
import llama_cpp
import pytest

from converters import ConversionInput, write_gguf
from edgeprune.device.llamacpp import log as llama_log
from edgeprune.build.sizing import _IMATRIX_KEYS_BYTES, estimate_size
from edgeprune.device.costmodel import kv_cache_bytes
from edgeprune.device.llamacpp.quantizer import dry_run_types
from edgeprune.core.errors import EdgepruneError
from edgeprune.build.loading import load_model
from edgeprune.build.quantize import checked_fallbacks, quantize_gguf
from edgeprune.device.llamacpp.quantizer import QUANT_TYPES
from edgeprune.core.shapes import shape_of


@pytest.fixture
def tiny(tiny_bpe_llama, tmp_path):
    loaded = load_model(tiny_bpe_llama)
    source = ConversionInput(loaded.model, loaded.vocab, "tiny", 256)
    return source, shape_of(loaded.model), write_gguf(source, tmp_path / "f16.gguf")


def held_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}


def dry_run_log(path, quant: str) -> str:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant]
    params.dry_run = True
    with llama_log.captured() as log:
        assert llama_cpp.llama_model_quantize(str(path).encode(), b"/dev/null", ctypes.byref(params)) == 0
    return log.text()


def without_line(text: str, *needles: str) -> str:
    """The log with the first line holding all `needles` taken out; the test fails if there is none."""
    lines = text.splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if all(n in line for n in needles))
    return "".join(lines[:index] + lines[index + 1:])


def assert_one_line_naming_the_version(info, *words: str) -> None:
    message = str(info.value)
    assert "\n" not in message
    assert f"llama-cpp-python {llama_cpp.__version__}" in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q8_0", "Q6_K"])
def test_every_tensor_gets_the_type_the_quantized_file_holds(tiny, tmp_path, quant):
    source, shape, f16 = tiny
    quantized = quantize_gguf(f16, tmp_path / f"{quant}.gguf", quant)
    held = held_types(quantized.path)
    assert dry_run_types(f16, quant) == held  # every tensor of the file, each with its real type
    assert {t.name: t.type_name for t in estimate_size(source, shape, quant).tensors} == held
    fallen = {fb.tensor: fb.used for fb in quantized.fallbacks}
    assert fallen == {name: held[name] for name in fallen}
    if quant != "Q8_0":  # hidden size 64: every K-quant matrix falls back, and the closing count says how many
        assert len(fallen) == 21


def test_a_log_without_a_tensor_line_is_refused(tiny):
    _, _, f16 = tiny
    names = [t.name for t in gguf.GGUFReader(f16).tensors]
    text = dry_run_log(f16, "Q4_K_M")
    assert llama_log.tensor_types(text, names, "f16.gguf")["blk.1.ffn_down.weight"] == "q5_0"
    with pytest.raises(EdgepruneError) as info:
        llama_log.tensor_types(without_line(text, "] blk.1.ffn_down.weight"), names, "f16.gguf")
    assert_one_line_naming_the_version(info, "1 of the 29 tensors", "blk.1.ffn_down.weight")


def test_a_reworded_tensor_line_is_refused_not_priced_as_f16(tiny):
    _, _, f16 = tiny
    names = [t.name for t in gguf.GGUFReader(f16).tensors]
    text = dry_run_log(f16, "Q8_0").replace("type =", "type:")
    with pytest.raises(EdgepruneError) as info:
        llama_log.tensor_types(text, names, "f16.gguf")
    assert_one_line_naming_the_version(info, "29 of the 29 tensors")


def test_a_fallback_missing_from_the_log_is_refused(tiny):
    _, _, f16 = tiny
    text = dry_run_log(f16, "Q4_K_M")
    assert len(llama_log.fallbacks(text)) == 21
    with pytest.raises(EdgepruneError) as info:
        llama_log.fallbacks(without_line(text, "warning: blk.0.ffn_up.weight"))
    assert_one_line_naming_the_version(info, "says 21 tensors fell back", "names 20")
    with pytest.raises(EdgepruneError) as info:
        llama_log.fallbacks(without_line(text, "required fallback quantization"))
    assert_one_line_naming_the_version(info, "no count of fallback tensors")


def test_fallbacks_the_file_contradicts_are_refused(tiny, tmp_path):
    """Each logged fallback is checked against the type the written file holds (gguf-py's reader)."""
    _, _, f16 = tiny
    q8 = quantize_gguf(f16, tmp_path / "q8.gguf", "Q8_0").path
    with pytest.raises(EdgepruneError) as info:
        checked_fallbacks(dry_run_log(f16, "Q4_K_M"), q8)  # the log of another quantization than the file's
    assert_one_line_naming_the_version(info, "fell back to q5_0, but the file holds it as q8_0")


def test_an_unknown_type_name_is_refused(tiny):
    _, _, f16 = tiny
    names = [t.name for t in gguf.GGUFReader(f16).tensors]
    text = dry_run_log(f16, "Q8_0").replace("(q8_0)", "(q8_9)", 1)
    with pytest.raises(EdgepruneError) as info:
        llama_log.tensor_types(text, names, "f16.gguf")
    assert_one_line_naming_the_version(info, "'q8_9', which gguf-py does not know")


def test_buffers_are_read_and_a_missing_one_is_refused(tiny):
    _, shape, f16 = tiny
    with llama_log.captured() as log:
        llm = llama_cpp.Llama(str(f16), n_ctx=512, n_threads=1, verbose=False)
    llm.close()
    text = log.text()
    sizes = llama_log.buffer_bytes(text)
    assert sizes["kv_cache_bytes"] == pytest.approx(kv_cache_bytes(shape, 512), abs=0.005 * 2**20)
    assert sizes["compute_buffer_bytes"] > 0
    for needles, words in [(("KV buffer size",), "names no KV cache buffer"),
                           (("llama_kv_cache: size =",), "does not say the KV cache's size"),
                           (("compute buffer size",), "names no compute buffer")]:
        with pytest.raises(EdgepruneError) as info:
            llama_log.buffer_bytes(without_line(text, *needles))
        assert_one_line_naming_the_version(info, words)
    kv_line = next(line for line in text.splitlines() if "KV buffer size" in line)
    with pytest.raises(EdgepruneError) as info:  # a second KV buffer the summary does not account for
        llama_log.buffer_bytes(text + kv_line + "\n")
    assert_one_line_naming_the_version(info, "for a KV cache of")


def test_metadata_bytes_follow_the_vocabulary_content_not_the_object(tiny):
    """The cost model's vocabulary cache is keyed by content: the same Vocab object, edited, is measured anew
    (a cache keyed by id() would return the old size)."""
    source, shape, f16 = tiny
    first_data = min(t.data_offset for t in gguf.GGUFReader(f16).tensors)
    before = estimate_size(source, shape, "F16").metadata_bytes - _IMATRIX_KEYS_BYTES
    assert abs(before - first_data) < 32
    source.vocab.chat_template = (source.vocab.chat_template or "") + "x" * 4096
    after = estimate_size(source, shape, "F16").metadata_bytes - _IMATRIX_KEYS_BYTES
    assert abs(after - before - 4096) < 32
    twin = dataclasses.replace(source, vocab=dataclasses.replace(source.vocab))  # a new object, the same content
    assert estimate_size(twin, shape, "F16").metadata_bytes - _IMATRIX_KEYS_BYTES == after
