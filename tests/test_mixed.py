"""Mixed precision: sensitivities measured through llama.cpp's own quantizer, a solver that keeps the budgets, and
files whose every tensor has the chosen type and that llama.cpp runs."""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch

from conftest import build_spm_tokenizer, build_tiny_llama, llama_cpp_logits, run_export

from converters import ConversionInput, write_gguf
from edgeprune.build.calibration import collect_calibration
from edgeprune.device.costmodel import decode_seconds_per_token
from edgeprune.core.errors import EdgepruneError
from edgeprune.build.loading import load_model
from edgeprune.build.mixed import LEAST_FILL, PROBE_CHUNKS, PROBE_CTX, choose_mix, measure_sensitivity, solve
from edgeprune.core.texts import default_calibration_text
from edgeprune.device.validation.quality import measure_perplexity
from edgeprune.device.profiles import load_profile
from edgeprune.build.quantize import quantize_gguf


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """256-wide rows, so both the K-quants and the 32-block types are candidates; untied, so output has its own."""
    d = tmp_path_factory.mktemp("mixed")
    build_spm_tokenizer(d)
    build_tiny_llama(d, 400, tied=False, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    loaded = load_model(d)
    float_gguf = write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length),
                            d / "float.gguf", "F16")
    ids = np.random.default_rng(0).integers(3, 400, 4000).tolist()
    imatrix = collect_calibration(loaded.model, ids, n_seq=8, seq_len=64).gguf_imatrix()
    return d, float_gguf, imatrix, measure_sensitivity(float_gguf, imatrix)


def file_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}


def test_sensitivity_measures_every_type_each_row_width_allows(tiny_model):
    _, _, _, sensitivity = tiny_model
    for name, options in sensitivity.options.items():
        types = {o.type_name: o.error for o in options}
        assert {"q4_0", "iq4_nl", "q5_0", "q8_0", "q4_k", "iq4_xs", "q6_k"} <= set(types), name  # both families
        assert all(error > 0 for error in types.values())
        assert types["q8_0"] < types["q5_0"] < types["q4_0"] and types["q6_k"] < types["q4_k"], (name, types)
    assert sensitivity.options["blk.0.ffn_down.weight"][0].type_name == "iq2_s"  # 512-wide: the smallest


def test_a_copy_takes_the_named_tensors_from_another_file_and_refuses_one_it_lacks(tiny_model, tmp_path):
    """How each sensitivity probe is made: the reference with one kind's tensors copied in from another file, of
    another type; a name the file does not hold is refused by name, not skipped."""
    from edgeprune.device.gguf_copy import copy_gguf

    _, float_gguf, _, _ = tiny_model
    q4 = quantize_gguf(float_gguf, tmp_path / "q4.gguf", "Q4_0").path
    quantized = {t.name: t for t in gguf.GGUFReader(q4).tensors}
    reference = gguf.GGUFReader(float_gguf)
    name = "blk.1.attn_q.weight"
    probe = copy_gguf(reference, tmp_path / "probe.gguf", replacements={name: quantized[name]})
    types = file_types(probe)
    assert types[name] == "q4_0" and all(t == file_types(float_gguf)[n] for n, t in types.items() if n != name)
    with pytest.raises(ValueError, match="cannot replace blk.9.attn_q.weight: no such tensor"):
        copy_gguf(reference, tmp_path / "bad.gguf", replacements={"blk.9.attn_q.weight": quantized[name]})
    assert not (tmp_path / "bad.gguf").exists()


def test_errors_are_priced_in_kld_measured_by_kind(tiny_model, tmp_path):
    """Each kind alone at its probe type prices its relative error in KLD; the priced estimate of every tensor at
    q4_0 then predicts the KLD llama.cpp measures for that file, where raw summed errors are no KLD at all."""
    _, float_gguf, imatrix, _ = tiny_model
    text = default_calibration_text()
    sensitivity = measure_sensitivity(float_gguf, imatrix, text=text)
    kinds = {name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0] for name in sensitivity.options}
    assert set(sensitivity.kld_per_error) == kinds and all(p > 0 for p in sensitivity.kld_per_error.values())
    everything = {name: "q4_0" for name in sensitivity.options}
    path = quantize_gguf(float_gguf, tmp_path / "q4_0.gguf", "Q4_0", imatrix=imatrix, tensor_types=everything).path
    _, measured = measure_perplexity(path, text, reference_gguf=float_gguf, n_ctx=PROBE_CTX, max_chunks=PROBE_CHUNKS,
                                     progress=lambda _m: None)
    estimated = sensitivity.damage(everything)
    assert 0.5 < estimated / measured.kld_mean < 2, (estimated, measured.kld_mean)
    assert not 0.1 < sensitivity.damage(everything, "weighted") / measured.kld_mean < 10


def test_solver_keeps_the_byte_budget_and_spends_it_where_damage_falls(tiny_model, tmp_path):
    _, float_gguf, imatrix, sensitivity = tiny_model
    everything_at = {t: {n: t for n in sensitivity.options} for t in ("q4_0", "q8_0")}
    low, high = (sensitivity.file_bytes_at(everything_at[t]) for t in ("q4_0", "q8_0"))
    damages = []
    for budget in (low, (low + high) // 2, high):
        plan = solve(sensitivity, max_file_bytes=budget)
        assert plan.file_bytes <= budget
        damages.append(plan.estimated_damage)
        quantized = quantize_gguf(float_gguf, tmp_path / "mixed.gguf", "Q4_K_M", imatrix=imatrix,
                                  tensor_types=plan.types)
        assert file_types(quantized.path) == plan.types  # llama.cpp stored exactly the chosen types
        assert abs(quantized.path.stat().st_size - plan.file_bytes) < 1024  # the predicted size, to the imatrix keys
    assert damages[0] > damages[1] > damages[2]
    logits = llama_cpp_logits(quantized.path, list(range(3, 60)))
    assert np.isfinite(logits).all()


def test_solver_spends_the_named_size_even_where_more_bytes_look_useless(tiny_model):
    """Weights on one type's grid: every type looks as good as any other. A mix at a size between Q4_0's and Q8_0's
    still spends its bytes, between the least asked and the budget, where the unbounded solver takes the cheapest
    types."""
    _, _, _, sensitivity = tiny_model
    flat = dataclasses.replace(sensitivity, options={n: [dataclasses.replace(o, error=1.0) for o in options]
                                                     for n, options in sensitivity.options.items()})
    budget = sum(sensitivity.file_bytes_at({n: t for n in sensitivity.options}) for t in ("q4_0", "q8_0")) // 2
    least = int(LEAST_FILL * budget)
    assert solve(flat, max_file_bytes=budget).file_bytes < least
    assert least <= solve(flat, max_file_bytes=budget, min_file_bytes=least).file_bytes <= budget


def test_solver_keeps_the_decode_budget(tiny_model):
    """q8_0 made slow on this device: a decode budget that rules it out gets a mix without it where decode reads
    it, predicted within the budget."""
    _, _, _, sensitivity = tiny_model
    device = dataclasses.replace(load_profile("x86-laptop-16gb").device, memory_bandwidth_gbs=0.01,
                                 decode_type_efficiency={"q8_0": 0.05}, decode_layer_overhead_us=0.0)
    unlimited = solve(sensitivity, max_file_bytes=10**9, device=device)
    assert "q8_0" in unlimited.types.values()
    limit = decode_seconds_per_token(sensitivity.size({name: "q6_k" for name in sensitivity.options}), device)
    limited = solve(sensitivity, max_file_bytes=10**9, device=device, max_decode_s_per_token=limit)
    assert limited.decode_s_per_token <= limit and limited.estimated_damage > unlimited.estimated_damage
    # the untied embedding is only looked up, never read whole per token: its type costs no decode time
    assert "q8_0" not in {t for name, t in limited.types.items() if name != "token_embd.weight"}


def test_budget_below_the_smallest_types_is_refused(tiny_model):
    _, _, _, sensitivity = tiny_model
    with pytest.raises(EdgepruneError, match="even the smallest candidate types give .* MiB, over the budget"):
        solve(sensitivity, max_file_bytes=1000)


def test_choose_mix_matches_the_named_quant_size(tiny_model):
    _, float_gguf, imatrix, _ = tiny_model
    profile = load_profile("x86-laptop-16gb")
    plan = choose_mix(float_gguf, imatrix, "Q4_K_M", profile, text=default_calibration_text())
    named = quantize_gguf(float_gguf, float_gguf.parent / "named.gguf", "Q4_K_M", imatrix=imatrix)
    assert plan.file_bytes <= named.path.stat().st_size + 1024
    assert plan.decode_s_per_token <= 1 / profile.budgets.min_decode_tps


def test_unknown_tensor_type_is_refused(tiny_model, tmp_path):
    _, float_gguf, _, _ = tiny_model
    with pytest.raises(EdgepruneError, match="unknown tensor type 'q9_9' for blk.0.attn_q.weight"):
        quantize_gguf(float_gguf, tmp_path / "x.gguf", "Q4_0", tensor_types={"blk.0.attn_q.weight": "q9_9"})
    assert not list(tmp_path.iterdir())


def test_export_mix_writes_and_reports_the_chosen_types(tiny_model, tmp_path):
    d, _, _, _ = tiny_model
    result = run_export(d, tmp_path / "out", "--quant", "Q4_K_M", "--mix", "--eval-chunks", "2", "--eval-fixed")
    assert result.returncode == 0, result.stderr[-2000:]
    export = json.loads((tmp_path / "out" / "report.json").read_text())["export"]
    assert export["gguf"].endswith("-Q4_K_M-mixed.gguf")
    assert file_types(tmp_path / "out" / export["gguf"]) == export["mixed"]["types"]
    assert "mixed precision:" in result.stderr and export["mixed"]["bits_by_kind"]
    assert export["plan"]["chosen"]["label"] == "Q4_K_M mixed" and "mixed:" in export["plan"]["why"]
    assert "against Q4_K_M: more bits for" in export["mixed"]["against_named"]
    assert export["mixed"]["against_named"] in result.stderr
    assert "Tensor types (mixed precision)" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_off_grid_model_computes_the_same_function_with_every_matrix_moved(family, tmp_path):
    """bench.offgrid's model: the same logits as the original, every decoder matrix's blocks holding other weights
    than before (so no grid of the original's survives), and the same model on every run (fixed seed)."""
    from edgeprune.build.bench.offgrid import move_off_grid

    build_spm_tokenizer(tmp_path)
    d = build_tiny_llama(tmp_path, 400, family=family, attention_bias=family == "qwen2", tied=family != "llama")
    original, moved, again = (load_model(d).model for _ in range(3))
    layers = len(original.model.layers)
    assert move_off_grid(moved) == 7 * layers + (family == "llama") and move_off_grid(again) == 7 * layers + (
        family == "llama")
    ids = torch.randint(3, 400, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = original(ids).logits, moved(ids).logits
    assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()))
    before, after, repeat = (dict(m.named_parameters()) for m in (original, moved, again))
    for name, weight in before.items():
        assert (after[name] == repeat[name]).all(), name
        if name.endswith("proj.weight"):
            blocks = weight.shape[1] // 16  # the tiny rows are 64 or 96 wide: 16-wide blocks stand for 32-wide ones
            same = (after[name].reshape(-1, blocks, 16) == weight.reshape(-1, blocks, 16)).all(dim=2)
            assert not same.any(), name


def test_off_grid_refuses_a_parameter_it_does_not_know(tmp_path):
    from edgeprune.build.bench.offgrid import move_off_grid

    build_spm_tokenizer(tmp_path)
    model = load_model(build_tiny_llama(tmp_path, 400)).model
    model.model.layers[0].self_attn.register_parameter("extra", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(EdgepruneError, match="cannot move model.layers.0.self_attn.extra off its grid"):
        move_off_grid(model)
