"""Quality suite: measure every row of edgeprune/build/quality_table.toml on SmolLM2-135M and regenerate the table
(`quality-gemma3`: the rows the planner can choose for Gemma 3 270M, into quality_table_gemma3.toml).

The planner ranks candidates by the table's Δ log PPL, so a row it can choose must be a measurement, not a
guess. Each quant type a shipped profile lists or the planner suggests (and every other type the table keeps) is
quantized by llama.cpp from one F16 reference with edgeprune's importance matrix, as export does; edgeprune's
default pruning, MLP channels only, is measured at 10, 20, 30 and 50% of decoder parameters for both allocations
as F16 GGUFs. Every file is scored llama-perplexity style against the same dense F16. Rows are checkpointed in
the edgeprune cache as they come, so a rerun after an interruption measures only what is missing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from importlib import metadata
from pathlib import Path

import converters
from converters import ConversionInput, write_gguf

from edgeprune.core.atomic import write_text_atomic
from edgeprune.build.calibration import collect_calibration
from edgeprune.core.fetch import DEFAULT_CACHE, MODELS
from edgeprune.build.loading import load_model
from edgeprune.build.planner import SUGGESTED_QUANTS
from edgeprune.device.profiles import list_profiles
from edgeprune.build.pruning import PruneOptions, prune_model
from edgeprune.build.quantize import quantize_gguf
from edgeprune.core.shapes import shape_of
from edgeprune.core.texts import default_calibration_text, default_evaluation_text
from edgeprune.device.validation.quality import measure_perplexity
from edgeprune.device.validation.results import MIB
from edgeprune.build.bench.pruning import split_budget
from edgeprune.build.bench.quantization import CALIB_SEQ_LEN, CALIB_SEQUENCES, EVAL_CHUNKS, EVAL_CTX
from edgeprune.build.bench.tables import SuiteResult, table

COMMAND = "python -m edgeprune.build.bench quality"
QUALITY_TABLE = Path(__file__).resolve().parents[1] / "quality_table.toml"
CHECKPOINT = DEFAULT_CACHE / "bench-quality-rows.json"
# Types no shipped profile lists, kept in the table so that a user's profile naming one ranks on a measurement.
OTHER_QUANTS = ("F32", "BF16", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_S", "IQ4_XS", "IQ4_NL", "Q4_1", "Q3_K_L", "Q3_K_S")
FLOAT_TYPES = ("F32", "BF16")  # export quantizes these without an importance matrix
PRUNING_TARGETS = (0.1, 0.2, 0.3, 0.5)  # shares of decoder parameters asked for
ALLOCATIONS = ("uniform", "adaptive")
# Estimates carried into the table, not measured here (each would need pruning runs of its own); the table's
# header says where they come from.
HEADS_FACTOR, PER_LAYER_REMOVED = 5.0, 0.12


def table_quants() -> tuple[list[str], list[str]]:
    """The types the planner can choose (F16, the shipped profiles' lists, its suggestions), then the others."""
    listed = [quant for profile in list_profiles() for quant in profile.runtime.quant_types]
    chosen = list(dict.fromkeys(["F16", *listed, *SUGGESTED_QUANTS]))
    return chosen, [q for q in OTHER_QUANTS if q not in chosen]


def run_gemma3(progress) -> SuiteResult:
    """Gemma 3 270M's own rows: the types the planner can choose and uniform pruning (its only allocation)."""
    return run(progress, "gemma3")


def run(progress, model: str = "smollm2") -> SuiteResult:
    calibration, evaluation = default_calibration_text(), default_evaluation_text()
    threads = os.cpu_count() or 1
    chosen, others = table_quants()
    allocations = ALLOCATIONS if model == "smollm2" else ("uniform",)
    others = others if model == "smollm2" else []
    # what the planner can choose first, so an interrupted run has measured what matters most
    keys = ([f"quant {q}" for q in chosen] + [f"prune {a} {t}" for a in allocations for t in PRUNING_TARGETS]
            + [f"quant {q}" for q in others])
    settings = {"model": model, "calibration": calibration.name, "evaluation": evaluation.name, "ctx": EVAL_CTX,
                "chunks": EVAL_CHUNKS, "imatrix": [CALIB_SEQUENCES, CALIB_SEQ_LEN], "code": _code_hash()}
    rows = _resume(settings)
    if rows:
        progress(f"quality: resuming, {len(rows)} of {len(keys)} rows measured by an interrupted run")
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-quality-") as tmp:
        loaded = load_model(MODELS[model](), progress=progress)
        reference = write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length),
                               Path(tmp) / "F16.gguf", "F16", progress)
        tokens = loaded.tokenizer(calibration.content, add_special_tokens=False)["input_ids"]
        imatrix: dict = {}  # filled on the first quant type that takes it

        def measure(key: str, path: Path, **row) -> None:
            progress(f"quality: {key}: perplexity ({len(rows) + 1}/{len(keys)})")
            ppl, _ = measure_perplexity(path, evaluation, n_ctx=EVAL_CTX, max_chunks=EVAL_CHUNKS, threads=threads,
                                        progress=progress)
            rows[key] = {**row, "ppl": ppl.ppl, "nll_mean": ppl.nll_mean, "file_mib": path.stat().st_size / MIB}
            write_text_atomic(CHECKPOINT, json.dumps({"settings": settings, "rows": rows}, indent=1))
            progress(f"quality: {key}: PPL {ppl.ppl:.3f}")
            if path != reference:
                path.unlink()

        def quant_row(key: str, quant: str) -> None:
            if quant == "F16":
                measure(key, reference, quant=quant, imatrix=False, fallbacks=0)
                return
            weighted = quant not in FLOAT_TYPES
            if weighted and not imatrix:
                imatrix.update(collect_calibration(loaded.model, tokens, n_seq=CALIB_SEQUENCES, seq_len=CALIB_SEQ_LEN,
                                                   text_name=calibration.name, progress=progress).gguf_imatrix())
            quantized = quantize_gguf(reference, Path(tmp) / f"{quant}.gguf", quant,
                                      imatrix=imatrix if weighted else None, imatrix_text=calibration.name,
                                      threads=threads, progress=progress)
            measure(key, quantized.path, quant=quant, imatrix=weighted, fallbacks=len(quantized.fallbacks))

        def prune_row(key: str, allocation: str, target: float) -> None:
            _, ffn = split_budget(target, 0.0, loaded.model)
            progress(f"quality: {key}: pruning {ffn:.1%} of MLP channels")
            result = prune_model(copy.deepcopy(loaded.model), tokens, PruneOptions(ffn=ffn, allocation=allocation),
                                 progress=progress)
            path = write_gguf(ConversionInput(result.model, loaded.vocab, loaded.name, loaded.context_length),
                              Path(tmp) / "pruned-F16.gguf", "F16", progress)
            widths = [layer.n_ff for layer in result.shape.layers]
            measure(key, path, allocation=allocation, target=target, ffn=ffn,
                    removed_fraction=result.removed_params / result.decoder_params_before,
                    n_ff_min=min(widths), n_ff_max=max(widths), prune_seconds=round(result.seconds, 1))

        for key in keys:
            if key not in rows:
                kind, *args = key.split()
                if kind == "quant":
                    quant_row(key, *args)
                else:
                    prune_row(key, args[0], float(args[1]))
    dense = rows["quant F16"]["nll_mean"]
    ordered = [{**rows[k], "delta_log_ppl": rows[k]["nll_mean"] - dense} for k in keys]
    quant_rows = [r for r in ordered if "quant" in r]
    prune_rows = [r for r in ordered if "allocation" in r]
    shape = shape_of(loaded.model)
    path = QUALITY_TABLE if model == "smollm2" else QUALITY_TABLE.with_name(f"quality_table_{model}.toml")
    write_text_atomic(path, quality_table_toml(quant_rows, prune_rows, time.strftime("%Y-%m-%d"),
                                               shape.table_key, model,
                                               allocations))
    CHECKPOINT.unlink(missing_ok=True)
    progress(f"quality: wrote {path}")
    return SuiteResult(
        title=f"Quality table of {MODEL_NAMES[model]}: Δ log PPL of every quant type and pruning share the planner ranks",
        method=(
            f"One F16 GGUF written by edgeprune from {MODEL_NAMES[model]} is the reference. Quant rows: llama.cpp's "
            f"quantizer from that reference with edgeprune's importance matrix ({CALIB_SEQUENCES}×{CALIB_SEQ_LEN} "
            f"tokens of '{calibration.name}'; none for {', '.join(FLOAT_TYPES)}, as export does). Pruning rows: "
            f"edgeprune's default method and recovery, MLP channels only (PruneOptions(ffn, allocation), its default "
            f"calibration on '{calibration.name}'), written as F16 GGUFs. Every file: perplexity the llama-perplexity "
            f"way on '{evaluation.name}' ({EVAL_CHUNKS} chunks of {EVAL_CTX} tokens, second half scored), "
            f"{threads} threads. Δ log PPL is against the dense F16. The run rewrote edgeprune/build/{path.name}."
        ),
        data={"calibration_text": calibration.name, "evaluation_text": evaluation.name, "rows": ordered},
        sections=["## Quantization (from F16, with importance matrix)", _quant_table(quant_rows),
                  "## Pruning (MLP channels only, F16)", _prune_table(prune_rows)],
    )


# What the real models' F16 references are dequantized from (edgeprune.core.fetch): a type on the same grid
# re-creates the weights, which flatters its row.
SOURCE_GRIDS = {
    "smollm2": "SmolLM2 comes as a Q4_1 GGUF dequantized to F16,\n#   so Q4_1 re-creates its weights exactly "
               "(checked tensor by tensor): that row flatters Q4_1 on other models.",
    "gemma3": "Gemma 3 270M comes as llama.cpp's Q4_K_M GGUF (640-wide rows\n#   Q5_0, token_embd Q8_0, ffn_down "
              "Q6_K, attn_output Q4_K) dequantized to F16: rows of those types are flattered.",
}
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma 3 270M"}


def quality_table_toml(quant_rows: list[dict], prune_rows: list[dict], date: str, shape: list[int], key: str,
                       allocations: tuple[str, ...]) -> str:
    model = MODEL_NAMES[key]
    """The table the planner reads, every quant row and pruning point a measurement, with how it was made."""
    curves = {a: [[0.0, 0.0]] + [[round(r["removed_fraction"], 6), round(r["delta_log_ppl"], 5)]
                                 for r in prune_rows if r["allocation"] == a] for a in ALLOCATIONS}
    dense = next(r["ppl"] for r in quant_rows if r["quant"] == "F16")
    ppls = "; ".join(f"{a} " + ", ".join(f"{r['ppl']:.2f}" for r in prune_rows if r["allocation"] == a)
                     for a in allocations)
    lines = [
        "# Estimated quality loss, as Δ log(perplexity) against the unpruned F16 model, used by the planner to rank",
        f"# candidates that meet every budget. Written by `{COMMAND}{'' if key == 'smollm2' else '-' + key}` "
        "(edgeprune/build/bench/quality.py):",
        f"# rerun it rather than edit. Measured on {model} with llama.cpp's method "
        f"({EVAL_CHUNKS} chunks of {EVAL_CTX}",
        f"# tokens, second half scored) on the built-in evaluation text; dense F16 PPL {dense:.3f}. "
        "`--search measured`",
        "# replaces the estimate by a measurement for the best few candidates.",
        "# - quant: each type quantized by llama.cpp from the F16 model with edgeprune's importance matrix, as",
        "#   export does (none for F32 and BF16). " + SOURCE_GRIDS[key],
        "# - pruning: edgeprune's default method (FLAP fluctuation + ridge reconstruction), MLP channels only, asked",
        f"#   for {', '.join(f'{t:.0%}' for t in PRUNING_TARGETS)} of decoder parameters; each point is [share of "
        "decoder parameters actually",
        "#   removed (widths land on multiples of 32), Δ log PPL], after the unpruned origin.",
        f"#   PPL: {ppls}.",
        "# - heads_factor and per_layer_removed are estimates, not measured: half of a 20% budget taken from heads",
        "#   gave PPL 15.9 against 13.5 from MLP channels alone (heads cost ~5x per parameter), and each removed",
        "#   layer is counted at a flat cost (block influence picks the cheapest). The planner marks them extrapolated.",
        "# Small models are the fragile case; larger models lose less for the same fractions.",
        "",
        "[quant]",
        *(f"{r['quant']} = {r['delta_log_ppl']:.5f}  # PPL {r['ppl']:.3f}"
          for r in sorted(quant_rows, key=lambda r: r["delta_log_ppl"])),
        "",
        "[pruning]",
        "# share of decoder parameters removed from MLP channels -> Δ log PPL, per allocation",
        *(f"{a} = {json.dumps(curves[a])}" for a in allocations),
        f"heads_factor = {HEADS_FACTOR}",
        f"per_layer_removed = {PER_LAYER_REMOVED}",
        "",
        "[measured]",
        "# what the command measured; the planner marks every other estimate interpolated or extrapolated",
        f'command = "{COMMAND}{"" if key == "smollm2" else "-" + key}"',
        f'date = "{date}"',
        f'model = "{model}"',
        f"shape = {json.dumps(shape)}  # vocabulary, hidden size, layers: a model of another shape is told its "
        "estimates are these",
        f"quant = {json.dumps([r['quant'] for r in quant_rows])}",
        f"pruning_targets = {json.dumps(list(PRUNING_TARGETS))}",
    ]
    return "\n".join(lines) + "\n"


def _quant_table(rows: list[dict]) -> str:
    return table(["type", "imatrix", "MiB", "fallback tensors", "PPL", "Δ log PPL"],
                 [[r["quant"], "yes" if r["imatrix"] else "no", f"{r['file_mib']:.1f}", r["fallbacks"],
                   f"{r['ppl']:.3f}", f"{r['delta_log_ppl']:+.4f}"] for r in rows])


def _prune_table(rows: list[dict]) -> str:
    return table(["allocation", "asked", "removed", "FFN widths", "MiB", "prune s", "PPL", "Δ log PPL"],
                 [[r["allocation"], f"{r['target']:.0%}", f"{r['removed_fraction']:.2%}",
                   f"{r['n_ff_min']}–{r['n_ff_max']}", f"{r['file_mib']:.1f}", f"{r['prune_seconds']:.0f}",
                   f"{r['ppl']:.3f}", f"{r['delta_log_ppl']:+.4f}"] for r in rows])


def _code_hash() -> str:
    """Digest of the code and llama.cpp that make the measured files, so a resumed run never mixes in rows of
    other models. The perplexity method is llama-perplexity's and does not change with edgeprune's code."""
    package = Path(__file__).resolve().parents[1]
    files = [*sorted((package / "pruning").glob("*.py")), *sorted(Path(converters.__file__).parent.glob("*.py")),
             package / "calibration.py", package / "quantize.py", package / "loading.py"]
    digest = hashlib.sha256(metadata.version("llama-cpp-python").encode())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _resume(settings: dict) -> dict:
    """Rows an interrupted run measured with the same settings and code; none otherwise."""
    try:
        saved = json.loads(CHECKPOINT.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return saved["rows"] if saved.get("settings") == settings else {}
