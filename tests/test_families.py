"""Qwen3 and Gemma 3 beside Llama: pruned in the widths and without the biases their llama.cpp graphs hold, the
sliding-window pattern carried through layer removal, the layer-streamed path byte for byte the in-memory one,
memory priced as llama.cpp allocates it (full or window-sized sliding caches, the micro-batch's logits), and
every near relative refused by name."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import agreement, build_spm_tokenizer, build_tiny_llama, llama_cpp_logits, torch_logits
from test_layouts import TEXT
from test_streaming import _ids, _streamed

from converters import ConversionInput, write_gguf
from edgeprune.build.handoff import ServeSettings, chat_family, modelfile
from edgeprune.build.loading import load_model
from edgeprune.build.pruning import PruneOptions, prune_model
from edgeprune.core.errors import EdgepruneError
from edgeprune.core.shapes import shape_from_gguf
from edgeprune.device.costmodel import predict_gguf
from edgeprune.device.gguf_check import read_gguf
from edgeprune.device.llamacpp import log as llama_log
from edgeprune.device.llamacpp.runtime import Model
from edgeprune.device.profiles import load_profile


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Qwen3 and Gemma 3 (7 layers, window 32) with a real SentencePiece tokenizer."""
    spm = tmp_path_factory.mktemp("spm")
    build_spm_tokenizer(spm)
    made = {}
    for family in ("qwen3", "gemma3"):
        d = tmp_path_factory.mktemp(family) / family
        shutil.copytree(spm, d)
        made[family] = build_tiny_llama(d, 400, tied=False, family=family)
    return made


def text_ids(loaded) -> list[int]:
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:200]
    assert len(ids) > 100  # past the 32-token window: a wrong pattern or window shows
    return ids


CASES = {  # family, pruning
    "qwen3-heads-ffn": ("qwen3", dict(heads=0.3, ffn=0.3, head_mode="per-group")),
    "gemma3-heads-ffn": ("gemma3", dict(heads=0.3, ffn=0.3, head_mode="per-group")),
    "gemma3-layers-ffn": ("gemma3", dict(layers=2, ffn=0.2)),
}


@pytest.mark.parametrize("case", CASES)
def test_a_pruned_model_runs_in_its_own_architecture_as_in_torch(checkpoints, tmp_path, case):
    family, options = CASES[case]
    loaded = load_model(checkpoints[family])
    ids = _ids(high=390)
    model = prune_model(loaded.model, ids, PruneOptions(calib_sequences=8, calib_seq_len=64, **options)).model
    path = write_gguf(ConversionInput(model, loaded.vocab, loaded.name, loaded.context_length), tmp_path / "in-memory.gguf")
    info = read_gguf(path)
    assert info.architecture == family
    assert not [t.name for t in info.reader.tensors if t.name.endswith(".bias")]  # the graph has no bias to hold them
    assert {t.name for t in info.reader.tensors} >= {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"}
    top1, kld = agreement(torch_logits(model, text_ids(loaded)), llama_cpp_logits(path, text_ids(loaded)))
    assert kld <= 1e-3 and top1 >= 0.95, (kld, top1)
    if family == "gemma3":  # the GGUF's sliding pattern is the pruned model's
        shape = shape_from_gguf(info)
        assert [l.sliding for l in shape.layers] == [t == "sliding_attention" for t in model.config.layer_types]
        assert shape.sliding_window == 32 and len(shape.layers) == 7 - options.get("layers", 0)
    build = _streamed(checkpoints[family], ids, options, tmp_path / "streamed.gguf")
    assert filecmp.cmp(path, build.gguf, shallow=False)


def test_the_weight_only_refit_recovers_a_llama_without_a_bias(tiny_spm_llama):
    """The refit Qwen3 and Gemma 3 get (no free bias) against the biased one and none, on a Llama, where all three
    can run: KL divergence from the unpruned model on held-out text after removing 40% of the FFN."""
    ids = _ids(high=390)
    loaded = load_model(tiny_spm_llama)
    held_out = text_ids(loaded)
    original = torch_logits(loaded.model, held_out)
    klds = {}
    for name, recovery in (("none", "none"), ("weights only", "reconstruct"), ("weights and bias", "reconstruct")):
        model = load_model(tiny_spm_llama).model
        if name == "weights only":  # a family whose graph has no output biases (the same Llama layers)
            model.config.model_type = "qwen3"
        options = PruneOptions(ffn=0.4, recovery=recovery, calib_sequences=8, calib_seq_len=64)
        pruned = prune_model(model, ids, options).model
        assert (pruned.model.layers[0].mlp.down_proj.bias is None) == (name != "weights and bias")
        klds[name] = agreement(original, torch_logits(pruned, held_out))[1]
    assert max(klds["weights and bias"], klds["weights only"]) < klds["none"], klds


def test_what_the_graph_cannot_hold_is_refused_before_pruning(checkpoints):
    loaded = load_model(checkpoints["gemma3"])
    with pytest.raises(EdgepruneError, match="llama.cpp's gemma3 loader creates every layer at layer 0's"):
        prune_model(loaded.model, _ids(), PruneOptions(ffn=0.3, allocation="adaptive"))
    with pytest.raises(EdgepruneError, match="recovery 'bias' adds o_proj/down_proj biases, which llama.cpp's gemma3"):
        prune_model(loaded.model, _ids(), PruneOptions(ffn=0.3, recovery="bias"))


REFUSED = {  # config.json edits and the message each must give
    "multimodal": (dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]),
                   "is a Gemma 3 multimodal checkpoint .* exports text models only"),
    "gemma2": (dict(model_type="gemma2"), r"holds a Gemma 2 model \('gemma2'\), which edgeprune does not support: "
                                         "edgeprune supports model_type 'llama', 'mistral', 'qwen2', 'qwen3', 'gemma3_text'"),
    "gemma3n": (dict(model_type="gemma3n_text"), r"a Gemma 3n model"),
    "gemma4": (dict(model_type="gemma4"), r"a Gemma 4 model"),
    "qwen3.5": (dict(model_type="qwen3_5_text"), r"a Qwen3\.5 model"),
    "smollm3": (dict(model_type="smollm3"), r"a SmolLM3 model"),
    "attention_softcap": (dict(attn_logit_softcapping=50.0), r"sets attn_logit_softcapping = 50\.0: not supported"),
    "query_scale": (dict(query_pre_attn_scalar=256), r"query_pre_attn_scalar = 256, not head_dim 16"),
    "gelu": (dict(hidden_activation="gelu"), r"sets hidden_activation = 'gelu': supported: 'gelu_pytorch_tanh'"),
    "bidirectional": (dict(use_bidirectional_attention=True), r"use_bidirectional_attention = True"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_relative_or_setting_llama_cpp_runs_otherwise_is_refused_by_name(checkpoints, tmp_path, case):
    edit, message = REFUSED[case]
    d = Path(shutil.copytree(checkpoints["gemma3"], tmp_path / case))
    config = json.loads((d / "config.json").read_text())
    config.update(edit)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgepruneError, match=message):
        load_model(d)


def test_qwen3_attention_bias_is_refused(checkpoints, tmp_path):
    d = Path(shutil.copytree(checkpoints["qwen3"], tmp_path / "biased"))
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(EdgepruneError, match="attention_bias = True: supported: False"):
        load_model(d)


@pytest.mark.parametrize("swa_cache,batch_size,context", [("full", 512, 300), ("window", 64, 300),
                                                            ("window", 32, 1024), (None, None, 2048)])
def test_memory_is_priced_as_llama_cpp_allocates_it(checkpoints, tmp_path, swa_cache, batch_size, context):
    """Sliding layers' caches full or window-sized, the compute buffer holding a micro-batch's logits."""
    loaded = load_model(checkpoints["gemma3"])
    path = write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length), tmp_path / "g.gguf")
    base = load_profile("raspberry-pi-5-8gb")
    profile = dataclasses.replace(
        base, runtime=dataclasses.replace(base.runtime, swa_cache=swa_cache, batch_size=batch_size),
        budgets=dataclasses.replace(base.budgets, context_length=context))
    predicted = predict_gguf(read_gguf(path), profile)
    rt = profile.runtime
    model = Model(str(path), n_ctx=context, n_batch=512, threads=2, ubatch=rt.micro_batch, swa_full=rt.swa_full)
    measured = llama_log.buffer_bytes(llama_log.process_log().text(model.log_start, model.log_end))
    assert predicted.kv_cache_bytes == pytest.approx(measured["kv_cache_bytes"], abs=0.01 * 2**20)  # logged in MiB
    # a tiny model's buffer is its attention scores and masks, priced within 15% (at 32-token batches the graph's
    # smaller rows count); the real Gemma's is its logits, priced exactly (test_gemma3_270m)
    assert predicted.compute_buffer_bytes == pytest.approx(measured["compute_buffer_bytes"], rel=0.15)
    full_cache = predict_gguf(read_gguf(path), dataclasses.replace(profile, runtime=dataclasses.replace(
        rt, swa_cache="full"))).kv_cache_bytes
    assert (predicted.kv_cache_bytes < full_cache) == (swa_cache == "window" and context > 32 + rt.micro_batch)


def test_the_hand_off_speaks_gemma_and_runs_the_profiles_cache():
    template = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    assert chat_family(template).name == "gemma"
    settings = ServeSettings.of("g.gguf", load_profile("raspberry-pi-5-8gb"), sliding=True)
    assert "--swa-full" in settings.llama_server() and ["-ub", "128"] == settings.llama_server()[7:9]
    window = ServeSettings.of("g.gguf", load_profile("raspberry-pi-4-4gb"), sliding=True)
    assert "--swa-full" not in window.llama_server()  # llama-server's default is the window
    text = modelfile(settings, template)
    assert 'PARAMETER stop "<end_of_turn>"' in text and "<start_of_turn>model" in text
    assert "--swa-full" not in ServeSettings.of("s.gguf", load_profile("raspberry-pi-5-8gb")).llama_server()


def test_the_plan_says_what_the_family_rules_out_and_whose_estimates_it_uses(checkpoints):
    from edgeprune.build.planner import format_plan, make_plan
    from edgeprune.core.shapes import shape_of

    loaded = load_model(checkpoints["gemma3"])
    source = ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length)
    profile = load_profile("x86-laptop-16gb")
    plan = make_plan(source, shape_of(loaded.model), profile, quants=("Q8_0",))
    assert {e.candidate.allocation for e in plan.rejected + [plan.chosen]} <= {"none", "uniform"}
    text = format_plan(plan, loaded.name, profile)
    assert "uniform widths only: llama.cpp's gemma3 loader creates every layer at layer 0's widths" in text
    assert "quality estimates from SmolLM2-135M-Instruct's measured rows" in text
