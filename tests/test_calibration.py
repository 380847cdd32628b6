"""Calibration statistics on a tiny random Llama: values checked against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from edgeprune.build.calibration import collect_calibration
from edgeprune.core.errors import EdgepruneError


@pytest.fixture
def tiny_model(tiny_bpe_llama):
    return LlamaForCausalLM.from_pretrained(tiny_bpe_llama, dtype=torch.float32).eval()


def _tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_moments_match_direct_computation(tiny_model):
    ids = _tokens(4 * 32)
    stats = collect_calibration(tiny_model, ids, n_seq=4, seq_len=32, batch_size=3)
    batch = torch.tensor(ids).reshape(4, 32)
    batch[:, 0] = tiny_model.config.bos_token_id
    with torch.no_grad():
        x = tiny_model.model.layers[0].input_layernorm(tiny_model.model.embed_tokens(batch)).reshape(-1, 64).double()
    name = "model.layers.0.self_attn.q_proj"
    assert stats.n_tokens == 128 and stats.counts[name] == 128
    np.testing.assert_allclose(stats.mean(name), x.mean(0).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.variance(name), x.var(0, unbiased=False).numpy(), rtol=1e-5, atol=1e-7)
    imatrix = stats.imatrix()
    np.testing.assert_allclose(imatrix[name], x.square().mean(0).numpy(), rtol=1e-5)
    assert imatrix[name].dtype == np.float32
    # every linear of every layer, plus lm_head, each with one value per input column
    assert len(imatrix) == 3 * 7 + 1
    assert imatrix["model.layers.2.mlp.down_proj"].shape == (96,)
    assert imatrix["lm_head"].shape == (64,)


def test_block_influence_is_zero_for_a_layer_that_does_nothing(tiny_model):
    with torch.no_grad():
        tiny_model.model.layers[1].self_attn.o_proj.weight.zero_()
        tiny_model.model.layers[1].mlp.down_proj.weight.zero_()
    influence = collect_calibration(tiny_model, _tokens(64), n_seq=2, seq_len=32).block_influence()
    assert influence.shape == (3,)
    assert abs(influence[1]) < 1e-6
    assert influence[0] > 1e-3 and influence[2] > 1e-3


def test_short_text_uses_fewer_sequences_and_reports_progress(tiny_model):
    messages: list[str] = []
    stats = collect_calibration(tiny_model, _tokens(70), n_seq=8, seq_len=32, progress=messages.append)
    assert stats.n_tokens == 64
    assert messages and "layer 3/3" in messages[-1] and "2 sequences" in messages[-1]  # layer by layer


@pytest.mark.parametrize("n", [0, 31])
def test_too_short_text_is_a_one_line_error(tiny_model, n):
    with pytest.raises(EdgepruneError, match=f"calibration text has {n} tokens, need at least 32") as err:
        collect_calibration(tiny_model, _tokens(n), seq_len=32)
    assert "\n" not in str(err.value)
