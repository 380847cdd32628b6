"""Scale suite: peak memory, wall time per stage and throughput of the in-memory and layer-streamed paths, from
SmolLM2-135M to random-weight checkpoints with the shapes of Llama-3.2-1B and Llama-3.1-8B.

Every run is the `edgeprune` command in a child process; its peak RSS is the child's maximum resident set
(getrusage), its stage times are those export/prune record in report.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..fetch import DEFAULT_CACHE, fetch_smollm2
from ..resources import GIB, model_size
from .synthetic import write_synthetic
from .tables import SuiteResult, table

WORK = DEFAULT_CACHE / "bench-scale"
# No shipped profile's budgets admit a 1B model (the planner says so), so the 1B export names its quant and
# pruning and is judged as it comes (exit 1, a budget missed, is a completed run). Random weights: the quality
# numbers mean nothing, so the evaluation is cut short.
ONE_BILLION = ("--quant", "Q4_K_M", "--ffn", "0.2", "--eval-chunks", "4", "--eval-ctx", "256")
RUNS = [  # (label, model, command, arguments)
    ("SmolLM2-135M export, in memory", "smollm2", "export",
     ("--profile", "raspberry-pi-5-8gb", "--quant", "Q4_K_M", "--streaming", "off")),
    ("SmolLM2-135M export, streamed", "smollm2", "export",
     ("--profile", "raspberry-pi-5-8gb", "--quant", "Q4_K_M", "--streaming", "on")),
    ("1B-shaped export, streamed", "1b", "export", ("--profile", "x86-laptop-16gb", *ONE_BILLION, "--streaming", "on")),
    ("1B-shaped export, in memory", "1b", "export", ("--profile", "x86-laptop-16gb", *ONE_BILLION, "--streaming", "off")),
    ("8B-shaped prune --ffn 0.2 --quant Q4_K_M, streamed", "8b", "prune",
     ("--ffn", "0.2", "--quant", "Q4_K_M", "--calib-sequences", "8")),
]


def _model(name: str, progress) -> Path:
    if name == "smollm2":
        return fetch_smollm2()
    directory = WORK / f"llama-{name}-shape"
    progress(f"scale: writing the {name}-shaped random checkpoint (once) in {directory}")
    return write_synthetic(name, directory)


def _measure(command: list[str], out: Path) -> dict:
    """Run the command in a child of a fresh Python, so that its peak RSS is its own."""
    probe = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:]); "
             "print(json.dumps({'rc': r.returncode, 'peak': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    report = out / "report.json"
    export = json.loads(report.read_text())["export"] if report.is_file() and result["rc"] in (0, 1) else {}
    return {"rc": result["rc"], "peak_rss_bytes": result["peak"] * 1024, "wall_s": round(wall, 1),
            "seconds": export.get("seconds", {}), "resources": export.get("resources"), "gguf": export.get("gguf"),
            "error": done.stderr.strip().splitlines()[-1] if result["rc"] not in (0, 1) and done.stderr.strip() else None}


def run(progress) -> SuiteResult:
    """EDGEPRUNE_BENCH_REUSE=1 keeps the rows an earlier run measured with the same command (each row's result
    is saved as it finishes, so a long suite that stops can go on where it stopped); the table marks them."""
    rows = []
    reuse = os.environ.get("EDGEPRUNE_BENCH_REUSE") == "1"
    for index, (label, name, command, args) in enumerate(RUNS):
        model = _model(name, progress)
        size = model_size(model)
        out, saved = WORK / "out" / f"run-{index}", WORK / "out" / f"run-{index}.json"
        argv = [command, str(model), *args]
        previous = json.loads(saved.read_text()) if reuse and saved.is_file() else None
        if previous is not None and previous.get("argv") == argv:
            progress(f"scale: {label}: kept from {previous['measured_at']}")
            measured = previous
        else:
            shutil.rmtree(out, ignore_errors=True)
            progress(f"scale: {label}")
            measured = _measure([sys.executable, "-m", "edgeprune.cli", command, str(model), "--out", str(out), *args],
                                out)
            gguf = out / measured["gguf"] if measured["gguf"] else None
            if gguf is not None and gguf.is_file():
                measured.update(gguf_bytes=gguf.stat().st_size, sha256=hashlib.sha256(gguf.read_bytes()).hexdigest())
            measured.update(argv=argv, measured_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            saved.write_text(json.dumps(measured, indent=1))
        rows.append({"run": label, "model": model.name, "params": size.n_params, "stored_bytes": size.stored_bytes,
                     "float32_bytes": 4 * size.n_params, **measured})
        progress(f"scale: {label}: rc {measured['rc']}, peak {measured['peak_rss_bytes'] / GIB:.2f} GiB, "
                 f"{measured['wall_s']:.0f} s")
    cells = []
    for r in rows:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items())
        cells.append([f"{r['run']} ({r['measured_at']})", f"{r['params'] / 1e9:.2f}", f"{r['float32_bytes'] / GIB:.1f}",
                      f"{r['peak_rss_bytes'] / GIB:.2f}" if r["rc"] in (0, 1) else f"failed: {r['error']}",
                      f"{r['wall_s']:.0f}", stages, f"{r['stored_bytes'] / 1e9 / r['wall_s']:.3f}",
                      (r.get("sha256") or "")[:12]])
    return SuiteResult(
        title="Model size against peak memory and time: in-memory and layer-streamed paths",
        method=("Each run is `edgeprune export` or `edgeprune prune` in a child process; peak RSS is that child's "
                "maximum resident set (getrusage), stages are the seconds report.json records. The 1B and 8B models "
                "are random bf16 checkpoints with the real shapes (python -m edgeprune.bench.synthetic), with "
                "SmolLM2's tokenizer; their quality numbers mean nothing and their evaluation is cut to 4 chunks of "
                "256 tokens. Throughput: GB of stored weights read per second of wall time. The 8B prune uses 8 "
                "calibration sequences of 256 tokens (the default 32 would take about four times as long on 2 "
                "cores). Exit status 1 (a budget missed) still counts as a completed run."),
        data={"rows": rows},
        sections=["## Results", table(
            ["run (measured)", "params (B)", "float32 GiB", "peak RSS GiB", "wall s", "stages (s)", "GB/s", "GGUF sha256"],
            cells)],
    )
