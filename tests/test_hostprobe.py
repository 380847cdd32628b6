"""Host calibration: per-type efficiencies fitted from measured runs must reproduce them and price other shapes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgeprune.device.costmodel import (SizeEstimate, TensorCost, calibrated_device, decode_seconds_per_token, layer_count,
                                 prefill_seconds_per_token)
from edgeprune.build import hostprobe
from edgeprune.build.hostprobe import (TYPE_FAMILIES, _fit_type_efficiency, _nonnegative_least_squares, fit_host_profile,
                                  measure_host_profile, measured_runs)
from edgeprune.device.profile_writing import profile_to_toml
from edgeprune.device.profiles import DeviceSpec, load_profile
from edgeprune.core.shapes import LayerShape, ModelShape
from edgeprune.device.validation.speed import N_PROMPT

SHAPE = ModelShape(vocab_size=1000, hidden_size=64, head_dim=16, layers=(LayerShape(4, 2, 128),) * 2,
                   tied_embeddings=True)
BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 34 / 32, "q5_0": 22 / 32, "q4_0": 18 / 32}


def sized(mix: dict[str, str], n_layers: int = 2) -> SizeEstimate:
    """A model of `n_layers` layers whose tensors (by kind) have the types in `mix`; the rest are f16."""
    tensors = [TensorCost("token_embd.weight", 64, 1000, mix.get("embd", "f16"), 0)]
    for i in range(n_layers):
        for kind, rows, width in (("attn_q", 64, 64), ("ffn_up", 128, 64), ("ffn_down", 64, 128)):
            tensors.append(TensorCost(f"blk.{i}.{kind}.weight", width, rows, mix.get(kind, "f16"), 0))
    tensors = [dataclasses.replace(t, nbytes=int(t.rows * t.row_length * BYTES_PER_WEIGHT[t.type_name]))
               for t in tensors]
    return SizeEstimate("test", tuple(tensors), 4096, "llama")


def speeds_of(size: SizeEstimate, shape: ModelShape, device: DeviceSpec) -> dict[str, float]:
    """The speeds a device with these efficiencies runs at, worked out here from FACTS.md's rule and not by the cost
    model (which the fit uses): decode reads every tensor (a tied embedding as the output matrix) at the bandwidth
    times its type's efficiency, plus a fixed cost per layer; prefill does 2 FLOPs per layer weight per token, the
    head once per prompt, and attention over n_prompt/2 keys on average at f16's efficiency."""
    decode_eff, prefill_eff = device.decode_type_efficiency, device.prefill_type_efficiency
    layers = {t.name.split(".")[1] for t in size.tensors if t.name.startswith("blk.")}
    tied = "output.weight" not in {t.name for t in size.tensors}
    read = [t for t in size.tensors if t.name != "token_embd.weight" or tied]  # an untied embedding: one row
    decode_s = sum(t.nbytes / (device.memory_bandwidth_gbs * 1e9 * decode_eff[t.type_name]) for t in read)
    decode_s += len(layers) * device.decode_layer_overhead_us * 1e-6
    flops = device.compute_gflops * 1e9
    matrices = [(t, 1) for t in size.tensors if t.name.startswith("blk.") and t.rows > 1]
    matrices += [(t, N_PROMPT) for t in read if t.name in ("output.weight", "token_embd.weight")]
    prefill_s = sum(2 * t.rows * t.row_length / (flops * prefill_eff[t.type_name]) / per for t, per in matrices)
    prefill_s += sum(4 * l.n_head * shape.head_dim * N_PROMPT / 2 for l in shape.layers) / (flops * prefill_eff["f16"])
    return {"decode_tps": 1 / decode_s, "prefill_tps": 1 / prefill_s}


def test_nonnegative_least_squares_matches_the_exact_solution_and_clips_at_zero():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 1, (8, 4))
    truth = np.array([0.5, 2.0, 0.0, 1.0])
    assert np.allclose(_nonnegative_least_squares(a, a @ truth), truth, atol=1e-9)
    wants_negative = a @ np.array([1.0, -1.0, 1.0, 1.0])
    assert (_nonnegative_least_squares(a, wants_negative) >= 0).all()


def test_fitted_type_efficiencies_reproduce_the_runs_and_predict_a_new_mix():
    true = DeviceSpec("host", 10.0, 100.0, 2, 0.7, 0.4,
                      decode_type_efficiency={"f16": 1.1, "q8_0": 0.9, "q5_0": 0.45, "q4_0": 0.6},
                      prefill_type_efficiency={"f16": 0.45, "q8_0": 0.4, "q5_0": 0.25, "q4_0": 0.55},
                      decode_layer_overhead_us=3.0)
    q8 = dict.fromkeys(("embd", "attn_q", "ffn_up", "ffn_down"), "q8_0")
    ladder = [sized({}), sized(q8), sized(q8, n_layers=1), sized({}, n_layers=1),
              sized({"embd": "q8_0", "attn_q": "q5_0", "ffn_up": "q5_0", "ffn_down": "q4_0"}),
              sized({"embd": "q8_0", "attn_q": "q4_0", "ffn_up": "q4_0", "ffn_down": "q4_0"}),
              sized({"embd": "q8_0", "attn_q": "q5_0", "ffn_up": "q5_0", "ffn_down": "q5_0"})]
    runs = [(size, SHAPE, speeds_of(size, SHAPE, true)) for size in ladder]
    probe = DeviceSpec("host", 10.0, 100.0, 2, 1.0, 1.0)
    decode, overhead = _fit_type_efficiency(runs, "decode", probe)
    prefill, _ = _fit_type_efficiency(runs, "prefill", probe)
    assert overhead == pytest.approx(3.0, rel=1e-2)
    for fitted_table, true_table in ((decode, true.decode_type_efficiency), (prefill, true.prefill_type_efficiency)):
        assert {t: fitted_table[t] for t in true_table} == pytest.approx(true_table, rel=1e-3)
        assert fitted_table["q4_1"] == fitted_table["q4_0"] and "q4_k" not in fitted_table  # by kernel family
    fitted = dataclasses.replace(probe, decode_type_efficiency=decode, prefill_type_efficiency=prefill,
                                 decode_layer_overhead_us=overhead)
    unseen = sized({"embd": "q4_0", "attn_q": "q8_0", "ffn_up": "q4_0", "ffn_down": "q5_0"}, n_layers=3)
    expected = speeds_of(unseen, SHAPE, true)
    assert 1 / decode_seconds_per_token(unseen, fitted) == pytest.approx(expected["decode_tps"], rel=1e-3)
    assert 1 / prefill_seconds_per_token(unseen, SHAPE, N_PROMPT, fitted) == pytest.approx(expected["prefill_tps"],
                                                                                          rel=1e-3)


def test_layer_overhead_is_a_fixed_cost_per_decoder_layer():
    device = DeviceSpec("host", 10.0, 100.0, 2, 0.7, 0.4)
    with_overhead = dataclasses.replace(device, decode_layer_overhead_us=150.0)
    for n_layers in (1, 2, 3):
        size = sized({}, n_layers)
        assert layer_count(size) == n_layers
        extra = decode_seconds_per_token(size, with_overhead) - decode_seconds_per_token(size, device)
        assert extra == pytest.approx(n_layers * 150e-6)


@pytest.mark.parametrize("tables", [False, True])
def test_calibrated_device_predicts_what_was_measured(tables):
    """--update-profile's rescaling: afterwards the profile predicts the measured speeds of that file, per-type
    tables are scaled alike (their ratios are kept), and the fixed per-layer cost is not touched."""
    device = DeviceSpec("host", 10.0, 100.0, 2, 0.5, 0.3, decode_layer_overhead_us=20.0,
                        decode_type_efficiency={"f16": 0.8, "q8_0": 0.4} if tables else None,
                        prefill_type_efficiency={"f16": 0.2, "q8_0": 0.1} if tables else None)
    size = sized({"ffn_up": "q8_0", "ffn_down": "q8_0"})
    decode_tps = 0.8 / decode_seconds_per_token(size, device)
    prefill_tps = 1.25 / prefill_seconds_per_token(size, SHAPE, 64, device)
    calibrated = calibrated_device(device, size, SHAPE, 64, decode_tps, prefill_tps)
    assert 1 / decode_seconds_per_token(size, calibrated) == pytest.approx(decode_tps, rel=1e-3)
    assert 1 / prefill_seconds_per_token(size, SHAPE, 64, calibrated) == pytest.approx(prefill_tps, rel=1e-3)
    assert calibrated.decode_layer_overhead_us == 20.0
    if tables:
        assert calibrated.decode_type_efficiency["f16"] / calibrated.decode_type_efficiency["q8_0"] == pytest.approx(2.0, rel=1e-3)
        assert calibrated.prefill_type_efficiency["f16"] == pytest.approx(0.25, rel=1e-3)


def test_measure_host_profile_runs_llama_cpp_and_writes_a_profile_that_loads(tiny_bpe_llama, tmp_path, monkeypatch):
    """`profiles measure` end to end on a tiny model: real quantization, real llama.cpp runs of the whole model,
    of its FFN cut from 96 to 32 channels (half, 32-aligned) and of half its layers, and a profile that loads
    back equal and prices a decoded token with its fixed layer cost."""
    runs: list = []

    def keep_runs(*args, **kwargs):
        runs.extend(measured_runs(*args, **kwargs))
        return runs

    monkeypatch.setattr(hostprobe, "measured_runs", keep_runs)
    lines: list[str] = []
    profile = measure_host_profile(tiny_bpe_llama, threads=1, progress=lines.append)
    assert any("1 layers" in line for line in lines) and any("FFN 32" in line for line in lines)
    assert any("pass 2/2" in line for line in lines)
    path = tmp_path / "host.toml"
    path.write_text(profile_to_toml(profile))
    device = load_profile(path).device
    assert device == profile.device
    assert device.memory_bandwidth_gbs > 0.5 and device.compute_gflops > 0.5 and device.threads == 1
    assert {"f16", "q8_0"} <= set(device.decode_type_efficiency) and {"f16", "q8_0"} <= set(device.prefill_type_efficiency)

    # The fixed cost per layer. The ladder holds what separates it from the bytes: the model at 3 layers and at 1,
    # and its FFN at 96 channels and at 32 (the same layers, fewer bytes) ...
    ladder = {(layer_count(size), max(l.n_ff for l in shape.layers)) for size, shape, _ in runs}
    assert ladder == {(3, 96), (3, 32), (1, 96)}
    # ... the profile is exactly the fit of these runs, the layer cost included (on a tiny model its value is at the
    # mercy of the machine's load: 25 and 45 us per layer in two runs here, none in a third on a busier machine) ...
    assert fit_host_profile(runs, device.memory_bandwidth_gbs, device.compute_gflops, 1).device == device
    assert device.decode_layer_overhead_us is None or 0 < device.decode_layer_overhead_us < 2000
    # ... and on these very files, speeds made by a device with a known layer cost give that cost back, kept
    # in the written profile, where it prices every decoded token once per layer.
    families = {"float": 0.9, "q8": 0.7, "q4": 0.5, "q5_0": 0.4, "q5_1": 0.45, "k": 0.6}
    table = {t: families[f] for f, members in TYPE_FAMILIES.items() for t in members}
    truth = dataclasses.replace(device, decode_type_efficiency=table, prefill_type_efficiency=table,
                                decode_layer_overhead_us=120.0)
    synthetic = [(size, shape, speeds_of(size, shape, truth)) for size, shape, _ in runs]
    fitted = fit_host_profile(synthetic, device.memory_bandwidth_gbs, device.compute_gflops, 1)
    path.write_text(profile_to_toml(fitted))
    refitted = load_profile(path).device
    assert refitted.decode_layer_overhead_us == pytest.approx(120.0, rel=1e-2)
    assert f"decode_layer_overhead_us = {refitted.decode_layer_overhead_us!r}" in path.read_text()
    no_overhead = dataclasses.replace(refitted, decode_layer_overhead_us=None)
    for size, _, speed in synthetic:
        extra = decode_seconds_per_token(size, refitted) - decode_seconds_per_token(size, no_overhead)
        assert extra == pytest.approx(layer_count(size) * refitted.decode_layer_overhead_us * 1e-6, rel=1e-9)
        assert 1 / decode_seconds_per_token(size, refitted) == pytest.approx(speed["decode_tps"], rel=1e-3)
