"""Top-k suite: how close the validation bundle's KLD comes to the full-logit KLD, and what each layout weighs.

A bundle (edgeprune.device.bundle_logits) keeps the reference's k most likely tokens per scored position, the mass outside
them, and m tokens drawn from that rest. This suite scores SmolLM2's F16 reference and three quantized candidates
on the same llama-perplexity chunks through llama.cpp, computes the full KLD
(edgeprune.device.validation.quality.divergence_rows) and the bundle's estimate for every (k, m) from the same logits, and writes each bundle to weigh it. It is what
chose bundle_logits.DEFAULT_TOP_K, DEFAULT_TAIL_SAMPLES and LOGP_DTYPE.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from converters import ConversionInput, write_gguf

from edgeprune.device.bundle_logits import (
    DEFAULT_TAIL_SAMPLES,
    DEFAULT_TOP_K,
    TopK,
    chunk_targets,
    concatenate,
    divergence_from_topk,
    evaluation_chunks,
    reference_from_logits,
    save,
)
from edgeprune.core.fetch import fetch_smollm2
from edgeprune.build.loading import load_model
from edgeprune.build.quantize import quantize_gguf
from edgeprune.core.texts import default_evaluation_text
from edgeprune.device.llamacpp.runtime import Model
from edgeprune.device.validation.quality import divergence_rows, summarize_divergence
from edgeprune.build.bench.tables import SuiteResult, table

KS = (1, 4, 8, 16, 32, 64, 128)
TAILS = (0, 8, 32)  # 0: the lower bound alone
FLOAT32_KS = (8, 32, 128)  # float32 log-probs are tried at these k, with the default tail, against float16
CANDIDATES = ("Q8_0", "Q4_K_M", "Q4_0", "Q3_K_M")
EVAL_CTX, EVAL_CHUNKS = 512, 20
LAYOUTS = [(k, m, "float16") for k in KS for m in TAILS] + [(k, DEFAULT_TAIL_SAMPLES, "float32") for k in FLOAT32_KS]
DTYPES = {"float16": np.float16, "float32": np.float32}


def run(progress) -> SuiteResult:
    evaluation = default_evaluation_text()
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-topk-") as tmp:
        loaded = load_model(fetch_smollm2(), progress=progress)
        reference = write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length),
                               Path(tmp) / "F16.gguf", "F16", progress)
        del loaded  # give the torch model's memory to llama.cpp
        paths = {q: quantize_gguf(reference, Path(tmp) / f"{q}.gguf", q, progress=progress).path for q in CANDIDATES}
        ref = Model(str(reference), n_ctx=EVAL_CTX, n_batch=EVAL_CTX, threads=threads)
        models = {q: Model(str(path), n_ctx=EVAL_CTX, n_batch=EVAL_CTX, threads=threads) for q, path in paths.items()}
        n_vocab = ref.n_vocab
        chunks = evaluation_chunks(ref.tokenize(evaluation.content), EVAL_CTX, EVAL_CHUNKS,
                                   ref.bos if ref.add_bos else None)
        full: dict[str, list[dict]] = {q: [] for q in CANDIDATES}
        estimates: dict[tuple, list[dict]] = {}
        references: dict[tuple, list[TopK]] = {layout: [] for layout in LAYOUTS}
        for i, chunk in enumerate(chunks):
            targets = chunk_targets(chunk[None])
            ref_logits = ref.score(chunk, EVAL_CTX // 2)
            for layout in LAYOUTS:
                k, m, dtype = layout
                references[layout].append(reference_from_logits(ref_logits, targets, k, m, DTYPES[dtype]))
            for q, model in models.items():
                cand_logits = model.score(chunk, EVAL_CTX // 2)
                full[q].append(divergence_rows(ref_logits, cand_logits, targets))
                for layout in LAYOUTS:
                    estimates.setdefault((q, *layout), []).append(divergence_from_topk(references[layout][-1],
                                                                                       cand_logits))
            progress(f"top-k: chunk {i + 1}/{len(chunks)}")
        del ref, models
        bundle_bytes = {}
        for layout, parts in references.items():
            path = Path(tmp) / "reference.npz"
            save(path, concatenate(parts), chunks)
            bundle_bytes[layout] = path.stat().st_size
    n_scored = chunks.shape[0] * (EVAL_CTX - 1 - EVAL_CTX // 2)
    merged_full = {q: _merge(parts) for q, parts in full.items()}
    rows = [_row(q, layout, merged_full[q], _merge(estimates[(q, *layout)]), bundle_bytes[layout], n_scored)
            for q in CANDIDATES for layout in LAYOUTS]
    return SuiteResult(
        title="Validation bundle: the reference's top-k log-probs against the full-logit KLD, SmolLM2-135M-Instruct",
        method=(
            f"An F16 GGUF written by edgeprune from SmolLM2-135M-Instruct is the reference; {', '.join(CANDIDATES)} "
            f"are quantized from it by llama.cpp. All four are scored by llama.cpp on the same llama-perplexity "
            f"chunks of '{evaluation.name}' ({len(chunks)} chunks of {EVAL_CTX} tokens, positions {EVAL_CTX // 2} … "
            f"{EVAL_CTX - 2} scored: {n_scored} positions). The full KLD is edgeprune.device.validation's (float64 softmax over "
            f"all {n_vocab} tokens). The bundle's KLD is edgeprune.device.bundle_logits' estimate from the reference's k most "
            f"likely tokens, the rest mass and m tokens drawn from the rest (m = 0: the k + 1-bin lower bound alone), "
            f"computed from the same logits. Errors are bundle minus full, relative to full; ± is one standard error "
            f"of the mean error, from its spread over the positions. Bundle size is the .npz as written (compressed, "
            f"evaluation tokens included); llama-perplexity's --kl-divergence-base file would take "
            f"{(2 * n_vocab + 8) * n_scored / 2**20:.0f} MiB for the same tokens."
        ),
        data={"evaluation_text": evaluation.name, "n_ctx": EVAL_CTX, "n_chunks": len(chunks), "n_scored": n_scored,
              "n_vocab": n_vocab, "rows": rows},
        sections=["## Mean KLD error and bundle size per layout (float16 log-probs)", _size_table(rows),
                  "## float16 against float32 log-probs", _dtype_table(rows),
                  f"## Per candidate at the default layout (k = {DEFAULT_TOP_K}, m = {DEFAULT_TAIL_SAMPLES})",
                  _detail_table(rows)],
    )


def _merge(parts: list[dict]) -> dict:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _row(quant: str, layout: tuple, full: dict, estimate: dict, bundle_bytes: int, n_scored: int) -> dict:
    k, m, dtype = layout
    exact, approx = summarize_divergence(full, "F16"), summarize_divergence(estimate, "F16")
    error = estimate["kld"] - full["kld"]
    return {
        "candidate": quant, "k": k, "tail_samples": m, "logp_dtype": dtype,
        "kld_mean_full": exact.kld_mean, "kld_mean_bundle": approx.kld_mean,
        "kld_mean_error": approx.kld_mean / exact.kld_mean - 1,
        "kld_mean_error_stderr": float(error.std() / math.sqrt(len(error)) / exact.kld_mean),
        "kld_median_error": approx.kld_median / exact.kld_median - 1,
        "kld_p90_error": approx.kld_p90 / exact.kld_p90 - 1,
        "kld_p99_error": approx.kld_p99 / exact.kld_p99 - 1,
        "token_error_rms": float(np.sqrt(np.mean(error**2)) / exact.kld_mean),
        "top1_full": exact.top1_agreement, "top1_bundle": approx.top1_agreement,
        "top1_positions_differing": int((full["same_top"] != estimate["same_top"]).sum()),
        "delta_p_mean_difference": approx.delta_p_mean - exact.delta_p_mean,
        "reference_ppl_relative_difference": approx.reference_ppl / exact.reference_ppl - 1,
        "bundle_bytes": bundle_bytes, "bundle_bytes_per_token": bundle_bytes / n_scored,
        "array_bytes_per_token": (k + m) * (4 + np.dtype(DTYPES[dtype]).itemsize) + 8,
    }


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def _by_layout(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    by: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r["k"], r["tail_samples"], r["logp_dtype"]), {})[r["candidate"]] = r
    return by


def _size_table(rows: list[dict]) -> str:
    cells = []
    for (k, m, dtype), per in _by_layout(rows).items():
        if dtype != "float16":
            continue
        any_row = per[CANDIDATES[0]]
        cells.append([k, m, any_row["array_bytes_per_token"], f"{any_row['bundle_bytes_per_token']:.0f}",
                      f"{any_row['bundle_bytes'] / 2**20:.2f}",
                      *(f"{_pct(per[q]['kld_mean_error'])} ± {100 * per[q]['kld_mean_error_stderr']:.2f}"
                        for q in CANDIDATES),
                      "yes" if all(per[q]["top1_positions_differing"] == 0 for q in CANDIDATES) else "no"])
    return table(["k", "m", "array bytes/token", "file bytes/token", "bundle MiB",
                  *(f"{q} mean-KLD error" for q in CANDIDATES), "top-1 agreement equal"], cells)


def _dtype_table(rows: list[dict]) -> str:
    by = _by_layout(rows)
    cells = [[k, m, f"{by[(k, m, 'float16')][CANDIDATES[0]]['bundle_bytes'] / 2**20:.2f} / "
                    f"{by[(k, m, 'float32')][CANDIDATES[0]]['bundle_bytes'] / 2**20:.2f}",
              *(f"{_pct(by[(k, m, 'float16')][q]['kld_mean_error'])} / {_pct(by[(k, m, 'float32')][q]['kld_mean_error'])}"
                for q in CANDIDATES)]
             for k, m, dtype in LAYOUTS if dtype == "float32"]
    return table(["k", "m", "bundle MiB f16 / f32", *(f"{q} mean-KLD error f16 / f32" for q in CANDIDATES)], cells)


def _detail_table(rows: list[dict]) -> str:
    cells = [[r["candidate"], f"{r['kld_mean_full']:.5f}", f"{r['kld_mean_bundle']:.5f}", _pct(r["kld_mean_error"]),
              _pct(r["kld_median_error"]), _pct(r["kld_p90_error"]), _pct(r["kld_p99_error"]),
              f"{r['token_error_rms']:.3f}", f"{100 * r['top1_full']:.2f}% / {100 * r['top1_bundle']:.2f}%",
              f"{r['delta_p_mean_difference']:.1e}", f"{r['reference_ppl_relative_difference']:.1e}"]
             for r in rows if (r["k"], r["tail_samples"], r["logp_dtype"]) == (DEFAULT_TOP_K, DEFAULT_TAIL_SAMPLES,
                                                                              "float16")]
    return table(["candidate", "mean KLD full", "mean KLD bundle", "mean error", "median error", "p90 error",
                  "p99 error", "per-token rms error / mean KLD", "top-1 full / bundle", "Δp mean difference",
                  "reference PPL difference"], cells)
