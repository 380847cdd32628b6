"""The validation bundle's reference log-probs on synthetic logits: the top-k KLD against the full one, the file
round trip, and an import that works where torch and transformers are missing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgeprune.device.bundle_logits import (
    TopK,
    chunk_targets,
    concatenate,
    divergence_from_topk,
    evaluation_chunks,
    load,
    reference_from_logits,
    save,
)
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.validation.quality import divergence_rows, summarize_divergence

VOCAB, N = 500, 96
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def logits_pair(scale: float, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference logits (peakier as `scale` grows), a candidate that perturbs them, and random targets."""
    rng = np.random.default_rng(seed)
    ref = (scale * rng.standard_normal((N, VOCAB))).astype(np.float32)
    cand = (ref + noise * rng.standard_normal((N, VOCAB))).astype(np.float32)
    return ref, cand, rng.integers(0, VOCAB, N)


def full_kld(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(cand)
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


def test_kld_is_exact_when_k_is_the_vocabulary():
    ref, cand, targets = logits_pair(scale=2.0, noise=0.5)
    exact = reference_from_logits(ref, targets, k=VOCAB, logp_dtype=np.float64)
    assert np.all(exact.rest_logp == -np.inf) and exact.tail_ids.shape == (N, 0)
    np.testing.assert_allclose(divergence_from_topk(exact, cand)["kld"], full_kld(ref, cand), rtol=1e-9, atol=1e-12)
    stored = reference_from_logits(ref, targets, k=VOCAB)  # float16 log-probs, as bundles store them
    np.testing.assert_allclose(divergence_from_topk(stored, cand)["kld"].mean(), full_kld(ref, cand).mean(), rtol=1e-3)


@pytest.mark.parametrize("k", [1, 4, 32, VOCAB // 2])
def test_without_tail_samples_the_kld_is_a_lower_bound(k):
    ref, cand, targets = logits_pair(scale=2.0, noise=1.0, seed=k)
    bound = reference_from_logits(ref, targets, k=k, tail_samples=0, logp_dtype=np.float64)
    estimate = divergence_from_topk(bound, cand)["kld"]
    full = full_kld(ref, cand)
    assert np.all(estimate >= -1e-12) and np.all(estimate <= full + 1e-12)
    assert np.all(estimate < full)  # with mass left outside the top k, some divergence is hidden in the rest bin


def test_lower_bound_is_close_for_peaked_distributions():
    ref, cand, targets = logits_pair(scale=8.0, noise=0.5)
    full = full_kld(ref, cand)
    estimate = divergence_from_topk(reference_from_logits(ref, targets, k=16, tail_samples=0), cand)["kld"]
    assert abs(estimate.mean() / full.mean() - 1) < 0.02


def test_tail_samples_recover_what_the_lower_bound_misses_on_flat_distributions():
    ref, cand, targets = logits_pair(scale=1.0, noise=0.5)
    full = full_kld(ref, cand)
    bound = divergence_from_topk(reference_from_logits(ref, targets, k=16, tail_samples=0), cand)["kld"]
    assert bound.mean() < 0.3 * full.mean()
    errors = []
    for seed in range(20):  # other targets, other draws: the estimate is unbiased over them
        other = np.random.default_rng(seed).integers(0, VOCAB, N)
        sampled = divergence_from_topk(reference_from_logits(ref, other, k=16, tail_samples=32), cand)["kld"]
        assert np.all(sampled >= bound - 1e-6)  # every sample adds ρ − 1 − log ρ ≥ 0
        assert abs(sampled.mean() / full.mean() - 1) < 0.1
        errors.append(sampled.mean() / full.mean() - 1)
    assert abs(np.mean(errors)) < 0.02


def test_tail_draws_follow_the_reference_outside_its_top_k():
    logits = np.log(np.array([[0.4, 0.3, 0.15, 0.1, 0.05]], dtype=np.float32))
    topk = reference_from_logits(logits, np.array([2]), k=2, tail_samples=40_000, logp_dtype=np.float64)
    assert list(topk.ids[0]) == [0, 1]
    assert topk.rest_logp[0] == pytest.approx(np.log(0.3), rel=1e-6)
    counts = np.bincount(topk.tail_ids[0], minlength=5) / 40_000
    np.testing.assert_allclose(counts, [0, 0, 0.5, 1 / 3, 1 / 6], atol=0.01)
    np.testing.assert_allclose(topk.tail_logp[0], logits[0, topk.tail_ids[0]], rtol=1e-6)


def test_tail_draws_are_reproducible_and_differ_between_chunks():
    ref, _, targets = logits_pair(scale=1.0, noise=0.5)
    first, again = (reference_from_logits(ref, targets, k=4) for _ in range(2))
    np.testing.assert_array_equal(first.tail_ids, again.tail_ids)
    assert not np.array_equal(first.tail_ids, reference_from_logits(ref, targets[::-1].copy(), k=4).tail_ids)


def test_top1_target_log_probs_and_summary_agree_with_the_full_logits():
    ref, cand, targets = logits_pair(scale=2.0, noise=1.0)
    ref[0, :2] = ref[0].max() + 1  # a tie for the top token: the lower id wins, as argmax decides
    cand[0, 1] = cand[0].max() + 1
    rows = divergence_from_topk(reference_from_logits(ref, targets, k=8), cand)
    full = divergence_rows(ref, cand, targets)
    assert set(rows) == set(full)
    assert not rows["same_top"][0]
    np.testing.assert_array_equal(rows["same_top"], full["same_top"])
    assert 0 < rows["same_top"].mean() < 1
    np.testing.assert_allclose(rows["cand_logp"], full["cand_logp"], rtol=1e-12)
    np.testing.assert_allclose(rows["ref_logp"], full["ref_logp"], rtol=1e-6)  # stored as float32
    summary, exact = summarize_divergence(rows, "ref.gguf"), summarize_divergence(full, "ref.gguf")
    assert summary.top1_agreement == exact.top1_agreement
    assert summary.delta_p_mean == pytest.approx(exact.delta_p_mean, rel=1e-5)
    assert summary.reference_ppl == pytest.approx(exact.reference_ppl, rel=1e-6)
    assert 0 < summary.kld_mean <= exact.kld_mean


def test_chunks_are_llama_perplexity_windows_and_targets_their_scored_next_tokens():
    tokens = list(range(100, 100 + 3 * 16 + 5))
    chunks = evaluation_chunks(tokens, 16, None, bos=1)
    assert chunks.shape == (3, 16) and chunks.dtype == np.int32
    assert list(chunks[:, 0]) == [1, 1, 1]
    assert list(chunks[2, 1:]) == tokens[33:48]
    assert evaluation_chunks(tokens, 16, 2, bos=None)[1, 0] == tokens[16]
    # positions 8 … 14 are scored; position p predicts token p + 1
    assert list(chunk_targets(chunks)) == [t for c in range(3) for t in tokens[c * 16 + 9:c * 16 + 16]]


def reference_on_chunks(k: int = 8) -> tuple[TopK, np.ndarray]:
    chunks = evaluation_chunks(list(np.random.default_rng(1).integers(0, VOCAB, 4 * 32)), 32, None, bos=1)
    targets = chunk_targets(chunks)
    logits = (3 * np.random.default_rng(2).standard_normal((len(targets), VOCAB))).astype(np.float32)
    return reference_from_logits(logits, targets, k=k), chunks


def test_save_load_round_trips_exactly(tmp_path):
    topk, chunks = reference_on_chunks()
    save(tmp_path / "reference.npz", topk, chunks)
    assert [p.name for p in tmp_path.iterdir()] == ["reference.npz"]
    loaded, loaded_chunks = load(tmp_path / "reference.npz")
    np.testing.assert_array_equal(loaded_chunks, chunks)
    for field in ("ids", "logp", "rest_logp", "tail_ids", "tail_logp", "targets", "target_logp"):
        before, after = getattr(topk, field), getattr(loaded, field)
        assert after.dtype == before.dtype, field
        np.testing.assert_array_equal(after, before, err_msg=field)


def test_a_bundle_is_summarized_chunk_by_chunk_and_read_back_chunk_by_chunk():
    whole, chunks = reference_on_chunks()
    per_chunk = len(whole.targets) // len(chunks)
    parts = [whole.rows(i * per_chunk, (i + 1) * per_chunk) for i in range(len(chunks))]
    assert [len(p.targets) for p in parts] == [per_chunk] * len(chunks)
    np.testing.assert_array_equal(parts[1].targets, chunk_targets(chunks[1:2]))
    again = concatenate(parts)
    for field in ("ids", "logp", "rest_logp", "tail_ids", "tail_logp", "targets", "target_logp"):
        np.testing.assert_array_equal(getattr(again, field), getattr(whole, field), err_msg=field)


def test_save_refuses_chunks_the_reference_was_not_scored_on(tmp_path):
    topk, chunks = reference_on_chunks()
    other = chunks.copy()
    other[0, -1] += 1
    with pytest.raises(EdgepruneError, match="not scored on these chunks"):
        save(tmp_path / "reference.npz", topk, other)
    assert list(tmp_path.iterdir()) == []


def test_load_names_files_that_are_not_references(tmp_path):
    np.savez_compressed(tmp_path / "other.npz", format=np.array("something-else/1"))
    with pytest.raises(EdgepruneError, match="not an edgeprune reference"):
        load(tmp_path / "other.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(EdgepruneError, match="could not read"):
        load(tmp_path / "broken.npz")


BLOCKER = """
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked: this test runs where it is not installed")

sys.meta_path.insert(0, Blocker())
"""

WITHOUT_TORCH = """
import sys
import numpy as np
for blocked in ("torch", "transformers"):
    try:
        __import__(blocked)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the blocker let {blocked} through")
from edgeprune.device import bundle_logits
chunks = bundle_logits.evaluation_chunks(list(range(64)), 16, None, bos=1)
logits = np.random.default_rng(0).standard_normal((len(bundle_logits.chunk_targets(chunks)), 80))
topk = bundle_logits.reference_from_logits(logits, bundle_logits.chunk_targets(chunks), k=4)
bundle_logits.save(sys.argv[1], topk, chunks)
rows = bundle_logits.divergence_from_topk(bundle_logits.load(sys.argv[1])[0], logits)
assert np.allclose(rows["kld"], 0, atol=1e-2), rows["kld"]
print(sorted(name for name in sys.modules if name.startswith(("torch", "transformers", "converters"))))
"""


def test_imports_and_works_without_torch_or_transformers(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(PACKAGE_ROOT)]))
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(tmp_path / "reference.npz")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
