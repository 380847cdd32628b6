"""Structured pruning: tiny random Llamas for the mechanics, SmolLM2-135M for the claim that it works."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch
from conftest import agreement, torch_logits
from transformers import LlamaForCausalLM

from edgeprune.core.errors import EdgepruneError
from edgeprune.build.pruning import CRITERIA, NoAttention, PruneOptions, perplexity, prune_model
from edgeprune.build.pruning.evaluate import chunk_tokens
from edgeprune.build.pruning.recovery import bias_compensation, ridge_refit
from edgeprune.build.pruning.surgery import head_index
from edgeprune.core.shapes import shape_of

TINY = dict(align=16, calib_sequences=8, calib_seq_len=64)  # tiny model: hidden 64, 4 heads / 2 KV, n_ff 96


@pytest.fixture
def tiny(tiny_bpe_llama):
    def load() -> LlamaForCausalLM:
        return LlamaForCausalLM.from_pretrained(tiny_bpe_llama, dtype=torch.float32).eval()

    return load


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return torch.randint(3, 300, (4096,), generator=torch.Generator().manual_seed(0)).tolist()


def _runs(model: LlamaForCausalLM, ids: list[int]) -> None:
    logits = model(input_ids=torch.tensor([ids[:40]])).logits
    assert torch.isfinite(logits).all()
    out = model.generate(torch.tensor([ids[:5]]), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)


def test_ffn_pruning_removes_what_was_asked_keeps_the_heads_and_the_important_channels(tiny, ids):
    """What a user checks after `--ffn 0.33` with the defaults: a third of every FFN gone in aligned blocks and
    nothing else (the heads, at ratio 0, keep their weights bit for bit), the count reported and the config agree
    with the weights, the kept channels are the original ones, and the criterion chose better than chance."""
    model, reference = tiny(), tiny()
    result = prune_model(model, ids, PruneOptions(ffn=1 / 3, **TINY))
    assert [(l.n_head, l.n_head_kv, l.n_ff) for l in result.shape.layers] == [(4, 2, 64)] * 3  # 96 → 64, 16-aligned
    assert result.shape.architecture == "llama" and model.config.intermediate_size == 64
    assert result.removed_params == 3 * (3 * 64 * 32)  # gate, up and down rows of 32 channels in 3 layers
    assert result.removed_params == result.decoder_params_before - shape_of(model).decoder_params()
    assert result.removed_params / result.decoder_params_before == pytest.approx(0.2)  # FFN is 60% of the decoder
    assert result.details["widths"] == [(4, 2, 64)] * 3
    for cut, full in zip(model.model.layers, reference.model.layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(getattr(cut.self_attn, name).weight, getattr(full.self_attn, name).weight), name
        kept = _kept(full.mlp.gate_proj.weight, cut.mlp.gate_proj.weight, 1)
        assert len(set(kept)) == 64 and kept == _kept(full.mlp.up_proj.weight, cut.mlp.up_proj.weight, 1)
    _runs(model, ids)

    # The chosen channels matter less than random ones: on held-out tokens the pruned model stays closer to the
    # original (KL 0.62) than random channel choices with the same recovery (KL 0.81-0.89, seeds 0-3).
    held_out = torch.randint(3, 300, (256,), generator=torch.Generator().manual_seed(1)).tolist()

    def kl_to_reference(pruned) -> float:
        return agreement(torch_logits(reference, held_out), torch_logits(pruned, held_out))[1]

    chosen = kl_to_reference(model)
    for seed in (0, 1):
        randomly = tiny()
        prune_model(randomly, ids, PruneOptions(ffn=1 / 3, method="random", seed=seed, **TINY))
        assert chosen < 0.85 * kl_to_reference(randomly), (chosen, seed)


def test_uniform_per_group_exports_as_llama_and_generates(tiny, ids):
    model = tiny()
    result = prune_model(model, ids, PruneOptions(heads=0.4, ffn=0.5, allocation="uniform", head_mode="per-group",
                                                  recovery="none", **TINY))
    # one query head per KV group (1/3 of attention params, nearest to 0.4), n_ff 96 → 48
    assert [(l.n_head, l.n_head_kv, l.n_ff) for l in result.shape.layers] == [(2, 2, 48)] * 3
    assert result.shape.architecture == "llama"
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size) == (2, 2, 48)
    assert model.model.layers[1].self_attn.num_key_value_groups == 1
    assert result.removed_params == result.decoder_params_before - result.shape.decoder_params()
    _runs(model, ids)


def test_kv_groups_mode_drops_whole_groups(tiny, ids):
    model = tiny()
    result = prune_model(model, ids, PruneOptions(heads=0.5, allocation="uniform", head_mode="kv-groups",
                                                  recovery="bias", **TINY))
    assert [(l.n_head, l.n_head_kv) for l in result.shape.layers] == [(2, 1)] * 3
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    assert all(l.attn_output_bias for l in result.shape.layers)
    _runs(model, ids)


def _kept(original: torch.Tensor, pruned: torch.Tensor, block: int) -> list[int]:
    """Indices of the original row blocks (heads, or channels with block 1) that survive in `pruned`."""
    blocks = original.reshape(-1, block, original.shape[-1])
    return [next(i for i, b in enumerate(blocks) if torch.equal(b, p)) for p in pruned.reshape(-1, block, pruned.shape[-1])]


@pytest.mark.parametrize("head_mode", ["per-group", "kv-groups"])
def test_cutting_equals_masking_the_removed_heads_and_channels(tiny, ids, head_mode):
    """Without recovery, the shrunk model must compute exactly what the original computes with the removed
    heads' o_proj columns and channels' down_proj columns zeroed: checks GQA grouping and every index."""
    model, masked = tiny(), tiny()
    prune_model(model, ids, PruneOptions(heads=0.5, ffn=0.4, head_mode=head_mode, method="random", recovery="none", allocation="adaptive",
                                         **TINY))
    with torch.no_grad():
        for cut, full in zip(model.model.layers, masked.model.layers):
            q_proj = getattr(cut.self_attn, "q_proj", None)  # NoAttention has none: all heads removed
            heads = _kept(full.self_attn.q_proj.weight, q_proj.weight, 16) if q_proj is not None else []
            columns = head_index(np.setdiff1d(np.arange(4), heads), 16)
            full.self_attn.o_proj.weight[:, columns] = 0
            channels = _kept(full.mlp.up_proj.weight, cut.mlp.up_proj.weight, 1)
            full.mlp.down_proj.weight[:, np.setdiff1d(np.arange(96), channels)] = 0
        x = torch.tensor([ids[:60]])
        torch.testing.assert_close(model(input_ids=x).logits, masked(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    assert shape_of(model).decoder_params() < shape_of(masked).decoder_params()


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_prunes_adaptively_to_aligned_widths(tiny, ids, criterion):
    model = tiny()
    result = prune_model(model, ids, PruneOptions(ffn=0.4, method=criterion, recovery="none", allocation="adaptive",
                                                  **TINY))
    widths = [l.n_ff for l in result.shape.layers]
    assert all(w % 16 == 0 and w >= 16 for w in widths)
    assert abs(sum(widths) - 0.6 * 3 * 96) <= 16  # within one block of the budget
    _runs(model, ids)


@pytest.mark.parametrize("recovery", ["bias", "reconstruct"])
def test_adaptive_attention_removal_keeps_layer_zero_and_uses_no_attention_module(tiny, ids, recovery):
    model = tiny()
    result = prune_model(model, ids, PruneOptions(heads=0.9, ffn=0.9, recovery=recovery, allocation="adaptive",
                                                  **TINY))
    layers = result.shape.layers
    assert layers[0].n_head > 0
    dropped = [i for i, l in enumerate(layers) if l.n_head == 0]
    assert dropped, "0.9 of attention cannot be removed without dropping a layer's attention"
    for i in dropped:
        assert isinstance(model.model.layers[i].self_attn, NoAttention) and layers[i].n_head_kv == 0
    assert all(l.n_ff >= 16 for l in layers)
    assert result.shape.architecture == "deci"
    assert all(layers[i - 1].ffn_down_bias for i in dropped)  # the dropped attention's constant moved upstream
    _runs(model, ids)


def test_layer_removal_renumbers_and_updates_config(tiny, ids):
    model = tiny()
    result = prune_model(model, ids, PruneOptions(layers=1, **TINY))
    assert result.shape.n_layers == 2 and model.config.num_hidden_layers == 2
    assert 0 not in result.details["dropped_layers"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert result.removed_params == result.decoder_params_before // 3
    _runs(model, ids)


def test_iterative_steps_reach_the_same_budget(tiny, ids):
    model = tiny()
    result = prune_model(model, ids, PruneOptions(ffn=0.5, steps=2, **TINY))
    assert len(result.details["steps"]) == 2
    assert sum(l.n_ff for l in result.shape.layers) == 3 * 48
    _runs(model, ids)


def test_reconstruction_tracks_the_original_logits_on_calibration_text(tiny, ids):
    """What the refit optimises: the pruned model's outputs stay closest to the original's on calibration."""
    reference = tiny()
    x = chunk_tokens(ids, 64, 8, reference.config.bos_token_id)
    with torch.no_grad():
        target = reference(input_ids=x).logits
    errors = {}
    for recovery in ("none", "bias", "reconstruct"):
        model = tiny()
        prune_model(model, ids, PruneOptions(heads=0.3, ffn=0.5, method="flap", recovery=recovery, **TINY))
        with torch.no_grad():
            errors[recovery] = (model(input_ids=x).logits - target).square().mean().item()
    assert errors["reconstruct"] < 0.8 * errors["bias"] and errors["bias"] < errors["none"], errors


def test_bias_compensation_keeps_the_mean_output():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 5, bias=False)
    x = torch.randn(1000, 8) + torch.arange(8.0)
    keep = torch.tensor([0, 2, 3, 7])
    w, b = bias_compensation(linear, keep, x.double().mean(0).numpy())
    torch.testing.assert_close((x[:, keep] @ w.T + b).mean(0), linear(x).mean(0), rtol=1e-4, atol=1e-4)


def test_ridge_refit_recovers_a_redundant_column_exactly():
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3, bias=True)
    x = torch.randn(500, 4)
    x[:, 3] = 2 * x[:, 0] - x[:, 1] + 0.5  # the removed column is a linear function of the kept ones
    keep = torch.tensor([0, 1, 2])
    w, b = ridge_refit(linear, keep, x[:, keep], linear(x).detach(), ridge=1e-9)
    torch.testing.assert_close(x[:, keep] @ w.T + b, linear(x).detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "options, message",
    [
        (PruneOptions(method="l1"), "unknown method 'l1'"),
        (PruneOptions(ffn=1.0), "ffn ratio 1.0 is outside"),
        (PruneOptions(heads=-0.1), "heads ratio -0.1 is outside"),
        (PruneOptions(layers=3), "cannot remove 3 of 3 layers"),
        (PruneOptions(head_mode="rows"), "unknown head_mode"),
        (PruneOptions(ffn=0.2, align=0), "align must be a positive integer"),  # a ratio: a no-op is refused first
        (PruneOptions(ffn=0.2, ridge=0.0), "ridge must be above zero"),
    ],
)
def test_bad_options_are_one_line_errors(tiny, ids, options, message):
    with pytest.raises(EdgepruneError, match=message) as err:
        prune_model(tiny(), ids, options)
    assert "\n" not in str(err.value)


# --- SmolLM2-135M: the default must beat the textbook criterion by far -------------------------------------


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load():
        return AutoModelForCausalLM.from_pretrained(
            smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()

    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return load, tokenizer


def test_smollm2_default_beats_magnitude_at_20_percent(smollm2):
    from edgeprune.core.texts import default_calibration_text, default_evaluation_text

    load, tokenizer = smollm2
    calib = tokenizer(default_calibration_text().content)["input_ids"]
    evaluation = tokenizer(default_evaluation_text().content)["input_ids"]
    ppl = {}
    for name, options in {
        "default": PruneOptions(ffn=0.267, calib_sequences=16),
        "magnitude": PruneOptions(ffn=0.267, method="magnitude", allocation="uniform", recovery="none"),
    }.items():
        model = load()
        result = prune_model(model, calib, options)
        assert 0.19 < result.removed_params / result.decoder_params_before < 0.21
        ppl[name] = perplexity(model, evaluation, n_chunks=4)
    assert math.isfinite(ppl["default"]) and ppl["default"] * 3 < ppl["magnitude"], ppl
