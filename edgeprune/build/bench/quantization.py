"""Quantization suite: what each llama.cpp type, with and without edgeprune's importance matrix, costs SmolLM2.

Every row is quantized from one F16 reference by llama.cpp's own quantizer and measured by `validate_gguf`
against that reference, so the rows differ only in type and imatrix. SmolLM2's 576-wide rows make K-quants
fall back to other types (see FACTS), hence the fallback column.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from converters import ConversionInput, write_gguf

from edgeprune.build.calibration import collect_calibration
from edgeprune.core.fetch import fetch_smollm2
from edgeprune.build.loading import load_model
from edgeprune.build.quantize import quantize_gguf
from edgeprune.core.texts import default_calibration_text, default_evaluation_text
from edgeprune.device.validation.entry import validate_gguf
from edgeprune.device.validation.results import MIB
from edgeprune.device.validation.speed import N_GEN, N_PROMPT, REPETITIONS
from edgeprune.build.bench.tables import SuiteResult, relative, table

# (llama.cpp type, with importance matrix); F16 is the reference itself, not quantized.
ROWS = [("F16", False), ("Q8_0", False), ("Q4_K_M", False), ("Q4_K_M", True), ("Q4_0", False), ("Q4_0", True)]
CALIB_SEQUENCES, CALIB_SEQ_LEN = 64, 256
EVAL_CTX, EVAL_CHUNKS = 512, 20


def run(progress) -> SuiteResult:
    source = fetch_smollm2()
    calibration, evaluation = default_calibration_text(), default_evaluation_text()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-quant-") as tmp:
        loaded = load_model(source, progress=progress)
        reference = write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length),
                               Path(tmp) / "F16.gguf", "F16", progress)
        tokens = loaded.tokenizer(calibration.content, add_special_tokens=False)["input_ids"]
        stats = collect_calibration(loaded.model, tokens, n_seq=CALIB_SEQUENCES, seq_len=CALIB_SEQ_LEN,
                                    text_name=calibration.name, progress=progress)
        imatrix = stats.gguf_imatrix()
        del loaded, stats  # the torch model is not needed any more; give its memory to llama.cpp
        for quant, with_imatrix in ROWS:
            label = f"{quant}{' + imatrix' if with_imatrix else ''}"
            progress(f"quantization: {label}")
            row = {"label": label, "quant": quant, "imatrix": with_imatrix, "fallbacks": None}
            path = reference
            if quant != "F16":
                quantized = quantize_gguf(reference, Path(tmp) / f"{quant}{'-imatrix' if with_imatrix else ''}.gguf",
                                          quant, imatrix=imatrix if with_imatrix else None,
                                          imatrix_text=calibration.name, progress=progress)
                path = quantized.path
                row.update(fallbacks=len(quantized.fallbacks), quantize_seconds=round(quantized.seconds, 2),
                           fallback_types=sorted({f"{f.wanted}->{f.used}" for f in quantized.fallbacks}))
            # the reference against itself would cost a second pass for a KLD of 0 by definition
            report = validate_gguf(path, reference_gguf=None if path == reference else reference,
                                   eval_text=evaluation, n_ctx=EVAL_CTX, max_chunks=EVAL_CHUNKS, progress=progress)
            rows.append({**row, "validation": report.to_dict()})
    return SuiteResult(
        title="Quantization of SmolLM2-135M-Instruct: llama.cpp types with and without an importance matrix",
        method=(
            f"One F16 GGUF written by edgeprune from SmolLM2-135M-Instruct (the Q4_1 GGUF from PyPI, dequantized) is "
            f"the reference; each row is quantized from it by llama.cpp's quantizer (llama_model_quantize). The "
            f"importance matrix is edgeprune's calibration pass over {CALIB_SEQUENCES}×{CALIB_SEQ_LEN} tokens of "
            f"'{calibration.name}'. Every file is measured by edgeprune.device.validation through llama.cpp: perplexity the "
            f"llama-perplexity way on '{evaluation.name}' ({EVAL_CHUNKS} chunks of {EVAL_CTX} tokens, second half "
            f"scored), KL divergence and top-1 agreement against the F16 reference on the same tokens, and "
            f"llama-bench-style pp{N_PROMPT} / tg{N_GEN} speed (median of {REPETITIONS}, all cores). Fallbacks are tensors llama.cpp stored "
            f"in another type because their row length is not a multiple of the type's block."
        ),
        data={"calibration_text": calibration.name, "evaluation_text": evaluation.name, "rows": rows},
        sections=["## Results", _table(rows), _imatrix_effect(rows)],
    )


def _table(rows: list[dict]) -> str:
    cells = []
    for row in rows:
        v = row["validation"]
        d = v["divergence"]
        kld, top1 = (f"{d['kld_mean']:.5f}", f"{100 * d['top1_agreement']:.2f}%") if d else ("reference", "reference")
        cells.append([
            row["label"], f"{v['memory']['file_bytes'] / MIB:.1f}", f"{v['perplexity']['ppl']:.3f}", kld, top1,
            f"{v['speed']['prefill_tps']:.0f}",
            f"{v['speed']['decode_tps']:.1f}",
            "–" if row["fallbacks"] is None else f"{row['fallbacks']} ({', '.join(row['fallback_types']) or 'none'})",
        ])
    return table(["file", "MiB", "PPL", "KLD mean vs F16", "top-1 vs F16", "prefill tok/s", "decode tok/s",
                  "fallback tensors"], cells)


def _imatrix_effect(rows: list[dict]) -> str:
    """One line per type quantized both ways: how much the importance matrix changes PPL and KLD."""
    by_label = {row["label"]: row["validation"] for row in rows}
    lines = []
    for quant in dict.fromkeys(q for q, with_imatrix in ROWS if with_imatrix):
        plain, weighted = by_label[quant], by_label[f"{quant} + imatrix"]
        ppl = relative(plain["perplexity"]["ppl"], weighted["perplexity"]["ppl"])
        kld = relative(plain["divergence"]["kld_mean"], weighted["divergence"]["kld_mean"])
        lines.append(f"- **{quant}**: the importance matrix changes PPL by {ppl} and mean KLD by {kld}.")
    return "Effect of the importance matrix (with minus without, relative to without):\n\n" + "\n".join(lines)
