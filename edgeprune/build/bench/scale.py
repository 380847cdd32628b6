"""Scale suite: peak memory, wall time per stage and throughput of the in-memory and layer-streamed paths, from
SmolLM2-135M to random-weight checkpoints with the shapes of Llama-3.2-1B and Llama-3.1-8B.

Every run is the `edgeprune` command in a child process; its peak RSS is the child's maximum resident set
(wait4's rusage), sampled as well to say which stage it falls in; its stage times are those export/prune record in
report.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgeprune.core.fetch import DEFAULT_CACHE, fetch_smollm2
from edgeprune.build.resources import GIB, model_size
from edgeprune.build.bench.synthetic import write_synthetic
from edgeprune.build.bench.tables import SuiteResult, table

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
    """Run the command as a child, so that its peak RSS (getrusage) is its own. Its RSS is also sampled every
    0.1 s with the progress line showing at the time, so the table can say where the peak falls."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stderr), daemon=True)
    reader.start()
    sampled, where = 0, ""
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)  # this child's own rusage, not all children's
        if pid:
            break
        rss = _rss_bytes(child.pid)
        if rss > sampled:
            sampled, where = rss, (lines[-1].strip() if lines else "start")
        time.sleep(0.1)
    reader.join()
    wall = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    report = out / "report.json"
    export = json.loads(report.read_text())["export"] if report.is_file() and rc in (0, 1) else {}
    return {"rc": rc, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "sampled_peak_bytes": sampled, "sampled_peak_during": where, "wall_s": round(wall, 1),
            "seconds": export.get("seconds", {}), "resources": export.get("resources"), "gguf": export.get("gguf"),
            "error": lines[-1].strip() if rc not in (0, 1) and lines else None}


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def run(progress) -> SuiteResult:
    """EDGEPRUNE_BENCH_REUSE=1 keeps the rows an earlier run measured with the same command (each row's result
    is saved as it finishes, so a long suite that stops can go on where it stopped); the table marks them.
    EDGEPRUNE_SCALE_MODELS (smollm2, 1b, 8b, comma-separated) runs only those models' rows."""
    rows = []
    reuse = os.environ.get("EDGEPRUNE_BENCH_REUSE") == "1"
    models = os.environ.get("EDGEPRUNE_SCALE_MODELS")  # e.g. "8b": only those rows run (the others are left out)
    for index, (label, name, command, args) in enumerate(RUNS):
        if models and name not in models.split(","):
            continue
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
                      r.get("sampled_peak_during", ""), f"{r['wall_s']:.0f}", stages,
                      f"{r['stored_bytes'] / 1e9 / r['wall_s']:.3f}",
                      (r.get("sha256") or "")[:12]])
    return SuiteResult(
        title="Model size against peak memory and time: in-memory and layer-streamed paths",
        method=("Each run is `edgeprune export` or `edgeprune prune` in a child process; peak RSS is that child's "
                "maximum resident set (getrusage); 'peak during' is the progress line showing when RSS, sampled "
                "every 0.1 s, was highest. Stages are the seconds report.json records. The 1B and 8B models "
                "are random bf16 checkpoints with the real shapes (python -m edgeprune.build.bench.synthetic), with "
                "SmolLM2's tokenizer; their quality numbers mean nothing and their evaluation is cut to 4 chunks of "
                "256 tokens. Throughput: GB of stored weights read per second of wall time. The 8B prune names its "
                "8 calibration sequences of 256 tokens, the layer-streamed path's default (32 for pruning and 64 for "
                "the importance matrix would take about four times as long on 2 cores). Exit status 1 (a budget "
                "missed) still counts as a completed run."),
        data={"rows": rows},
        sections=["## Results", table(
            ["run (measured)", "params (B)", "float32 GiB", "peak RSS GiB", "peak during", "wall s", "stages (s)",
             "GB/s", "GGUF sha256"],
            cells)],
    )
