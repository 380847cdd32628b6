"""Pruning through the commands a user runs: `export` with pruning flags, `export` where the planner prunes, `prune`
and its quant-block alignment, the off-device verdict, and a built file against the prediction that chose it.

Small random Llamas built here, the real CLI in a child process, the real llama.cpp. Each export writes its own
profile TOML (a short context, generous memory) so that validation stays a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import build_bpe_tokenizer, llama_cpp_logits, run_cli, run_export

from edgeprune.device.profile_writing import profile_to_toml
from edgeprune.device.profiles import load_profile
from edgeprune.core.texts import default_evaluation_text

MIB = 1 << 20
EVAL = ("--eval-ctx", "128", "--eval-chunks", "2", "--eval-fixed", "--threads", "1")
SLOW_BOARD = "Slow test board"  # predicted far slower than this machine
FAST_BOARD = "Imaginary fast board"  # predicted far faster than this machine


def build_llama(directory: Path, *, hidden: int, n_ff: int, n_layers: int, n_head: int, n_head_kv: int,
                vocab_size: int | None = None, seed: int = 0) -> Path:
    """A random Llama with conftest's BPE tokenizer, scaled like conftest's tiny model so its logits carry signal.
    A `vocab_size` beyond the tokenizer's pads the vocabulary with unused tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True)
    build_bpe_tokenizer(directory)
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(vocab) + 3, hidden_size=hidden, intermediate_size=n_ff, num_hidden_layers=n_layers,
        num_attention_heads=n_head, num_key_value_heads=n_head_kv, head_dim=hidden // n_head,
        max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """conftest's tiny shape: hidden 64, 3 layers of 4 heads (2 KV) of 16, FFN 96."""
    return build_llama(tmp_path_factory.mktemp("models") / "tiny", hidden=64, n_ff=96, n_layers=3, n_head=4,
                       n_head_kv=2)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """Hidden 64, 2 layers, FFN 768: room for 256-aligned FFN widths (K-quant blocks). A vocabulary of 16384 makes
    the embeddings most of the file and the logits most of llama.cpp's compute buffer, as in real small models
    (SmolLM2: 49152 × 576), so that the file is MiBs and memory is predicted in the regime the cost model is for."""
    return build_llama(tmp_path_factory.mktemp("models") / "wide", hidden=64, n_ff=768, n_layers=2, n_head=4,
                       n_head_kv=2, vocab_size=16384)


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(default_evaluation_text().content[:20000], encoding="utf-8")  # thousands of tokens here
    return path


def write_profile(path: Path, *, device: dict, budgets: dict, runtime: dict | None = None) -> Path:
    """A profile TOML: the shipped x86 laptop's with some fields replaced."""
    base = load_profile("x86-laptop-16gb")
    profile = dataclasses.replace(
        base, device=dataclasses.replace(base.device, **device),
        runtime=dataclasses.replace(base.runtime, **(runtime or {})),
        budgets=dataclasses.replace(base.budgets, **{"context_length": 256, "memory_mib": 256.0, **budgets}))
    path.write_text(profile_to_toml(profile), encoding="utf-8")
    return path


def gguf_layers(path: Path) -> tuple[str, list[dict]]:
    """The architecture and per-layer widths a GGUF declares, checked against its tensors' shapes."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    n_layers = reader.fields[f"{arch}.block_count"].contents()

    def per_layer(key: str) -> list[int]:
        value = reader.fields[f"{arch}.{key}"].contents()
        return list(value) if isinstance(value, list) else [value] * n_layers

    tensors = {t.name: t for t in reader.tensors}
    layers = []
    for i, (n_head, n_head_kv, n_ff) in enumerate(zip(per_layer("attention.head_count"),
                                                      per_layer("attention.head_count_kv"),
                                                      per_layer("feed_forward_length"))):
        assert int(tensors[f"blk.{i}.ffn_down.weight"].shape[0]) == n_ff  # ne[0]: the row length, n_ff
        layers.append({"n_head": n_head, "n_head_kv": n_head_kv, "n_ff": n_ff})
    return arch, layers


def decoder_params(layers: list[dict], hidden: int, head_dim: int) -> int:
    return sum(2 * hidden * head_dim * (l["n_head"] + l["n_head_kv"]) + 3 * hidden * l["n_ff"] for l in layers)


def widths(layers: list[dict]) -> list[tuple[int, int, int]]:
    return [(l["n_head"], l["n_head_kv"], l["n_ff"]) for l in layers]


def predicted_here(gguf_path: Path, profile_path: Path) -> dict[str, float]:
    """Decode tok/s and TTFT of the file on the profile's device, worked out here from its tensors by FACTS.md's
    rule and not by the cost model: decode reads every tensor (a tied embedding as the output matrix) at bandwidth ×
    decode efficiency; prefill does 2 FLOPs per layer weight per token, the head once per prompt, and attention over
    n/2 keys on average; the first token is the prompt plus one decode."""
    profile = load_profile(profile_path)
    dev, n = profile.device, profile.budgets.ttft_prompt_tokens
    assert not (dev.decode_type_efficiency or dev.prefill_type_efficiency or dev.decode_layer_overhead_us)
    reader = gguf.GGUFReader(gguf_path)
    tied = "output.weight" not in {t.name for t in reader.tensors}
    read = [t for t in reader.tensors if t.name != "token_embd.weight" or tied]
    decode_s = sum(int(t.n_bytes) for t in read) / (dev.memory_bandwidth_gbs * 1e9 * dev.decode_efficiency)
    matrices = sum(2 * int(t.n_elements) for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) > 1)
    head = sum(2 * int(t.n_elements) for t in read if t.name in ("output.weight", "token_embd.weight"))
    attention = sum(4 * l["n_head"] * 16 * n / 2 for l in gguf_layers(gguf_path)[1])  # head_dim 16
    prefill_s = (matrices + head / n + attention) / (dev.compute_gflops * 1e9 * dev.prefill_efficiency)
    return {"decode_tps": 1 / decode_s, "ttft_s": n * prefill_s + decode_s}


def check(report: dict, name: str) -> dict:
    (found,) = [c for c in report["validation"]["checks"] if c["name"] == name]
    return found


# --- export with explicit pruning flags, judged for a device predicted slower than this machine -----------------


@pytest.fixture(scope="module")
def flagged_export(tiny, eval_text, tmp_path_factory):
    """`export --quant Q8_0 --ffn 0.34 --heads 0.25 --allocation adaptive` for a slow board: flags, not the planner,
    decide the pruning (the planner would find no plan for this board)."""
    tmp = tmp_path_factory.mktemp("flagged")
    profile = write_profile(tmp / "slow-board.toml", device={"name": SLOW_BOARD, "memory_bandwidth_gbs": 0.001,
                                                             "compute_gflops": 0.01},
                            budgets={"min_decode_tps": 10.0, "max_ttft_s": 60.0})
    out = tmp / "out"
    result = run_export(tiny, out, "--quant", "Q8_0", "--ffn", "0.34", "--heads", "0.25", "--allocation", "adaptive",
                        "--eval", str(eval_text), *EVAL, profile=str(profile))
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result, out, json.loads((out / "report.json").read_text()), profile


def test_export_with_pruning_flags_writes_a_deci_gguf_with_the_reported_widths(flagged_export):
    result, out, report, _ = flagged_export
    export = report["export"]
    assert export["plan"] is None and export["quant"] == "Q8_0"  # the flags replaced the planner
    pruning = export["pruning"]
    assert pruning["details"]["allocation"] == "adaptive" and pruning["architecture"] == "deci"
    gguf_path = out / "tiny-Q8_0.gguf"
    arch, layers = gguf_layers(gguf_path)
    reported = [{k: l[k] for k in ("n_head", "n_head_kv", "n_ff")} for l in pruning["layers"]]
    assert arch == "deci" and layers == reported
    assert len(set(widths(layers))) > 1, "adaptive allocation gave every layer the same widths"
    assert all(l["n_ff"] % 32 == 0 and l["n_ff"] > 0 for l in layers)  # Q8_0: 32-aligned
    assert layers[0]["n_head"] > 0  # deci needs attention in layer 0
    assert pruning["removed_params"] == pruning["decoder_params_before"] - decoder_params(layers, 64, 16)
    share = pruning["removed_params"] / pruning["decoder_params_before"]
    assert 0.2 < share < 0.4, share  # 0.34 of FFN (60% of the decoder) and 0.25 of attention (40%): 0.30

    # llama.cpp loads it and computes: the validation ran on it, and it gives finite logits of every token here
    validation = report["validation"]
    assert math.isfinite(validation["perplexity"]["ppl"]) and validation["divergence"]["n_tokens"] > 0
    logits = llama_cpp_logits(gguf_path, [1, 50, 60, 70, 80], n_ctx=64)
    assert logits.shape[0] == 5 and np.isfinite(logits).all()
    assert f"wrote {gguf_path}" in result.stdout


def test_off_device_verdict_fails_on_the_prediction_although_this_machine_is_fast(flagged_export):
    """Off the device, speed budgets are judged on the device's prediction: this machine decodes the tiny model at
    thousands of tokens/s, yet the board is predicted below its 10 tok/s, so the export fails (exit 1), with
    its files written and the verdict saying why."""
    result, out, report, profile = flagged_export
    validation = report["validation"]
    decode, memory = check(report, "decode_tps"), check(report, "memory")
    assert decode["basis"] == f"predicted for {SLOW_BOARD}" and not decode["passed"]
    expected = predicted_here(out / "tiny-Q8_0.gguf", profile)
    assert decode["measured"] == pytest.approx(expected["decode_tps"], rel=1e-3)
    assert check(report, "ttft")["measured"] == pytest.approx(expected["ttft_s"], rel=1e-3)
    assert decode["measured"] < decode["limit"] == 10.0
    assert validation["speed"]["decode_tps"] >= 10.0  # measured here: this machine would have passed
    assert memory["basis"] == "measured here" and memory["passed"]
    assert check(report, "ttft")["passed"] and check(report, "ttft")["basis"] == f"predicted for {SLOW_BOARD}"
    assert validation["passed"] is False and result.returncode == 1, result.stderr[-2000:]
    line = f"FAIL        decode_tps: {decode['measured']:.3f} tok/s >= 10  (predicted for {SLOW_BOARD})"
    assert line in result.stdout
    assert "verdict     FAIL" in result.stdout
    assert all((out / name).is_file() for name in ("reference-F16.gguf", "report.json", "tiny-Q8_0.gguf"))


# --- export where the planner prunes: a file budget below the smallest unpruned file -------------------------

PLANNED_CONTEXT = 1024


@pytest.fixture(scope="module")
def planned_export(wide, eval_text, tmp_path_factory):
    """`export` for a board with a file budget 3% under the model's Q4_0 size and a fast predicted speed: the
    planner must prune, and every speed budget is out of this machine's reach but within the board's."""
    from converters import ConversionInput
    from edgeprune.build.sizing import estimate_size
    from edgeprune.build.loading import load_model
    from edgeprune.core.shapes import shape_of

    loaded = load_model(wide)
    source = ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length)
    q4_mib = estimate_size(source, shape_of(loaded.model), "Q4_0").file_bytes / MIB
    tmp = tmp_path_factory.mktemp("planned")
    profile = write_profile(
        tmp / "fast-board.toml", device={"name": FAST_BOARD, "memory_bandwidth_gbs": 1e5, "compute_gflops": 1e6},
        runtime={"quant_types": ("Q8_0", "Q4_0"), "default_quant": "Q4_0"},
        budgets={"max_file_mib": round(0.97 * q4_mib, 4), "min_decode_tps": 1e6, "max_ttft_s": 1e-4,
                 "context_length": PLANNED_CONTEXT})
    out = tmp / "out"
    result = run_export(wide, out, "--eval", str(eval_text), *EVAL, profile=str(profile))
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result, out, json.loads((out / "report.json").read_text()), profile


def test_export_lets_the_planner_prune_to_meet_a_file_budget(planned_export):
    result, out, report, profile = planned_export
    plan = report["export"]["plan"]
    chosen = plan["chosen"]
    assert chosen["allocation"] != "none" and chosen["quant"] == report["export"]["quant"] == "Q4_0", chosen
    assert any(v.startswith("file") for r in plan["rejected"] for v in r["violations"])  # unpruned files break it
    gguf_path = out / f"wide-{chosen['quant']}.gguf"
    arch, layers = gguf_layers(gguf_path)
    assert arch == chosen["architecture"] == report["export"]["pruning"]["architecture"]
    assert len(layers) == 2 - chosen["layers_removed"]
    assert all(l["n_head_kv"] == 2 for l in layers)  # heads are removed inside KV groups
    if chosen["allocation"] == "uniform":
        assert widths(layers) == [(chosen["heads_per_group"] * 2, 2, chosen["n_ff"])] * len(layers)
    else:  # adaptive: the same totals, spread over the layers
        assert abs(sum(l["n_ff"] for l in layers) - chosen["n_ff"] * len(layers)) <= 32 * len(layers)
    budget = load_profile(profile).budgets.max_file_mib
    assert gguf_path.stat().st_size / MIB <= budget
    assert check(report, "file_size")["passed"] and check(report, "file_size")["basis"] == "measured here"
    assert result.returncode == 0 and report["validation"]["passed"] is True, result.stdout[-2000:]
    assert f"plan        {chosen['label']}" in result.stdout


def test_off_device_verdict_passes_on_the_prediction_although_this_machine_is_slow(planned_export):
    """What `make demo` prints: speed checks say "predicted for <device>", memory and file "measured here", and
    the verdict follows the prediction. This machine can neither decode a million tokens/s nor answer in 0.1 ms;
    the board, as predicted, can, so the export passes."""
    result, out, report, profile = planned_export
    validation = report["validation"]
    assert validation["predicted_device"]["device"] == FAST_BOARD
    expected = predicted_here(out / f"wide-{report['export']['quant']}.gguf", profile)
    for name, key in (("decode_tps", "decode_tps"), ("ttft", "ttft_s")):
        c = check(report, name)
        assert c["basis"] == f"predicted for {FAST_BOARD}" and c["passed"], c
        assert c["measured"] == pytest.approx(expected[key], rel=1e-3)
        assert f"PASS        {name}: " in result.stdout
    assert result.stdout.count(f"(predicted for {FAST_BOARD})") == 2
    assert validation["speed"]["decode_tps"] < 1e6 and validation["speed"]["ttft_s"] > 1e-4  # measured here: misses
    for name in ("memory", "file_size"):
        assert check(report, name)["basis"] == "measured here"
    assert "verdict     PASS" in result.stdout and result.returncode == 0


def test_built_file_size_and_memory_match_the_prediction_that_chose_it(planned_export):
    """The planner chose the candidate on its predicted file size and memory; the file built and the memory
    llama.cpp allocates for it at the profile's context must agree. The file is priced per tensor from llama.cpp's
    own dry run: within 1% (the report rounds to 0.01 MiB). Memory (file + KV cache + compute buffer, which the
    batch's logits dominate here as in real small models): within 3%, the accuracy the planner relies on
    (measured: 34.15 MiB allocated, 34.02 predicted)."""
    _, out, report, _ = planned_export
    chosen = report["export"]["plan"]["chosen"]
    memory = report["validation"]["memory"]
    assert memory["context_length"] == PLANNED_CONTEXT
    assert memory["file_bytes"] == (out / f"wide-{chosen['quant']}.gguf").stat().st_size
    assert memory["file_bytes"] / MIB == pytest.approx(chosen["file_mib"], rel=0.01)
    assert memory["total_bytes"] / MIB == pytest.approx(chosen["memory_mib"], rel=0.03)
    # and the prediction for the built file itself (its real per-layer shape) is the plan's
    assert report["validation"]["predicted_device"]["file_bytes"] == memory["file_bytes"]
    assert report["validation"]["predicted_device"]["memory_bytes"] / MIB == pytest.approx(chosen["memory_mib"],
                                                                                          rel=0.01)


def test_memory_is_predicted_from_above_at_a_long_context_too(planned_export):
    """The same file at 4096 tokens of context: without flash attention llama.cpp's compute buffer grows with the
    context (measured: 32.4 MiB up to 2048 tokens, 40.8 MiB at 4096), and so does the prediction, from above."""
    from edgeprune.device.costmodel import predict_gguf
    from edgeprune.device.gguf_check import read_gguf
    from edgeprune.device.validation.speed import measure_speed

    _, out, report, profile_path = planned_export
    gguf_path = out / f"wide-{report['export']['quant']}.gguf"
    profile = load_profile(profile_path)
    long = dataclasses.replace(profile, budgets=dataclasses.replace(profile.budgets, context_length=4096))
    predicted = predict_gguf(read_gguf(gguf_path), long)
    probe = measure_speed(gguf_path, threads=1, n_ctx=4096, progress=lambda _m: None)
    measured = gguf_path.stat().st_size + probe["kv_cache_bytes"] + probe["compute_buffer_bytes"]
    assert measured <= predicted.memory_bytes <= 1.05 * measured, (measured / MIB, predicted.memory_bytes / MIB)


# --- the prune command: kept FFN widths land on the quant's block size -------------------------------------------


@pytest.mark.parametrize("quant, align, expected_ff", [("Q8_0", 32, 448), ("Q4_K_M", 256, 512)])
def test_prune_aligns_kept_ffn_widths_to_the_quant_block(wide, tmp_path, quant, align, expected_ff):
    """`prune --ffn 0.4` of an FFN of 768: 460.8 channels kept as asked; Q8_0 blocks are 32 wide (448 kept),
    K-quant blocks 256 (512 kept), so that ffn_down, whose rows are n_ff long, keeps its K-quant. The 64-wide rows
    of the other matrices cannot align and fall back, as the report says."""
    out = tmp_path / "out"
    result = run_cli("prune", str(wide), "--out", str(out), "--ffn", "0.4", "--quant", quant)
    assert result.returncode == 0, result.stderr[-3000:]
    gguf_path = out / f"wide-{quant}.gguf"
    assert (out / "report.json").is_file() and not (out / "reference-F16.gguf").exists()
    report = json.loads((out / "report.json").read_text())
    pruning = report["export"]["pruning"]
    arch, layers = gguf_layers(gguf_path)
    assert arch == "llama" == pruning["architecture"]  # uniform allocation by default
    assert widths(layers) == [(4, 2, expected_ff)] * 2 and expected_ff % align == 0
    assert [{k: l[k] for k in ("n_head", "n_head_kv", "n_ff")} for l in pruning["layers"]] == layers
    assert pruning["removed_params"] == 2 * 3 * 64 * (768 - expected_ff)
    assert f"wrote {gguf_path} (llama, " in result.stdout
    down_types = {t.tensor_type.name for t in gguf.GGUFReader(gguf_path).tensors if "ffn_down.weight" in t.name}
    fallbacks = [f["tensor"] for f in report["export"]["fallbacks"]]
    assert not [name for name in fallbacks if "ffn_down" in name], fallbacks
    if quant == "Q4_K_M":
        assert down_types <= {"Q4_K", "Q6_K"}, down_types
        assert any("ffn_up" in name for name in fallbacks)  # rows of 64: not a whole 256-block
    else:
        assert down_types == {"Q8_0"} and fallbacks == []
