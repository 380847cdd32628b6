"""Pruned models through the converter: llama.cpp must compute what the pruned torch model computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import agreement, llama_cpp_logits, torch_logits

from converters import ConversionInput, write_gguf
from edgeprune.build.loading import load_model
from edgeprune.build.pruning import NoAttention, PruneOptions, prune_model

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. 12345 café"


@pytest.mark.parametrize("options, architecture", [
    (PruneOptions(ffn=0.34, heads=0.25, allocation="uniform", align=16, calib_sequences=8, calib_seq_len=64), "llama"),
    (PruneOptions(ffn=0.34, heads=0.25, allocation="adaptive", align=16, calib_sequences=8, calib_seq_len=64), "deci"),
    (PruneOptions(ffn=0.2, heads=0.6, allocation="adaptive", recovery="bias", align=16, calib_sequences=8,
                  calib_seq_len=64), "deci"),
])
def test_pruned_model_gguf_matches_torch(tiny_bpe_llama, tmp_path, options, architecture):
    loaded = load_model(tiny_bpe_llama)
    calib = torch.randint(3, 380, (4096,), generator=torch.Generator().manual_seed(1)).tolist()
    result = prune_model(loaded.model, calib, options)
    assert result.shape.architecture == architecture and result.removed_params > 0
    path = write_gguf(ConversionInput(loaded.model, loaded.vocab, "tiny", 256), tmp_path / "p.gguf")
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ours, theirs = torch_logits(loaded.model, ids), llama_cpp_logits(path, ids)
    _, kld = agreement(ours, theirs)
    assert kld <= 1e-3
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05  # a random tiny model has near-ties that F16 rounding may flip
    assert clear.sum() > len(ids) // 2
    assert (ours.argmax(-1) == theirs.argmax(-1))[clear].all()
    if options.heads > 0.5:  # some layer lost all its heads: deci writes n_head = 0 for it
        assert any(isinstance(b.self_attn, NoAttention) for b in loaded.model.model.layers)
