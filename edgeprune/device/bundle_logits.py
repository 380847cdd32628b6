"""The reference's log-probabilities in a validation bundle: KLD, top-1 agreement and Δp on the device itself.

llama-perplexity's --kl-divergence-base file keeps every vocabulary entry (about 2·n_vocab bytes per scored
token: 490 MiB for SmolLM2 at 20×512 tokens), and recomputing the reference needs the reference GGUF. A bundle
keeps, per scored position, the reference's k most likely tokens and their log-probs, the log of the mass outside
them (the "rest"), m tokens sampled from the rest in proportion to the reference's probabilities, and the
log-prob of the actual next token. With r = the mass outside the reference's top k:

    KLD ≈ Σ_{i ∈ top-k} p_i (log p_i − log q_i) + r_p log(r_p / r_q) + r_p · mean_s (ρ_s − 1 − log ρ_s),
          ρ_s = (q_s / r_q) / (p_s / r_p) for the sampled tokens s

The first two terms alone are the KL over k + 1 bins, a lower bound of the full KLD (log-sum inequality); on
SmolLM2 they miss 19% of it at k = 32 and still 9% at k = 128, because a small model leaves 5–10% of its mass
and its share of the divergence outside any affordable top k. The third term is an unbiased estimate of the KL
inside the rest bin (the "k3" estimator: E_p[ρ − 1 − log ρ] = KL(p || q), every sample ≥ 0), so the estimate
stays at or above the lower bound and its mean matches the full KLD. With m = 0 only the lower bound remains;
with k = n_vocab there is no rest and the KLD is exact. Top-1 agreement (the candidate's argmax is the reference's
top token) and Δp = q(target) − p(target) are exact.

This module needs only numpy: it runs where torch and transformers are not installed.

File layout: one .npz (np.savez_compressed; `load` reads it with allow_pickle=False). n scored positions.

    format       str scalar       FORMAT, the layout's name and version
    chunks       int32 (c, n_ctx) the evaluation tokens as decoded: chunk i is tokens[i·n_ctx:(i+1)·n_ctx] of the
                                  text tokenized with BOS, its first token replaced by BOS (llama-perplexity's chunks)
    top_ids      int32 (n, k)     the reference's k most likely next tokens, most likely first (ties: lower id first,
                                  as argmax picks)
    top_logp     float16 (n, k)   their log-probs
    rest_logp    float32 (n,)     log of the mass outside the top k, summed over those tokens (no 1 − Σp
                                  cancellation); −inf when the top k are the whole vocabulary
    tail_ids     int32 (n, m)     tokens drawn with replacement from outside the top k, with probability ∝ p
                                  (m = 0 when the top k are the whole vocabulary)
    tail_logp    float16 (n, m)   their log-probs
    target_logp  float32 (n,)     the reference's log-prob of the actual next token (Δp and reference PPL)

The scored positions are llama-perplexity's: n_ctx/2 … n_ctx−2 of every chunk, so m' = n_ctx − 1 − n_ctx/2 per
chunk; row i·m' + j is position n_ctx/2 + j of chunk i and predicts chunks[i, n_ctx/2 + j + 1]. The targets are not
stored: they are read from `chunks`, so a bundle cannot disagree with its own tokens.
"""

from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeprune.core.atomic import atomic_output
from edgeprune.core.errors import EdgepruneError

FORMAT = "edgeprune-reference-topk/1"
# Measured by edgeprune.build.bench.topk on SmolLM2-135M (F16 reference; Q8_0, Q4_0 and Q3_K_M candidates; 20 chunks
# of 512 tokens): k = 32 with 32 tail draws keeps the mean, median, p90 and p99 KLD within 1% of the full-logit
# values for all three, in a 1.14 MiB bundle (235 bytes per scored token). The lower bound alone (m = 0) misses
# 19% of the mean KLD at k = 32 and 9% at k = 128; k = 32 with 8 draws (0.71 MiB) keeps the mean within 0.3% but
# lets the median and p99 drift by 2-2.6%.
DEFAULT_TOP_K = 32
DEFAULT_TAIL_SAMPLES = 32
LOGP_DTYPE = np.float16  # the same suite: float32 log-probs move the mean KLD by < 0.03% and cost 50% more bytes
ROW_BLOCK = 32  # logit rows turned into float64 at a time: bounds memory for 128k vocabularies
ARRAYS = ("chunks", "top_ids", "top_logp", "rest_logp", "tail_ids", "tail_logp", "target_logp")


@dataclass
class TopK:
    """The reference's log-probs at n scored positions; row r predicts targets[r]."""

    ids: np.ndarray  # int32 (n, k), most likely first
    logp: np.ndarray  # float16 or float32 (n, k)
    rest_logp: np.ndarray  # float32 (n,): log of the mass outside the top k
    tail_ids: np.ndarray  # int32 (n, m): drawn from outside the top k, ∝ p
    tail_logp: np.ndarray  # like logp, (n, m)
    targets: np.ndarray  # int32 (n,)
    target_logp: np.ndarray  # float32 (n,)

    def rows(self, start: int, stop: int) -> TopK:
        """Positions start…stop−1: one chunk's rows, to compare with that chunk's candidate logits."""
        return TopK(*(getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)))


def concatenate(parts: Sequence[TopK]) -> TopK:
    """One TopK of consecutive parts (the chunks of an evaluation, summarized one at a time)."""
    return TopK(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(TopK)))


def evaluation_chunks(tokens: Sequence[int], n_ctx: int, max_chunks: int | None, bos: int | None) -> np.ndarray:
    """llama-perplexity's chunks of a text tokenized with BOS: whole n_ctx windows, each starting with `bos`."""
    n_chunks = len(tokens) // n_ctx if max_chunks is None else min(max_chunks, len(tokens) // n_ctx)
    chunks = np.asarray(tokens[:n_chunks * n_ctx], dtype=np.int32).reshape(n_chunks, n_ctx)
    if bos is not None:
        chunks[:, 0] = bos
    return chunks


def chunk_targets(chunks: np.ndarray) -> np.ndarray:
    """The tokens predicted at the scored positions n_ctx/2 … n_ctx−2 of every chunk, in row order."""
    return np.ascontiguousarray(chunks[:, chunks.shape[1] // 2 + 1:]).reshape(-1)


def reference_from_logits(logits_rows: np.ndarray, targets: np.ndarray, k: int = DEFAULT_TOP_K,
                          tail_samples: int = DEFAULT_TAIL_SAMPLES, logp_dtype: type = LOGP_DTYPE) -> TopK:
    """The bundle's summary of the reference's logits (one row per scored position, as llama.cpp gives them).

    The tail is drawn by a generator seeded with the targets: the same logits always give the same bundle, and
    chunks summarized one call at a time draw differently."""
    n, n_vocab = logits_rows.shape
    if not 1 <= k <= n_vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {n_vocab}, not {k}")
    m = tail_samples if k < n_vocab else 0
    rng = np.random.default_rng(np.asarray(targets, dtype=np.int64))
    ids, tail_ids = np.empty((n, k), dtype=np.int32), np.empty((n, m), dtype=np.int32)
    logp, tail_logp = np.empty((n, k), dtype=logp_dtype), np.empty((n, m), dtype=logp_dtype)
    rest_logp, target_logp = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    for start in range(0, n, ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        raw = logits_rows[rows]
        x = np.asarray(raw, dtype=np.float64)
        top = np.argpartition(-raw, k - 1, axis=1)[:, :k]  # llama.cpp's float32: half the time of float64
        top_x = np.take_along_axis(x, top, axis=1)
        order = np.lexsort((top, -top_x), axis=1)  # by logit, then by id: the argmax's tie-break
        top = np.take_along_axis(top, order, axis=1)
        lse, rest, outside = _normalizer_and_rest(x, top)
        ids[rows] = top
        logp[rows] = np.take_along_axis(x, top, axis=1) - lse[:, None]
        rest_logp[rows] = rest - lse
        target_logp[rows] = x[np.arange(len(x)), targets[rows]] - lse
        if m:
            cdf = np.cumsum(outside, axis=1)
            draws = rng.random((len(x), m)) * cdf[:, -1:]  # scaling the draws, not the CDF: one pass less
            drawn = np.stack([np.searchsorted(cdf[r], draws[r], side="right") for r in range(len(x))])
            tail_ids[rows] = drawn
            tail_logp[rows] = np.take_along_axis(x, drawn, axis=1) - lse[:, None]
    return TopK(ids, logp, rest_logp, tail_ids, tail_logp, np.asarray(targets, dtype=np.int32), target_logp)


def divergence_from_topk(topk: TopK, cand_logits_rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per position, like edgeprune.device.validation.quality.divergence_rows: the estimated KLD, whether the
    candidate's top token is the reference's, and both target log-probs (feed it to summarize_divergence)."""
    n = len(topk.targets)
    if cand_logits_rows.shape[0] != n:
        raise EdgepruneError(f"the candidate gave {cand_logits_rows.shape[0]} logit rows for {n} reference positions")
    out = {"kld": np.empty(n), "same_top": np.empty(n, dtype=bool), "ref_logp": topk.target_logp.astype(np.float64),
           "cand_logp": np.empty(n)}
    for start in range(0, n, ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        y = np.asarray(cand_logits_rows[rows], dtype=np.float64)
        ids = topk.ids[rows]
        lse, rest, _ = _normalizer_and_rest(y, ids)
        ref_top, cand_top = topk.logp[rows].astype(np.float64), np.take_along_axis(y, ids, axis=1) - lse[:, None]
        ref_rest, cand_rest = topk.rest_logp[rows].astype(np.float64), rest - lse
        kld = (np.exp(ref_top) * (ref_top - cand_top)).sum(axis=1)
        has_rest = np.isfinite(ref_rest)  # false only when the top k are the whole vocabulary
        if topk.tail_ids.shape[1]:
            cand_tail = np.take_along_axis(y, topk.tail_ids[rows], axis=1) - lse[:, None]
            log_ratio = (cand_tail - cand_rest[:, None]) - (topk.tail_logp[rows] - ref_rest[:, None])
            within_rest = (np.exp(log_ratio) - 1 - log_ratio).mean(axis=1)
        else:
            within_rest = 0.0
        with np.errstate(invalid="ignore"):  # rows without a rest: 0 · (−inf − −inf), masked out below
            kld += np.where(has_rest, np.exp(ref_rest) * (ref_rest - cand_rest + within_rest), 0.0)
        out["kld"][rows] = kld
        out["same_top"][rows] = y.argmax(axis=1) == ids[:, 0]
        out["cand_logp"][rows] = y[np.arange(len(y)), topk.targets[rows]] - lse
    return out


def save(path: str | Path, topk: TopK, chunks: np.ndarray) -> None:
    """Write the reference and its evaluation chunks as one .npz, atomically; `topk` must be scored on `chunks`."""
    if not np.array_equal(chunk_targets(chunks), topk.targets):
        raise EdgepruneError("the reference log-probs were not scored on these chunks: their next tokens differ")
    with atomic_output(path) as tmp, open(tmp, "wb") as out:  # a file object: numpy would add .npz to a name
        np.savez_compressed(out, format=np.array(FORMAT), chunks=chunks.astype(np.int32), top_ids=topk.ids,
                            top_logp=topk.logp, rest_logp=topk.rest_logp, tail_ids=topk.tail_ids,
                            tail_logp=topk.tail_logp, target_logp=topk.target_logp)


def load(path: str | Path) -> tuple[TopK, np.ndarray]:
    """Read a bundle's reference: (its log-probs, the evaluation chunks (c, n_ctx) to decode)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            found = str(data["format"]) if "format" in data.files else "no format field"
            if found != FORMAT:
                raise EdgepruneError(f"{path} is not an edgeprune reference ({found}, expected {FORMAT}): "
                                     "export the validation bundle again with this edgeprune")
            a = {name: data[name] for name in ARRAYS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise EdgepruneError(f"could not read the reference log-probs {path}: {exc}") from exc
    topk = TopK(a["top_ids"], a["top_logp"], a["rest_logp"], a["tail_ids"], a["tail_logp"], chunk_targets(a["chunks"]),
                a["target_logp"])
    if len({len(topk.ids), len(topk.logp), len(topk.rest_logp), len(topk.tail_ids), len(topk.tail_logp),
            len(topk.targets), len(topk.target_logp)}) != 1:
        raise EdgepruneError(f"{path} is damaged: its arrays have different numbers of positions")
    return topk, a["chunks"]


def _normalizer_and_rest(x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise log Σ exp(x), log Σ exp(x) outside the columns `ids` (summed, not subtracted: exact however little
    is left), and exp(x − max) with those columns zeroed; one exp for all three."""
    peak = x.max(axis=1)
    outside = np.exp(x - peak[:, None])
    total = outside.sum(axis=1)
    np.put_along_axis(outside, ids, 0.0, axis=1)
    with np.errstate(divide="ignore"):  # nothing outside: log 0 = −inf
        return np.log(total) + peak, np.log(outside.sum(axis=1)) + peak, outside
