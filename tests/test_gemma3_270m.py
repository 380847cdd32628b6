"""The second real model, Google's Gemma 3 270M (llama.cpp's Q4_K_M, from PyPI): read back as transformers
computes it, written at F16 as it runs in llama.cpp, pruned into a gemma3 GGUF that llama.cpp runs as torch
does (both paths, byte for byte), and its memory priced as llama.cpp allocates it on the profile's runtime."""

from __future__ import annotations

import copy
import dataclasses
import filecmp

import pytest
import torch

from conftest import agreement, llama_cpp_logits, torch_logits

from converters import ConversionInput, write_gguf
from edgeprune.build import streaming
from edgeprune.build.loading import load_model, open_model, save_hf_directory
from edgeprune.build.pruning import PruneOptions, prune_model
from edgeprune.core.texts import default_calibration_text, default_evaluation_text
from edgeprune.device.costmodel import predict_gguf
from edgeprune.device.gguf_check import read_gguf
from edgeprune.device.llamacpp.runtime import Runtime
from edgeprune.device.validation.speed import measure_speed
from edgeprune.device.profiles import load_profile


@pytest.fixture(scope="module")
def gemma(gemma3_gguf):
    return load_model(gemma3_gguf)


def held_out_ids(loaded, n: int = 700) -> list[int]:
    """Real text past the 512-token window, BOS first as llama.cpp feeds it."""
    ids = loaded.tokenizer(default_evaluation_text().content[:20000], add_special_tokens=False)["input_ids"]
    return [loaded.tokenizer.bos_token_id] + ids[:n - 1]


def test_the_real_gemma_through_a_hugging_face_directory_runs_in_llama_cpp_as_in_transformers(gemma, gemma3_gguf,
                                                                                             tmp_path):
    assert gemma.model.config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    directory = save_hf_directory(gemma, tmp_path / "hf")
    loaded = load_model(directory)
    path = write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length), tmp_path / "f16.gguf")
    ids = held_out_ids(loaded)
    top1, kld = agreement(torch_logits(loaded.model, ids), llama_cpp_logits(path, ids, n_ctx=1024))
    assert kld <= 1e-3 and top1 >= 0.95, (kld, top1)
    info = read_gguf(path)
    assert info.architecture == "gemma3" and info.arch_value("attention.sliding_window") == 512
    text = default_evaluation_text().content[:5000]  # tokenized as llama.cpp's converter's own file tokenizes it
    assert llama_cpp_tokens(path, text) == llama_cpp_tokens(gemma3_gguf, text)


def llama_cpp_tokens(path, text: str) -> list[int]:
    from llama_cpp import Llama

    vocab = Llama(str(path), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    vocab.close()
    return tokens


def test_a_20_percent_ffn_prune_runs_as_in_torch_from_either_path(gemma, gemma3_gguf, tmp_path):
    calib = gemma.tokenizer(default_calibration_text().content[:60000], add_special_tokens=False)["input_ids"]
    options = dict(ffn=0.2, calib_sequences=8, calib_seq_len=128)
    model = prune_model(copy.deepcopy(gemma.model), calib, PruneOptions(**options)).model
    assert model.config.intermediate_size < 2048
    path = write_gguf(ConversionInput(model, gemma.vocab, gemma.name, gemma.context_length), tmp_path / "in-memory.gguf")
    ids = held_out_ids(gemma)
    top1, kld = agreement(torch_logits(model, ids), llama_cpp_logits(path, ids, n_ctx=1024))
    assert kld <= 1e-3 and top1 >= 0.95, (kld, top1)
    build = streaming.stream_write(open_model(gemma3_gguf), tmp_path / "streamed.gguf", {}, token_ids=calib,
                                   options=PruneOptions(**options), device=torch.device("cpu"))
    assert filecmp.cmp(path, build.gguf, shallow=False)


@pytest.mark.parametrize("profile_name", ["raspberry-pi-5-8gb", "raspberry-pi-4-4gb", "x86-laptop-16gb"])
def test_memory_is_priced_as_llama_cpp_allocates_it_for_the_profiles_runtime(gemma3_gguf, profile_name):
    """Full or window-sized sliding caches, and each profile's micro-batch, whose logits dominate: the validator's
    own measurement (a child process with the profile's runtime) against the cost model."""
    profile = load_profile(profile_name)
    profile = dataclasses.replace(profile, budgets=dataclasses.replace(profile.budgets, context_length=2048))
    predicted = predict_gguf(read_gguf(gemma3_gguf), profile)
    measured = measure_speed(gemma3_gguf, runtime=Runtime.of(profile), progress=lambda _msg: None)
    total = gemma3_gguf.stat().st_size + measured["kv_cache_bytes"] + measured["compute_buffer_bytes"]
    assert predicted.memory_bytes == pytest.approx(total, rel=0.01)
    assert predicted.kv_cache_bytes == pytest.approx(measured["kv_cache_bytes"], abs=0.02 * 2**20)


def test_the_planner_ranks_gemma_on_its_own_measured_rows(gemma):
    from edgeprune.build.planner import format_plan, load_quality_table, make_plan
    from edgeprune.core.shapes import shape_of

    shape = shape_of(gemma.model)
    assert load_quality_table(shape)["measured"]["model"] == "Gemma 3 270M"
    source = ConversionInput(gemma.model, gemma.vocab, gemma.name, gemma.context_length)
    profile = load_profile("raspberry-pi-5-8gb")
    text = format_plan(make_plan(source, shape, profile, quants=("Q8_0", "Q4_K_M")), gemma.name, profile)
    assert "quality estimates from" not in text and "uniform widths only" in text
