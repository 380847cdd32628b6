"""The layer-streamed path: lazy weights, two-pass pruning, tensor-by-tensor writing, and the choice between it
and the in-memory path. What a user checks: the streamed GGUF is the in-memory GGUF, byte for byte; a run that
cannot fit is refused before it starts, in one line; nothing is left behind."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from converters import ConversionInput, write_gguf
from edgeprune.build import resources, streaming
from edgeprune.build.calibration import collect_calibration
from edgeprune.core.errors import EdgepruneError
from edgeprune.build.loading import load_model, open_model
from edgeprune.build.pipeline.export import export_model
from edgeprune.build.pipeline.options import CALIB_SEQUENCES, STREAMED_CALIB_SEQUENCES, ExportOptions
from edgeprune.build.pruning import PruneOptions, prune_model
from edgeprune.build.weights import SafetensorsWeights

from conftest import run_cli

CASES = {
    "plain": None,
    "ffn-reconstruct": dict(ffn=0.3),
    "heads-ffn-adaptive": dict(heads=0.3, ffn=0.4, allocation="adaptive", head_mode="per-group"),
    "layers-heads-bias": dict(heads=0.5, layers=1, recovery="bias", head_mode="per-group"),
    "random-none": dict(ffn=0.4, method="random", recovery="none"),
    "wanda-kv-groups": dict(heads=0.5, method="wanda-sp", head_mode="kv-groups"),
}


def _ids(n: int = 6000, high: int = 200) -> list[int]:
    return np.random.default_rng(0).integers(3, high, n).tolist()


def _in_memory(directory: Path, ids: list[int], options: dict | None, path: Path):
    loaded = load_model(directory)
    model = loaded.model
    if options:
        model = prune_model(model, ids, PruneOptions(calib_sequences=8, calib_seq_len=64, **options)).model
    write_gguf(ConversionInput(model, loaded.vocab, loaded.name, loaded.context_length), path)
    return collect_calibration(model, ids, n_seq=16, seq_len=64).gguf_imatrix()


def _streamed(directory: Path, ids: list[int], options: dict | None, path: Path, progress=None):
    prune = PruneOptions(calib_sequences=8, calib_seq_len=64, **options) if options else None
    return streaming.stream_write(open_model(directory), path, {}, token_ids=ids, options=prune,
                                  imatrix=(16, 64, "test"), device=torch.device("cpu"), progress=progress)


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_gguf_and_imatrix_equal_the_in_memory_ones(tiny_bpe_llama, tmp_path, case):
    ids = _ids()
    expected_imatrix = _in_memory(tiny_bpe_llama, ids, CASES[case], tmp_path / "in-memory.gguf")
    messages: list[str] = []
    build = _streamed(tiny_bpe_llama, ids, CASES[case], tmp_path / "streamed.gguf", messages.append)
    assert filecmp.cmp(tmp_path / "in-memory.gguf", build.gguf, shallow=False)
    got = build.stats.gguf_imatrix()
    assert got.keys() == expected_imatrix.keys()
    assert all(np.array_equal(got[k], expected_imatrix[k]) for k in got)
    assert any("layer 3/3" in m for m in messages)  # progress layer by layer
    assert not list(tmp_path.glob(".edgeprune-hidden-*"))
    if CASES[case]:  # a uniform refit without layer removal is scored layer by layer in the cutting pass
        options = {"allocation": "uniform", "recovery": "reconstruct", "layers": 0, **CASES[case]}
        one_pass = options["allocation"] == "uniform" and options["recovery"] == "reconstruct" and not options["layers"]
        scored = [i for i, m in enumerate(messages) if m.startswith("scoring:")]
        cut = [i for i, m in enumerate(messages) if m.startswith("pruning and writing:")]
        assert (max(scored) > min(cut)) is one_pass


def test_sharded_checkpoint_and_spilled_hidden_states(tiny_bpe_llama, tmp_path, monkeypatch):
    """Shards are read as one model; hidden states that go to files give the same bytes and leave no file."""
    from transformers import LlamaForCausalLM

    sharded = tmp_path / "sharded"
    model = LlamaForCausalLM.from_pretrained(tiny_bpe_llama)
    model.save_pretrained(sharded, max_shard_size="60KB")
    for f in tiny_bpe_llama.glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    assert len(list(sharded.glob("*.safetensors"))) > 2
    ids = _ids()
    _in_memory(sharded, ids, CASES["ffn-reconstruct"], tmp_path / "a.gguf")
    monkeypatch.setattr(streaming, "SPILL_BYTES", 1)
    build = _streamed(sharded, ids, CASES["ffn-reconstruct"], tmp_path / "out" / "b.gguf")
    assert filecmp.cmp(tmp_path / "a.gguf", build.gguf, shallow=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.gguf"]


def test_lazy_gguf_weights_equal_transformers_loading(tiny_bpe_llama, tmp_path):
    loaded = load_model(tiny_bpe_llama)
    gguf_path = write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length),
                           tmp_path / "tiny.gguf")
    expected = load_model(gguf_path).model.state_dict()
    lazy = open_model(gguf_path)
    assert lazy.weights.names() == set(expected) - {"lm_head.weight"}
    for name in lazy.weights.names():
        assert torch.equal(lazy.weights.load(name), expected[name]), name
    rows = np.array([5, 1, 7, 5])
    assert torch.equal(lazy.weights.rows("model.embed_tokens.weight", rows),
                       expected["model.embed_tokens.weight"][torch.as_tensor(rows)])


def test_missing_tensor_is_refused_by_name(tiny_bpe_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_bpe_llama.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(EdgepruneError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*incomplete"):
        open_model(broken)


def test_unsupported_dtype_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 2, dtype=torch.int8)}, tmp_path / "model.safetensors")
    with pytest.raises(EdgepruneError, match="stores w as I8"):
        SafetensorsWeights([tmp_path / "model.safetensors"])


def test_automatic_choice_follows_available_memory(tiny_bpe_llama, tmp_path, monkeypatch):
    size = resources.model_size(tiny_bpe_llama)
    need = resources.in_memory_peak(size)
    plan = dict(calibration_tokens=64 * 256, pruning=True, reference=True, quantized=True)
    monkeypatch.setattr(resources, "available_memory", lambda: 4 * need)
    assert not resources.plan_resources(tiny_bpe_llama, tmp_path, "auto", **plan).streamed
    monkeypatch.setattr(resources, "available_memory", lambda: int(1.5 * need))
    chosen = resources.plan_resources(tiny_bpe_llama, tmp_path, "auto", **plan)
    assert chosen.streamed and "layer-streamed path" in chosen.describe()
    assert not resources.plan_resources(tiny_bpe_llama, tmp_path, "off", **plan).streamed


def test_a_run_the_machine_cannot_hold_is_refused_before_it_starts(tiny_bpe_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 1 << 20)
    out = tmp_path / "out"
    with pytest.raises(EdgepruneError, match=r"needs about .*B of RAM .* 1\.0 MiB available: use fewer") as err:
        export_model(tiny_bpe_llama, None, out, ExportOptions(prune=PruneOptions(ffn=0.3), streaming="on"))
    assert "\n" not in str(err.value)
    assert not out.exists() or not any(out.iterdir())
    monkeypatch.setattr(resources, "available_memory", lambda: 64 << 30)
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(EdgepruneError, match=r"not enough disk: .* 0\.0 MiB free: free some space or choose another --out"):
        export_model(tiny_bpe_llama, None, out, ExportOptions(prune=PruneOptions(ffn=0.3), streaming="on"))


def test_the_streamed_path_calibrates_on_its_own_default_count_unless_told(tiny_bpe_llama, tmp_path):
    """Layer-streamed, one count (STREAMED_CALIB_SEQUENCES) serves the pruning and the importance matrix;
    --calib-sequences still sets both; in memory the defaults stay 32 and 64."""
    runs = {"streamed": ("--streaming", "on"), "told": ("--streaming", "on", "--calib-sequences", "3"),
            "in-memory": ("--streaming", "off")}
    expected = {"streamed": (STREAMED_CALIB_SEQUENCES,) * 2, "told": (3, 3), "in-memory": (32, CALIB_SEQUENCES)}
    for name, flags in runs.items():
        out = tmp_path / name
        result = run_cli("prune", str(tiny_bpe_llama), "--out", str(out), "--ffn", "0.3", "--quant", "Q8_0", *flags)
        assert result.returncode == 0, result.stderr[-2000:]
        export = json.loads((out / "report.json").read_text())["export"]
        pruned = export["pruning"]["details"]["calibration_tokens"] // 256
        assert (pruned, export["imatrix"]["sequences"]) == expected[name], name


def test_cli_refuses_what_cannot_stream(tiny_bpe_llama, tmp_path):
    result = run_cli("prune", str(tiny_bpe_llama), "--out", str(tmp_path / "out"), "--ffn", "0.3",
                     "--method", "taylor", "--streaming", "on")
    assert result.returncode == 2
    assert "taylor needs gradients through the whole model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cuda_is_refused_clearly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EdgepruneError, match="torch sees no CUDA GPU here; use --device cpu"):
        streaming.compute_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_and_cpu_give_the_same_model_to_float_tolerance(tiny_bpe_llama, tmp_path):
    import gguf

    ids = _ids()
    prune = CASES["ffn-reconstruct"]
    outputs = {}
    for device in ("cpu", "cuda"):
        build = streaming.stream_write(open_model(tiny_bpe_llama), tmp_path / f"{device}.gguf", {}, token_ids=ids,
                                       options=PruneOptions(calib_sequences=8, calib_seq_len=64, **prune),
                                       device=torch.device(device))
        outputs[device] = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(build.gguf).tensors}
    for name, cpu in outputs["cpu"].items():
        np.testing.assert_allclose(outputs["cuda"][name], cpu, rtol=1e-2, atol=1e-3, err_msg=name)


def test_smollm2_streamed_prune_is_the_in_memory_prune(smollm2_gguf, tmp_path):
    """The real model: the same Q4_K_M file, byte for byte, from either path, given the same calibration count
    (the paths' defaults differ: 32 and 64 sequences in memory, 8 streamed)."""
    files = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        result = run_cli("prune", str(smollm2_gguf), "--out", str(out), "--ffn", "0.2", "--quant", "Q4_K_M",
                         "--streaming", mode, "--calib-sequences", "16", timeout=1500)
        assert result.returncode == 0, result.stderr[-2000:]
        export = json.loads((out / "report.json").read_text())["export"]
        assert export["resources"]["streamed"] is (mode == "on")
        files[mode] = out / export["gguf"]
    assert filecmp.cmp(files["off"], files["on"], shallow=False)


def test_writer_refuses_tensors_that_disagree_with_its_header(tiny_bpe_llama, tmp_path):
    """The header is written before the data: a stream that does not match it fails by name, leaving no file."""
    from converters import writer_class
    from edgeprune.core.shapes import shape_of

    loaded = load_model(tiny_bpe_llama)
    source = ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length)
    shape = shape_of(loaded.model)
    writer = writer_class(loaded.model.config, shape)(source, shape)
    swapped = list(writer.tensors())
    swapped[3], swapped[4] = swapped[4], swapped[3]
    with pytest.raises(EdgepruneError, match=r"arrived where the header declares"):
        writer.write(tmp_path / "x.gguf", tensors=swapped)
    with pytest.raises(EdgepruneError, match=r"do not match the header"):
        writer.write(tmp_path / "x.gguf", tensors=list(writer.tensors())[:-1])
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".*"))
