"""Quality: llama-perplexity's perplexity of a GGUF and, against a reference, its KL divergence, with the float64
maths both rest on. The parent asks (`measure_perplexity`); the child process scores (`quality_task`).

The reference is a GGUF run alongside, or a bundle's top-k file (edgeprune.device.bundle_logits), which also
holds the chunks to decode.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from edgeprune.core.errors import EdgepruneError
from edgeprune.core.texts import Text, check_evaluation_length
from edgeprune.device import bundle_logits
from edgeprune.device.llamacpp.child import print_to_stderr, report, run_child
from edgeprune.device.llamacpp.runtime import Model, Runtime
from edgeprune.device.validation.results import DivergenceResult, PerplexityResult

MIN_EVAL_CTX = 64  # a perplexity chunk scores its second half: shorter chunks score tokens with almost no context
ROW_BLOCK = 32  # logit rows turned into float64 at a time: bounds memory for 128k vocabularies
# Scoring stops once the standard errors of mean log-PPL and of mean KLD are both within this share of their
# estimates (or the chunk budget is spent). Measured on the demo's export (SmolLM2 Q5_K_M against its F16, the odd
# Python reference topics, 20 chunks of 512; `edgeprune export ... --eval-fixed`): the topics differ so much that
# log-PPL's standard error over chunks stays above 3% of it even at 20 chunks (3.5% after 4, 3.2% after 20; KLD's
# 3.0% and 1.7%), so 2% would always spend the budget. At 5% scoring stops after 4 chunks, whose PPL 11.76 and mean
# KLD 0.00584 lie within two standard errors of the 20 chunks' 11.55 and 0.00605, in a fifth of the time.
DEFAULT_PRECISION = 0.05
# The precision rule never stops before this many chunks: a standard error from fewer chunks is itself noise.
MIN_CHUNKS = 4


def check_evaluation_options(n_ctx: int, chunks: int | None, precision: float | None = None) -> None:
    """The perplexity settings, checked before any model is loaded. `precision` None scores exactly `chunks`
    (llama-perplexity's way); otherwise `chunks` is the budget the precision rule may stop short of."""
    if n_ctx < MIN_EVAL_CTX:
        raise EdgepruneError(f"--eval-ctx {n_ctx} is too small for perplexity: use {MIN_EVAL_CTX} or more "
                             "(512 is llama-perplexity's default)")
    if chunks is not None and chunks < 1:
        raise EdgepruneError(f"--eval-chunks {chunks} scores nothing: give 1 or more (20 is the default)")
    if precision is None:
        return
    if not 0 < precision < 1:
        raise EdgepruneError(f"--eval-precision {precision:g} is not a share of the estimate: give a number between "
                             f"0 and 1 ({DEFAULT_PRECISION:g} is the default)")
    if chunks is not None and chunks < MIN_CHUNKS:
        raise EdgepruneError(f"--eval-chunks {chunks} is below the {MIN_CHUNKS} chunks the precision rule needs to "
                             f"estimate its own standard error: give {MIN_CHUNKS} or more, or --eval-fixed to score "
                             f"exactly {chunks}")


def chunk_stderr(per_chunk) -> float | None:
    """The standard error of the mean of per-chunk values; None from one chunk. Chunks are the samples: the tokens
    of one chunk share its text, so a per-token standard error (llama-perplexity's) is too small by their
    correlation."""
    if len(per_chunk) < 2:
        return None
    return float(np.std(per_chunk, ddof=1)) / math.sqrt(len(per_chunk))


def relative_stderr(per_chunk) -> float:
    """`chunk_stderr` over the mean; infinite where there is no error or no positive mean to be a share of."""
    stderr, mean = chunk_stderr(per_chunk), float(np.mean(per_chunk))
    return math.inf if stderr is None or mean <= 0 else stderr / mean


def measure_perplexity(path: Path, text: Text | None, *, reference_gguf: str | Path | None = None,
                       reference_topk: str | Path | None = None, save_topk: str | Path | None = None,
                       against_saved: bool = False, top_k: int | None = None, n_ctx: int = 512,
                       max_chunks: int | None = 20, precision: float | None = None, threads: int | None = None,
                       runtime: Runtime | None = None, progress: Callable[[str], None] = print_to_stderr
                       ) -> tuple[PerplexityResult, DivergenceResult | None]:
    """llama-perplexity's PPL of `path` on `text` and, with a reference, its KL divergence, in a child process.

    The reference is a GGUF, whose top-k log-probs are also written to `save_topk` when given (a validation
    bundle's; without a reference, `path`'s own are: it is then the reference, and `against_saved` scores it
    against them as a candidate with its tensors would be, for a build's `ScoreCache`), or such a top-k file
    (`reference_topk`), which brings its own evaluation chunks (`text` and `n_ctx` are then unused; `max_chunks`
    takes its first chunks). The candidate runs with `runtime`'s KV cache type, flash attention and
    threads (a quantized KV cache costs quality too), or llama.cpp's defaults on `threads`; the reference GGUF
    with llama.cpp's defaults. With a `precision`, scoring stops before `max_chunks` once the standard errors of
    mean log-PPL and mean KLD are within that share of their estimates (`MIN_CHUNKS` at least)."""
    check_evaluation_options(n_ctx, max_chunks, precision)
    runtime = runtime or Runtime(n_ctx, threads=threads or os.cpu_count() or 1)
    if save_topk is not None and reference_topk is not None:
        raise EdgepruneError("internal error: top-k log-probs are saved from a reference GGUF, not from a top-k file")
    quality = run_child(quality_task, {
        "gguf": str(path), "reference": str(reference_gguf) if reference_gguf else None,
        "reference_topk": str(reference_topk) if reference_topk else None,
        "save_topk": str(save_topk) if save_topk else None, "against_saved": against_saved,
        "top_k": top_k or bundle_logits.DEFAULT_TOP_K,
        "text": text.content if text else None, "text_name": text.name if text else None, "n_ctx": n_ctx,
        "max_chunks": max_chunks, "precision": precision, "runtime": dataclasses.asdict(runtime),
    }, f"measuring the perplexity of {path}", progress)
    divergence = DivergenceResult(**quality["divergence"]) if quality["divergence"] else None
    return PerplexityResult(**quality["perplexity"]), divergence


# --- the maths ----------------------------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64: float32 loses the small probabilities that KL divergence sums."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _normalizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise exp(x − max) in float64, its sum and log Σ exp(x): one exp per logit, no log-prob matrix."""
    peak = x.max(axis=1)
    e = x.astype(np.float64)
    e -= peak[:, None]
    np.exp(e, out=e)
    total = e.sum(axis=1)
    return e, total, np.log(total) + peak


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Log-probability each logits row gives its target token (next-token NLL is its negation)."""
    out = np.empty(len(targets))
    for start in range(0, len(targets), ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        x = logits[rows]
        out[rows] = x[np.arange(len(x)), targets[rows]] - _normalizer(x)[2]
    return out


def divergence_rows(ref_logits: np.ndarray, cand_logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per position: KL(ref || cand), whether both pick the same top token, and both target log-probs.

    KL = Σ p·(x − y) − lse(x) + lse(y) for logits x, y (Σ p = 1): the float64 value of Σ p·(log p − log q) within
    3e-14 on SmolLM2, without building either log-prob matrix (255 -> 116 ms per 512-token chunk there)."""
    n = len(targets)
    out = {"kld": np.empty(n), "same_top": np.empty(n, dtype=bool), "ref_logp": np.empty(n), "cand_logp": np.empty(n)}
    for start in range(0, n, ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        x, y = ref_logits[rows], cand_logits[rows]
        p_scaled, ref_total, ref_lse = _normalizer(x)
        cand_lse = _normalizer(y)[2]
        diff = x.astype(np.float64)
        diff -= y
        idx, tgt = np.arange(len(x)), targets[rows]
        out["kld"][rows] = np.einsum("ij,ij->i", p_scaled, diff) / ref_total - ref_lse + cand_lse
        out["same_top"][rows] = x.argmax(axis=1) == y.argmax(axis=1)
        out["ref_logp"][rows] = x[idx, tgt] - ref_lse
        out["cand_logp"][rows] = y[idx, tgt] - cand_lse
    return out


def summarize_divergence(rows: dict[str, np.ndarray], reference_gguf: str) -> DivergenceResult:
    """Aggregate `divergence_rows` over all chunks; percentiles interpolate linearly like llama-perplexity's."""
    kld = rows["kld"]
    p_diff = np.exp(rows["cand_logp"]) - np.exp(rows["ref_logp"])
    return DivergenceResult(
        kld_mean=float(kld.mean()),
        kld_median=float(np.median(kld)),
        kld_p90=float(np.percentile(kld, 90)),
        kld_p99=float(np.percentile(kld, 99)),
        kld_max=float(kld.max()),
        top1_agreement=float(rows["same_top"].mean()),
        delta_p_mean=float(p_diff.mean()),
        delta_p_rms=float(np.sqrt(np.mean(p_diff**2))),
        n_tokens=len(kld),
        reference_gguf=reference_gguf,
        reference_ppl=float(math.exp(-rows["ref_logp"].mean())),
    )


# --- the child side: runs in the measuring process ---------------------------------------------------------


def quality_task(task: dict) -> dict:
    """Perplexity and KL divergence the llama-perplexity way, chunk by chunk. The reference is a GGUF (whose
    top-k log-probs are saved for a validation bundle when `save_topk` names a file) or a bundle's top-k file,
    which also holds the chunks to decode."""
    runtime = task["runtime"]
    report(f"loading {task['gguf']}")
    cand = Model(task["gguf"], n_ctx=task["n_ctx"], n_batch=task["n_ctx"], threads=runtime["threads"],
                 kv_cache_type=runtime["kv_cache_type"], flash_attention=runtime["flash_attention"])
    ref, topk, chunks = _reference_and_chunks(task, cand)
    rows, saved, chunks, per_chunk = _score_chunks(task, cand, ref, topk, chunks)
    n_chunks, n_ctx = chunks.shape
    if saved:
        bundle_logits.save(task["save_topk"], bundle_logits.concatenate(saved), chunks)
    merged = {key: np.concatenate(values) for key, values in rows.items()}
    nll_mean = -float(merged["cand_logp"].mean())
    perplexity = {"ppl": math.exp(nll_mean), "nll_mean": nll_mean, "n_chunks": n_chunks, "n_ctx": n_ctx,
                  "n_tokens_scored": n_chunks * (n_ctx - 1 - n_ctx // 2), "kv_cache_type": runtime["kv_cache_type"],
                  "flash_attention": runtime["flash_attention"],
                  "nll_stderr": chunk_stderr(per_chunk["nll"]),
                  "precision_target": task.get("precision")}
    divergence = None
    if "kld" in merged:
        report("divergence: summarizing")
        divergence = dataclasses.asdict(summarize_divergence(merged, task["reference"] or task["reference_topk"]
                                                             or task["save_topk"]))
        divergence["kld_stderr"] = chunk_stderr(per_chunk["kld"])
    return {"perplexity": perplexity, "divergence": divergence}


def _reference_and_chunks(task: dict, cand: Model) -> tuple[Model | None, bundle_logits.TopK | None, np.ndarray]:
    """The reference (a GGUF's model, or a bundle's top-k log-probs; neither without one) and the chunks to
    decode: the top-k file's first ones, or the text's, cut the llama-perplexity way."""
    if task.get("reference_topk"):
        topk, chunks = bundle_logits.load(task["reference_topk"])
        chunks = chunks[:task["max_chunks"]]  # the first chunks: their rows come first in topk
        if int(chunks.max()) >= cand.n_vocab:
            raise EdgepruneError(f"{task['gguf']} has {cand.n_vocab} tokens but the bundle's text uses token "
                                 f"{int(chunks.max())}: the bundle belongs to another model")
        return None, topk, chunks
    ref = None
    tokens = cand.tokenize(task["text"])
    if task["reference"]:
        report(f"loading reference {task['reference']}")
        ref = Model(task["reference"], n_ctx=task["n_ctx"], n_batch=task["n_ctx"], threads=task["runtime"]["threads"])
        if ref.n_vocab != cand.n_vocab or ref.tokenize(task["text"]) != tokens:
            raise EdgepruneError(
                f"{task['gguf']} and reference {task['reference']} have different vocabularies: KL divergence "
                "needs a reference with the same tokenizer (the unpruned, unquantized model as GGUF)"
            )
    check_evaluation_length(task["text_name"], len(tokens), task["n_ctx"], task["max_chunks"])
    chunks = bundle_logits.evaluation_chunks(tokens, task["n_ctx"], task["max_chunks"],
                                             cand.bos if cand.add_bos else None)
    return ref, None, chunks


def _score_chunks(task: dict, cand: Model, ref: Model | None, topk: bundle_logits.TopK | None, chunks: np.ndarray
                  ) -> tuple[dict[str, list[np.ndarray]], list, np.ndarray, dict[str, list[float]]]:
    """Each chunk's per-position rows (`divergence_rows`' keys, or only the candidate's log-probs without a
    reference) and the top-k log-probs saved on the way, reported chunk by chunk, until the chunks run out or
    `task["precision"]` (when set) is reached; the chunks scored, and each one's mean NLL and KLD."""
    n_chunks, n_ctx = chunks.shape
    first = n_ctx // 2
    per_chunk = n_ctx - 1 - first
    rows: dict[str, list[np.ndarray]] = {}
    saved: list = []
    nll, kld = [], []  # per chunk
    for i in range(n_chunks):
        chunk, targets = chunks[i].tolist(), chunks[i, first + 1:]
        cand_logits = cand.score(chunk, first)
        if topk is not None:
            part = bundle_logits.divergence_from_topk(topk.rows(i * per_chunk, (i + 1) * per_chunk), cand_logits)
        elif ref is not None:
            ref_logits = ref.score(chunk, first)
            part = divergence_rows(ref_logits, cand_logits, targets)
            if task.get("save_topk"):
                saved.append(bundle_logits.reference_from_logits(ref_logits, targets, task["top_k"]))
        else:
            if task.get("save_topk"):  # this model is the reference others will be measured against
                saved.append(bundle_logits.reference_from_logits(cand_logits, targets, task["top_k"]))
            part = (bundle_logits.divergence_from_topk(saved[-1], cand_logits) if task.get("against_saved")
                    else {"cand_logp": token_logprobs(cand_logits, targets)})
        for key, values in part.items():
            rows.setdefault(key, []).append(values)
        nll.append(-float(part["cand_logp"].mean()))
        line = f"perplexity chunk {i + 1}/{n_chunks}: PPL {math.exp(np.mean(nll)):.3f}"
        if "kld" in part:
            kld.append(float(part["kld"].mean()))
            line += f", mean KLD {np.mean(kld):.5f}"
        report(line)
        if _precise_enough(task.get("precision"), nll, kld):
            report(f"perplexity: standard errors within {task['precision']:.0%} of the estimates after {i + 1} "
                   f"chunks of {n_chunks}")
            return rows, saved, chunks[:i + 1], {"nll": nll, "kld": kld}
    return rows, saved, chunks, {"nll": nll, "kld": kld}


def _precise_enough(precision: float | None, nll: list[float], kld: list[float]) -> bool:
    """Whether the precision rule stops here: enough chunks, and mean log-PPL and mean KLD (when measured) both
    known within `precision` of themselves."""
    if precision is None or len(nll) < MIN_CHUNKS:
        return False
    return all(relative_stderr(values) <= precision for values in (nll, kld) if values)
