"""Build suite: what one build file for several devices costs against one device, what a build with nothing
changed costs, and the demo's single export against llama.cpp's own command-line tools doing the same steps.

Every timing is a command in a child process, wall clock, on this machine. llama.cpp's tools come from
../shared/tools/build-llama-tools.sh (FACTS.md: built once from the llama-cpp-python sdist, cached); without
it the comparison is left out and the table says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeprune.core.errors import EdgepruneError
from edgeprune.core.fetch import DEFAULT_CACHE, fetch_smollm2
from edgeprune.build.loading import load_model, save_hf_directory
from edgeprune.device.profiles import load_profile
from edgeprune.core.texts import calibration_text, default_evaluation_text
from edgeprune.device.llamacpp.runtime import Runtime
from edgeprune.device.validation.quality import DEFAULT_PRECISION
from edgeprune.device.validation.results import PerplexityResult, with_stderr
from edgeprune.build.bench.llamacpp import converter_script
from edgeprune.build.bench.tables import SuiteResult, table

DEMO_PROFILE = "raspberry-pi-5-8gb"
FOUR = ("raspberry-pi-5-8gb", "x86-laptop-16gb", "apple-m1-8gb", "snapdragon-8-gen-3-phone")
TOOLS_SCRIPT = Path(__file__).resolve().parents[4] / "shared" / "tools" / "build-llama-tools.sh"
CALIB_SEQUENCES, CALIB_SEQ_LEN, EVAL_CTX, EVAL_CHUNKS = 64, 256, 512, 20  # the export's defaults
# Each build runs twice, alternating one and four profiles, and the faster run of each is its cost: this VM's
# speed varies by up to 40% between runs (the same 512-token chunk took 2.5 s to 3.5 s).
ROUNDS = 2
SHARED_STAGES = ("load", "write_reference")


def _timed(command: list[str], cwd: Path | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, errors="replace")
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise EdgepruneError(f"{Path(command[0]).name} {' '.join(command[1:3])} failed: {last}")
    return seconds, done


def _build_file(directory: Path, model: Path, profiles: tuple[str, ...]) -> Path:
    targets = "".join(f'[[targets]]\nname = "{p}"\nprofile = "{p}"\n' for p in profiles)
    path = directory / "edgeprune.toml"
    path.write_text(f'[model]\npath = "{model}"\n[output]\ndir = "out"\n{targets}')
    return path


def _target_seconds(out: Path) -> dict[str, dict[str, float]]:
    """Each target's own stages, from its build.json: what it cost beyond the model load and reference that every
    target shares (a stage it reused, such as the unpruned importance matrix or a file's scores, is absent)."""
    found = {}
    for record in sorted(out.glob("*/build.json")):
        seconds = json.loads(record.read_text())["entry"]["seconds"]
        found[record.parent.name] = {k: v for k, v in seconds.items() if k not in SHARED_STAGES}
    return found


def _llama_tools(progress) -> Path | None:
    """The directory of llama.cpp's tools: $EDGEPRUNE_LLAMA_TOOLS, or what the shared build script prints."""
    if os.environ.get("EDGEPRUNE_LLAMA_TOOLS"):
        return Path(os.environ["EDGEPRUNE_LLAMA_TOOLS"])
    if not TOOLS_SCRIPT.is_file():
        return None
    progress("build: llama.cpp's tools (built once, 10-15 minutes)")
    done = subprocess.run(["bash", str(TOOLS_SCRIPT)], capture_output=True, text=True)
    return Path(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def _llama_cpp_steps(tools: Path, model: Path, quant: str, work: Path, progress) -> dict[str, float]:
    """The export's steps with llama.cpp's tools: convert, imatrix, quantize, perplexity of the reference and of
    the result with KL divergence, and llama-bench."""
    loaded = load_model(model)
    hf = save_hf_directory(loaded, work / "hf")  # llama.cpp's converter reads Hugging Face directories only
    calib, evaluation = work / "calibration.txt", work / "evaluation.txt"
    calib.write_text(calibration_text(None).content)
    evaluation.write_text(default_evaluation_text().content)
    f16, imatrix, out, base = work / "f16.gguf", work / "imatrix.dat", work / f"out-{quant}.gguf", work / "base.kld"
    threads = ["-t", "2"]
    # the export scores quality with Runtime.for_scoring's flash attention (off for the Pi 5's f16 KV cache, where
    # llama-perplexity's default, auto, turns it on): the tools get the same setting
    scoring = Runtime.of(load_profile(DEMO_PROFILE)).for_scoring()
    flash = ["-fa", "on" if scoring.flash_attention else "off"]
    steps = {}
    progress("build: llama.cpp convert_hf_to_gguf.py")
    steps["convert"], _ = _timed([sys.executable, str(converter_script(progress)), str(hf), "--outfile", str(f16),
                                  "--outtype", "f16"])
    progress("build: llama-imatrix")
    steps["imatrix"], _ = _timed([str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(calib), "-c",
                                  str(CALIB_SEQ_LEN), "--chunks", str(CALIB_SEQUENCES), "-o", str(imatrix), *threads])
    progress("build: llama-quantize")
    steps["quantize"], _ = _timed([str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(f16), str(out),
                                   quant, "2"])
    progress("build: llama-perplexity (reference, then the result with KL divergence)")
    steps["perplexity reference"], _ = _timed([str(tools / "llama-perplexity"), "-m", str(f16), "-f", str(evaluation),
                                               "-c", str(EVAL_CTX), "--chunks", str(EVAL_CHUNKS),
                                               "--kl-divergence-base", str(base), *threads, *flash])
    steps["perplexity + KLD"], _ = _timed([str(tools / "llama-perplexity"), "-m", str(out), "--kl-divergence-base",
                                           str(base), "--kl-divergence", "-c", str(EVAL_CTX), *threads, *flash])
    progress("build: llama-bench")
    steps["bench pp128/tg64 x5"], _ = _timed([str(tools / "llama-bench"), "-m", str(out), "-p", "128", "-n", "64",
                                               "-r", "5", *threads])
    return steps


def run(progress) -> SuiteResult:
    model = fetch_smollm2()
    cli = [sys.executable, "-m", "edgeprune.cli"]
    rows, data = [], {}
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-build-", dir=DEFAULT_CACHE) as tmp:
        tmp = Path(tmp)
        for round_ in range(1, ROUNDS + 1):
            for label, profiles in (("one profile", (DEMO_PROFILE,)), ("four profiles", FOUR)):
                directory = tmp / f"{label.replace(' ', '-')}-{round_}"
                directory.mkdir()
                path = _build_file(directory, model, profiles)
                progress(f"build: {label}, round {round_} of {ROUNDS}")
                seconds, _ = _timed([*cli, "build", str(path)])
                runs = data.setdefault(label, {"profiles": list(profiles), "runs": []})["runs"]
                runs.append({"seconds": round(seconds, 1), "targets": _target_seconds(directory / "out")})
                if label == "four profiles" and "unchanged" not in data:
                    progress("build: again, nothing changed")
                    again, done = _timed([*cli, "build", str(path)])
                    data["unchanged"] = {"seconds": round(again, 2), "said": done.stdout.strip().splitlines()[-1]}
        one, four = (min(data[label]["runs"], key=lambda r: r["seconds"]) for label in ("one profile", "four profiles"))
        ratio = four["seconds"] / one["seconds"]
        data["ratio"] = round(ratio, 3)
        for label, fastest, note in (("one profile", one, ""), ("four profiles", four, f"{ratio:.2f}× one; ")):
            each = " / ".join(f"{r['seconds']:.0f}" for r in data[label]["runs"])
            rows.append([f"build, {label}", f"{fastest['seconds']:.0f}", f"{note}runs: {each} s"])
            for target, stages in fastest["targets"].items():
                rows.append([f"… {target}", f"{sum(stages.values()):.0f}",
                             ", ".join(f"{k} {v:.0f}" for k, v in stages.items())])
        rows.append(["build, four profiles, nothing changed", f"{data['unchanged']['seconds']:.1f}",
                     data["unchanged"]["said"]])

        tools, comparison = _export_against_llama_cpp(model, cli, tmp, data, progress)
    sections = ["## Builds", table(["run", "wall s", "note"], rows), *_export_sections(tools, comparison, data)]
    return SuiteResult(
        title="Profile-driven builds: shared work, the cache, and one export against llama.cpp's tools",
        method=(f"SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI). `edgeprune build` of a build file with one target "
                f"({DEMO_PROFILE}) and with four ({', '.join(FOUR)}), each into an empty directory, {ROUNDS} rounds "
                "alternating the two, the faster run of each reported (all runs are listed; the rows under a build are "
                "its targets' own stages from their build.json, beyond the shared load and reference), then the "
                "four-target build again with nothing changed. The demo's export (`edgeprune export --profile "
                f"{DEMO_PROFILE}`) against {EXPORT_METHOD}"),
        data=data, sections=sections)


EXPORT_METHOD = ("llama.cpp's tools doing the same steps on the same texts and quant: "
                "convert_hf_to_gguf.py (from an HF directory of the same weights, written untimed; edgeprune's "
                f"export of that directory is timed too, like for like), llama-imatrix {CALIB_SEQUENCES}×"
                f"{CALIB_SEQ_LEN} tokens, llama-quantize with that imatrix, llama-perplexity {EVAL_CHUNKS}×{EVAL_CTX} "
                "tokens on the F16 reference (saving its logits) and on the result with KL divergence, both with the "
                "flash-attention setting the export scores with; llama-bench pp128/tg64 ×5; 2 threads. Wall clock "
                "of each command. The export validates until its standard errors are within "
                f"{DEFAULT_PRECISION:.0%} of its estimates (at most {EVAL_CHUNKS} chunks); `edgeprune validate "
                "--eval-fixed` then scores its file on all the chunks llama-perplexity scores, and the table says "
                "whether those numbers fall within two standard errors of the export's.")


def run_export(progress) -> SuiteResult:
    """The export rows alone: `python -m edgeprune.build.bench export`."""
    model = fetch_smollm2()
    data: dict = {}
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-export-", dir=DEFAULT_CACHE) as tmp:
        tools, comparison = _export_against_llama_cpp(model, [sys.executable, "-m", "edgeprune.cli"], Path(tmp), data,
                                                      progress)
    return SuiteResult(
        title="One export against llama.cpp's own tools",
        method=f"SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI). The demo's export (`edgeprune export --profile "
               f"{DEMO_PROFILE}`) against {EXPORT_METHOD}",
        data=data, sections=_export_sections(tools, comparison, data))


def _export_sections(tools: Path | None, comparison: list[list], data: dict) -> list[str]:
    sections = ["## One export against llama.cpp's own tools", table(["run", "wall s", "stages (s)"], comparison)]
    if tools is None:
        return [*sections,
                "llama.cpp's tools were not available (../shared/tools/build-llama-tools.sh): no comparison."]
    quality = data["quality"]
    rows = [[label, with_stderr(q["ppl"], q["ppl_stderr"], 3), with_stderr(q["kld"], q["kld_stderr"], 5), q["chunks"]]
            for label, q in quality.items() if label != "within"]
    return sections + [
        f"Export of the HF directory: {data['export_ratio']:.2f}× the time of llama.cpp's tools.",
        "## The export's quality numbers against a fixed count",
        table(["scored by", "PPL", "mean KLD", "chunks"], rows),
        f"The fixed count's PPL and KLD within two standard errors of the export's: {quality['within']}."]


def _export_against_llama_cpp(model: Path, cli: list[str], tmp: Path, data: dict, progress
                              ) -> tuple[Path | None, list[list]]:
    """The demo's export, and, with llama.cpp's tools, the same work by them and by edgeprune from the HF directory
    they read, then that export's file scored on a fixed count of chunks: `data` gets the numbers."""
    def export(source: Path, name: str) -> tuple[float, dict]:
        seconds, _ = _timed([*cli, "export", str(source), "--profile", DEMO_PROFILE, "--out", str(tmp / name)])
        return seconds, json.loads((tmp / name / "report.json").read_text())

    progress("build: the demo's single export")
    seconds, report = export(model, "export")
    stages = report["export"]
    data["export"] = {"seconds": round(seconds, 1), "stages": stages["seconds"], "quant": stages["quant"]}
    tools = _llama_tools(progress)
    comparison = [["edgeprune export of the demo's GGUF", f"{seconds:.0f}",
                   ", ".join(f"{k} {v:.0f}" for k, v in stages["seconds"].items())]]
    if tools is None:
        return None, comparison
    work = tmp / "llama-cpp"
    work.mkdir()
    steps = _llama_cpp_steps(tools, model, stages["quant"], work, progress)
    data["llama_cpp"] = {"steps": {k: round(v, 1) for k, v in steps.items()}, "seconds": round(sum(steps.values()), 1)}
    # like for like: llama.cpp's converter cannot read the demo's GGUF, so it was given an HF directory
    progress("build: the same export from the HF directory llama.cpp's converter read")
    hf_seconds, hf_report = export(work / "hf", "export-hf")
    data["export_from_hf"] = {"seconds": round(hf_seconds, 1), "stages": hf_report["export"]["seconds"]}
    data["export_ratio"] = round(hf_seconds / sum(steps.values()), 3)
    comparison += [
        ["edgeprune export of that HF directory", f"{hf_seconds:.0f}",
         ", ".join(f"{k} {v:.0f}" for k, v in hf_report["export"]["seconds"].items())],
        ["llama.cpp tools on that HF directory (sum of steps)", f"{sum(steps.values()):.0f}",
         ", ".join(f"{k} {v:.0f}" for k, v in steps.items())],
    ]
    progress("build: the HF export's file scored on a fixed count of chunks")
    fixed = tmp / "fixed.json"
    out = tmp / "export-hf"
    _timed([*cli, "validate", str(out / Path(hf_report["validation"]["gguf"]).name), "--reference",
            str(out / "reference-F16.gguf"), "--profile", DEMO_PROFILE, "--eval-fixed", "--eval-chunks",
            str(EVAL_CHUNKS), "--json", str(fixed)])
    data["quality"] = quality = {"export (precision rule)": _quality(hf_report["validation"]),
                                 "validate --eval-fixed": _quality(json.loads(fixed.read_text())["validation"])}
    adaptive, full = quality.values()
    quality["within"] = all(abs(full[k] - adaptive[k]) <= 2 * adaptive[f"{k}_stderr"] for k in ("ppl", "kld"))
    return tools, comparison


def _quality(validation: dict) -> dict:
    """A report's PPL and mean KLD with their standard errors, and the chunks scored."""
    perplexity = PerplexityResult(**validation["perplexity"])
    return {"ppl": perplexity.ppl, "ppl_stderr": perplexity.ppl_stderr, "kld": validation["divergence"]["kld_mean"],
            "kld_stderr": validation["divergence"]["kld_stderr"], "chunks": perplexity.n_chunks}
