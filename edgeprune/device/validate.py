"""Validate a GGUF through llama.cpp: perplexity, KL divergence against a reference, speed and memory, in one report.

The numbers follow llama.cpp's own tools (llama-perplexity, llama-bench), so users can reproduce them on their
devices. Every model runs in a child process: a native crash (llama.cpp #20824 segfaults on Intel AMX CPUs)
becomes a one-line error instead of killing the caller, and the child's peak RSS is the model's own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeprune.device import llama_log
from edgeprune.core.atomic import write_text_atomic
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.costmodel import predict_gguf
from edgeprune.device.gguf_check import logits_digest, read_gguf
from edgeprune.core.texts import Text, check_evaluation_length, default_evaluation_text

MIB = 1024 * 1024
N_PROMPT = 128  # llama-bench style prompt-processing test
N_GEN = 64  # llama-bench style token-generation test (long enough to average out scheduler noise)
REPETITIONS = 5
SPEED_BATCH = 512  # llama.cpp's default n_ubatch: how apps on the device feed a long prompt
ROW_BLOCK = 32  # logit rows turned into float64 at a time: bounds memory for 128k vocabularies
PROGRESS_MARK = "@edgeprune-progress "
REPORT_SCHEMA = 1  # report.json's layout: {"schema_version", sections..., "validation": ValidationReport}
MIN_EVAL_CTX = 64  # a perplexity chunk scores its second half: shorter chunks score tokens with almost no context
GGML_TYPE_IDS = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type values of the KV cache types a profile can name
AT_LEAST = {"decode_tps"}  # budget checks whose measurement must reach the limit rather than stay under it
AMX_FIX = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" '
    "pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36"
)


@dataclass(frozen=True)
class Runtime:
    """How llama.cpp runs the model on the device: validation creates its contexts with these settings, so the
    memory and speed it measures are those of the program the device will run, not of llama.cpp's defaults."""

    context_length: int
    kv_cache_type: str = "f16"
    flash_attention: bool = False
    threads: int = 1

    @classmethod
    def of(cls, profile: Any, *, threads: int | None = None, default_context: int = 512) -> Runtime:
        """The profile's runtime. Threads: `threads` when given, else the profile's `device.threads`, capped at
        this machine's cores: more threads than cores only make llama.cpp's threads wait on each other."""
        cores = os.cpu_count() or 1
        if profile is None:
            return cls(default_context, threads=threads or cores)
        rt = profile.runtime
        return cls(profile.budgets.context_length, rt.kv_cache_type, rt.flash_attention,
                   threads or min(profile.device.threads, cores))

    def describe(self) -> str:
        return (f"ctx {self.context_length}, KV {self.kv_cache_type}, flash attention "
                f"{'on' if self.flash_attention else 'off'}, {self.threads} thread(s)")

    def for_scoring(self) -> Runtime:
        """The runtime perplexity and KL divergence are scored with: the KV cache type, which costs quality, and
        flash attention only where llama.cpp needs it (a quantized V cache), so that a file's scores are its own
        whichever profile ships it. Elsewhere flash attention only reorders the attention sums. Measured on SmolLM2's
        Q5_K_M against its F16 reference, 20 chunks of 512: turning it on moved the mean KLD by +0.000042 (0.7%),
        under the shift's own standard error over chunks (0.000082), and PPL from 11.5404 to 11.5432. Threads change
        nothing: 1 and 2 give bit-identical logits."""
        return dataclasses.replace(self, flash_attention=self.kv_cache_type != "f16")


@dataclass
class PerplexityResult:
    ppl: float
    nll_mean: float
    n_chunks: int
    n_ctx: int
    n_tokens_scored: int
    kv_cache_type: str = "f16"  # the runtime scored with (Runtime.for_scoring)
    flash_attention: bool = False


@dataclass
class DivergenceResult:
    """KL(reference || candidate) per scored token, as llama-perplexity --kl-divergence reports it."""

    kld_mean: float
    kld_median: float
    kld_p90: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    delta_p_mean: float
    delta_p_rms: float
    n_tokens: int
    reference_gguf: str
    reference_ppl: float


class ScoreCache:
    """Perplexity and KL divergence of GGUFs scored against one reference top-k file (`basis` names it), kept by
    what decides them: the tensors and the metadata llama.cpp reads (`logits_digest`: a file differing only in
    rope.freq_base is scored anew) and the runtime they are scored with (`Runtime.for_scoring`).

    A build scores each distinct file once for all its targets: an unpruned F16 target is the reference, scored
    when its top-k file was saved; targets shipping the same quantization of the same model (the Pi 5 and the M1
    both get SmolLM2 at Q5_K_M) share one scoring. Each costs 45-66 s on SmolLM2, 20 chunks of 512 tokens.
    Entries are written whole (temporary file, then rename), so a killed build leaves none half-written."""

    def __init__(self, directory: Path, basis: str):
        self.directory, self.basis = Path(directory), basis
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _key(self, info, runtime: Runtime) -> str:
        scoring = runtime.for_scoring()
        return hashlib.sha256(json.dumps([self.basis, logits_digest(info), scoring.kv_cache_type,
                                          scoring.flash_attention]).encode()).hexdigest()

    def put(self, info, runtime: Runtime, perplexity: PerplexityResult, divergence: DivergenceResult) -> None:
        self._write(self._key(info, runtime), perplexity, divergence)

    def _write(self, key: str, perplexity: PerplexityResult, divergence: DivergenceResult) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.directory / f"{key}.json", json.dumps(
            {"perplexity": dataclasses.asdict(perplexity), "divergence": dataclasses.asdict(divergence)}, indent=2))

    def scores(self, info, runtime: Runtime, measure: Callable[[], tuple[PerplexityResult, DivergenceResult]]
               ) -> tuple[PerplexityResult, DivergenceResult, bool]:
        """The file's scores, measured (`measure`) only if no target scored the same file before; the flag says
        whether they were reused. Concurrent targets wanting the same scores wait for the first to measure them."""
        key = self._key(info, runtime)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            try:
                data = json.loads((self.directory / f"{key}.json").read_text())
                return PerplexityResult(**data["perplexity"]), DivergenceResult(**data["divergence"]), True
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                perplexity, divergence = measure()
                self._write(key, perplexity, divergence)  # the key already hashed the file: not again
                return perplexity, divergence, False


@dataclass
class SpeedResult:
    prefill_tps: float
    decode_tps: float
    ttft_s: float
    n_prompt: int
    n_gen: int
    repetitions: int
    threads: int
    ttft_prompt_tokens: int
    prefill_tps_stdev: float = 0.0  # spread over the repetitions, as llama-bench reports avg ± stddev
    decode_tps_stdev: float = 0.0


@dataclass
class MemoryResult:
    """`total_bytes` is what the device must hold: file + KV cache + compute buffers, or peak RSS when llama.cpp
    did not report its compute buffers. `basis` says, per part, whether it was measured or computed: the KV
    cache and compute buffer are the sizes llama.cpp reported for the context it created with the profile's
    runtime (context length, KV cache type, flash attention)."""

    file_bytes: int
    n_params: int
    kv_cache_bytes: int
    peak_rss_bytes: int
    context_length: int
    compute_buffer_bytes: int | None
    total_bytes: int
    kv_cache_type: str = "f16"
    flash_attention: bool = False
    basis: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass
class BudgetCheck:
    name: str
    limit: float
    measured: float
    unit: str
    passed: bool
    basis: str = "measured here"  # or "predicted for <device>" when the speed was not measured on the device


@dataclass
class Predicted:
    """The cost model's numbers for one device, reported next to what was measured."""

    device: str
    decode_tps: float
    prefill_tps: float
    ttft_s: float
    memory_bytes: int
    file_bytes: int

    @classmethod
    def of(cls, info, profile) -> Predicted:
        p = predict_gguf(info, profile)
        return cls(profile.device.name, p.decode_tps, p.prefill_tps, p.ttft_s, p.memory_bytes, p.size.file_bytes)


@dataclass
class ValidationReport:
    gguf: str
    eval_text: str
    perplexity: PerplexityResult
    divergence: DivergenceResult | None
    speed: SpeedResult
    memory: MemoryResult
    checks: list[BudgetCheck]
    passed: bool | None  # None when no budgets were given
    predicted_device: Predicted | None = None  # the target device, from its profile
    predicted_host: Predicted | None = None  # this machine, from a measured host profile: prediction accuracy
    machine: dict | None = None  # the machine that measured (machine_record): the device, when run on it
    on_device: bool = False  # speed was judged as measured here, this machine being the target device

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ValidationReport:
        return cls(
            gguf=data["gguf"],
            eval_text=data["eval_text"],
            perplexity=PerplexityResult(**data["perplexity"]),
            divergence=DivergenceResult(**data["divergence"]) if data["divergence"] else None,
            speed=SpeedResult(**data["speed"]),
            memory=MemoryResult(**data["memory"]),
            checks=[BudgetCheck(**c) for c in data["checks"]],
            passed=data["passed"],
            predicted_device=Predicted(**data["predicted_device"]) if data.get("predicted_device") else None,
            predicted_host=Predicted(**data["predicted_host"]) if data.get("predicted_host") else None,
            machine=data.get("machine"),
            on_device=data.get("on_device", False),
        )


def print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def validate_gguf(
    gguf_path: str | Path,
    *,
    reference_gguf: str | Path | None = None,
    reference_topk: str | Path | None = None,
    save_topk: str | Path | None = None,
    eval_text: Text | None = None,
    n_ctx: int = 512,
    max_chunks: int | None = 20,
    threads: int | None = None,
    profile: Any = None,
    host_profile: Any = None,
    on_device: bool = False,
    scores: ScoreCache | None = None,
    progress: Callable[[str], None] = print_to_stderr,
) -> ValidationReport:
    """Measure one GGUF with llama.cpp and, when a device `profile` is given, judge it against its budgets.

    llama.cpp runs with the profile's runtime (`Runtime.of`): its context length, KV cache type, flash attention
    and threads. Memory and file size are judged as measured. Speed is judged as measured only `on_device`;
    elsewhere this machine says nothing about the device's speed, so the cost model's prediction for the device
    is judged. A `host_profile` (from `edgeprune profiles measure`) adds predictions for this machine.
    Perplexity and divergence are scored with `Runtime.for_scoring`, and taken from `scores` (a build's, against
    `reference_topk`) when another target's file had the same tensors.
    """
    budgets = profile.budgets if profile is not None else None
    check_evaluation_options(n_ctx, max_chunks)
    path = Path(gguf_path)
    progress(f"checking {path}")
    info = read_gguf(path)
    if reference_gguf is not None:
        read_gguf(reference_gguf)
    text = eval_text or default_evaluation_text()
    runtime = Runtime.of(profile, threads=threads, default_context=n_ctx)
    ttft_tokens = _budget(budgets, "ttft_prompt_tokens") or N_PROMPT
    progress(f"llama.cpp runtime: {runtime.describe()}")

    scoring = runtime.for_scoring()
    if scoring != runtime:
        progress(f"scoring quality with {scoring.describe()}: flash attention changes speed, not the file's quality")

    def measure() -> tuple[PerplexityResult, DivergenceResult | None]:
        return measure_perplexity(path, text, reference_gguf=reference_gguf, reference_topk=reference_topk,
                                  save_topk=save_topk, n_ctx=n_ctx, max_chunks=max_chunks, runtime=scoring,
                                  progress=progress)

    if scores is None:
        perplexity, divergence = measure()
    else:
        perplexity, divergence, reused = scores.scores(info, scoring, measure)
        if reused:
            progress("these tensors were scored with this KV cache type earlier in the build: their perplexity and "
                     "divergence are reused")
    probe = measure_speed(path, runtime=runtime, ttft_tokens=ttft_tokens, progress=progress)
    speed = SpeedResult(**probe["speed"])
    memory = _memory(path, probe, runtime)
    machine = machine_record(runtime.threads, probe["llama_cpp"])
    device = Predicted.of(info, profile) if profile is not None else None
    host = Predicted.of(info, host_profile) if host_profile is not None else None
    checks = check_budgets(speed, memory, budgets, None if on_device else device) if budgets is not None else []
    return ValidationReport(
        gguf=str(path),
        eval_text=text.name,
        perplexity=perplexity,
        divergence=divergence,
        speed=speed,
        memory=memory,
        checks=checks,
        passed=all(c.passed for c in checks) if budgets is not None else None,
        predicted_device=device,
        predicted_host=host,
        machine=machine,
        on_device=on_device,
    )


def check_evaluation_options(n_ctx: int, chunks: int | None) -> None:
    """The perplexity settings, checked before any model is loaded."""
    if n_ctx < MIN_EVAL_CTX:
        raise EdgepruneError(f"--eval-ctx {n_ctx} is too small for perplexity: use {MIN_EVAL_CTX} or more "
                             "(512 is llama-perplexity's default)")
    if chunks is not None and chunks < 1:
        raise EdgepruneError(f"--eval-chunks {chunks} scores nothing: give 1 or more (20 is the default)")


def _memory(path: Path, probe: dict, runtime: Runtime) -> MemoryResult:
    """What the device must hold, from the sizes llama.cpp reported for the context it created with `runtime`
    (`llama_log.buffer_bytes` refuses a log that lacks them)."""
    file_bytes = path.stat().st_size
    basis = {"file": "measured (file size)", "peak_rss": "measured (VmHWM of the measuring process)",
             "kv_cache": "measured (llama.cpp's KV buffer sizes)",
             "compute_buffer": "measured (llama.cpp's compute buffer sizes)"}
    kv_bytes, compute = probe["kv_cache_bytes"], probe["compute_buffer_bytes"]
    return MemoryResult(
        file_bytes=file_bytes, n_params=probe["n_params"], kv_cache_bytes=kv_bytes,
        peak_rss_bytes=probe["peak_rss_bytes"], context_length=runtime.context_length, compute_buffer_bytes=compute,
        total_bytes=file_bytes + kv_bytes + compute,
        kv_cache_type=runtime.kv_cache_type, flash_attention=runtime.flash_attention, basis=basis,
    )


def measure_perplexity(path: Path, text: Text | None, *, reference_gguf: str | Path | None = None,
                       reference_topk: str | Path | None = None, save_topk: str | Path | None = None,
                       against_saved: bool = False, top_k: int | None = None, n_ctx: int = 512,
                       max_chunks: int | None = 20, threads: int | None = None, runtime: Runtime | None = None,
                       progress: Callable[[str], None] = print_to_stderr) -> tuple[PerplexityResult, DivergenceResult | None]:
    """llama-perplexity's PPL of `path` on `text` and, with a reference, its KL divergence, in a child process.

    The reference is a GGUF, whose top-k log-probs are also written to `save_topk` when given (a validation
    bundle's; without a reference, `path`'s own are: it is then the reference, and `against_saved` scores it
    against them as a candidate with its tensors would be, for a build's `ScoreCache`), or such a top-k file
    (`reference_topk`), which brings its own evaluation chunks (`text` and `n_ctx` are then unused; `max_chunks`
    takes its first chunks). The candidate runs with `runtime`'s KV cache type, flash attention and
    threads (a quantized KV cache costs quality too), or llama.cpp's defaults on `threads`; the reference GGUF
    with llama.cpp's defaults."""
    from edgeprune.device.bundle_logits import DEFAULT_TOP_K

    runtime = runtime or Runtime(n_ctx, threads=threads or os.cpu_count() or 1)
    if save_topk is not None and reference_topk is not None:
        raise EdgepruneError("internal error: top-k log-probs are saved from a reference GGUF, not from a top-k file")
    quality = _run_child({
        "kind": "quality", "gguf": str(path), "reference": str(reference_gguf) if reference_gguf else None,
        "reference_topk": str(reference_topk) if reference_topk else None,
        "save_topk": str(save_topk) if save_topk else None, "against_saved": against_saved,
        "top_k": top_k or DEFAULT_TOP_K,
        "text": text.content if text else None, "text_name": text.name if text else None, "n_ctx": n_ctx,
        "max_chunks": max_chunks, "runtime": dataclasses.asdict(runtime),
    }, f"measuring the perplexity of {path}", progress)
    divergence = DivergenceResult(**quality["divergence"]) if quality["divergence"] else None
    return PerplexityResult(**quality["perplexity"]), divergence


def measure_speed(path: Path, *, runtime: Runtime | None = None, threads: int | None = None, n_ctx: int = 512,
                  ttft_tokens: int = N_PROMPT, progress: Callable[[str], None] = print_to_stderr) -> dict:
    """llama-bench's pp and tg, TTFT, KV and compute buffers and peak RSS of `path`, measured in a child process
    with `runtime`'s settings (or llama.cpp's defaults at `n_ctx` on `threads`). The context is the runtime's
    context length, so the buffers are the device's."""
    runtime = runtime or Runtime(n_ctx, threads=threads or os.cpu_count() or 1)
    n_ctx = max(runtime.context_length, ttft_tokens + 1, N_PROMPT + N_GEN)
    return _run_child({
        "kind": "speed", "gguf": str(path), "runtime": dataclasses.asdict(dataclasses.replace(runtime, context_length=n_ctx)),
        "ttft_tokens": ttft_tokens,
    }, f"measuring the speed of {path}", progress)


def _budget(budgets: Any, name: str) -> Any:
    return getattr(budgets, name, None) if budgets is not None else None


def check_budgets(speed: SpeedResult, memory: MemoryResult, budgets: Any,
                  device: Predicted | None = None) -> list[BudgetCheck]:
    """Compare with a profile's budgets; a budget set to None is not checked. Speed comes from `device`'s
    prediction when given (validation off the device), else from the measurement.

    `memory` must have been measured at budgets.context_length and `speed` with budgets.ttft_prompt_tokens.
    """
    measured = "measured here"
    speed_basis = f"predicted for {device.device}" if device else measured
    wanted = [
        ("memory", _budget(budgets, "memory_mib"), memory.total_bytes / MIB, "MiB", measured),
        ("decode_tps", _budget(budgets, "min_decode_tps"), device.decode_tps if device else speed.decode_tps,
         "tok/s", speed_basis),
        ("ttft", _budget(budgets, "max_ttft_s"), device.ttft_s if device else speed.ttft_s, "s", speed_basis),
        ("file_size", _budget(budgets, "max_file_mib"), memory.file_bytes / MIB, "MiB", measured),
    ]
    return [
        BudgetCheck(name, float(limit), float(value), unit,
                    value >= limit if name in AT_LEAST else value <= limit, basis)
        for name, limit, value, unit, basis in wanted
        if limit is not None
    ]


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


def format_summary(report: ValidationReport) -> str:
    """A short table for the terminal; the JSON report holds everything."""
    ppl, speed, mem = report.perplexity, report.speed, report.memory
    lines = [
        f"GGUF        {report.gguf}",
        f"size        {mem.file_bytes / MIB:.1f} MiB, {mem.n_params / 1e6:.1f} M parameters",
        f"PPL         {ppl.ppl:.3f}  ({report.eval_text}: {ppl.n_chunks} chunks of {ppl.n_ctx} tokens, "
        f"{ppl.n_tokens_scored} scored; KV {ppl.kv_cache_type}, flash attention {'on' if ppl.flash_attention else 'off'})",
    ]
    if (d := report.divergence) is not None:
        lines += [
            f"reference   {d.reference_gguf}  (PPL {d.reference_ppl:.3f})",
            f"KLD         mean {d.kld_mean:.5f}  median {d.kld_median:.5f}  p90 {d.kld_p90:.5f}  "
            f"p99 {d.kld_p99:.5f}  max {d.kld_max:.5f}",
            f"top-1       {100 * d.top1_agreement:.2f}% same as reference;  Δp mean {100 * d.delta_p_mean:+.3f}%  "
            f"rms {100 * d.delta_p_rms:.3f}%",
        ]
    compute = f"{mem.compute_buffer_bytes / MIB:.1f} MiB" if mem.compute_buffer_bytes is not None else "unknown"
    kv_basis = "measured" if mem.basis.get("kv_cache", "").startswith("measured") else "computed"
    lines += [
        f"speed       prefill {speed.prefill_tps:.1f} tok/s (pp{speed.n_prompt}), decode {speed.decode_tps:.1f} tok/s "
        f"(tg{speed.n_gen}), median of {speed.repetitions}, {speed.threads} thread(s) on this machine",
        f"TTFT        {speed.ttft_s:.3f} s for a {speed.ttft_prompt_tokens}-token prompt",
        f"memory      {mem.total_bytes / MIB:.1f} MiB = file + KV cache {mem.kv_cache_bytes / MIB:.1f} MiB "
        f"({kv_basis}: ctx {mem.context_length}, {mem.kv_cache_type}, flash attention "
        f"{'on' if mem.flash_attention else 'off'}) + compute {compute};  peak RSS {mem.peak_rss_bytes / MIB:.1f} MiB",
    ]
    for label, p in (("predicted", report.predicted_device), ("host model", report.predicted_host)):
        if p is not None:
            lines.append(f"{label:<11} {p.device}: decode {p.decode_tps:.1f} tok/s, prefill {p.prefill_tps:.1f} tok/s, "
                         f"TTFT {p.ttft_s:.3f} s, memory {p.memory_bytes / MIB:.1f} MiB")
    for c in report.checks:
        op = ">=" if c.name in AT_LEAST else "<="
        lines.append(f"{'PASS' if c.passed else 'FAIL':<11} {c.name}: {c.measured:.3f} {c.unit} {op} {c.limit:g}"
                     f"  ({c.basis})")
    if report.passed is not None:
        lines.append(f"verdict     {'PASS' if report.passed else 'FAIL'}")
    return "\n".join(lines)


def write_report(path: str | Path, validation: ValidationReport | None, **sections: Any) -> dict:
    """The report document, JSON written atomically (a pipeline that reads reports never sees half of one):
    `schema_version`, the named sections (export, bundle, expected, ...) and the validation. Returns it."""
    document = {"schema_version": REPORT_SCHEMA, **sections,
                "validation": validation.to_dict() if validation is not None else None}
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")
    return document


# --- the parent side of the child process ------------------------------------------------------------------


def _run_child(task: dict, doing: str, progress: Callable[[str], None]) -> dict:
    """Run one measuring task in a fresh interpreter, relaying its progress lines and turning deaths into errors."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="edgeprune-validate-") as tmp:
        task_path = Path(tmp) / "task.json"
        task_path.write_text(json.dumps(task), encoding="utf-8")
        code = "import sys; from edgeprune.device.validate import _child_main; _child_main(sys.argv[1])"
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(task_path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace", env=env,
        )
        other_lines: deque[str] = deque(maxlen=20)
        try:
            for line in proc.stderr:
                if line.startswith(PROGRESS_MARK):
                    progress(line[len(PROGRESS_MARK):].rstrip("\n"))
                elif line.strip():
                    other_lines.append(line.strip())
            returncode = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        result_path = task_path.with_name("result.json")
        if returncode < 0:
            raise _death_error(-returncode, doing, other_lines)
        if returncode != 0 or not result_path.is_file():
            last = other_lines[-1] if other_lines else f"exit status {returncode}"
            raise EdgepruneError(f"llama.cpp failed while {doing}: {last}")
        result = json.loads(result_path.read_text(encoding="utf-8"))
    if "error" in result:
        raise EdgepruneError(result["error"])
    return result


def _death_error(signum: int, doing: str, other_lines: deque[str]) -> EdgepruneError:
    """One line for a child killed by a signal: the known AMX crash gets its fix, OOM kills get theirs."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum in (signal.SIGSEGV, signal.SIGILL):
        return EdgepruneError(
            f"llama.cpp crashed ({name}) while {doing}: native builds of llama-cpp-python crash on quantized models "
            f"on Intel AMX CPUs (llama.cpp #20824); rebuild it portably: {AMX_FIX}"
        )
    if signum == signal.SIGKILL:
        return EdgepruneError(f"llama.cpp was killed (SIGKILL) while {doing}, most likely out of memory: "
                              "free memory, or lower n_ctx or the profile's context_length")
    detail = f": {other_lines[-1]}" if other_lines else ""
    return EdgepruneError(f"llama.cpp died ({name}) while {doing}{detail}")


# --- the child side: everything below runs in the measuring process ----------------------------------------

def _child_main(task_path: str) -> None:
    """Entry point of the measuring process: run one task and write its result next to the task file."""
    task_file = Path(task_path)
    task = json.loads(task_file.read_text(encoding="utf-8"))
    try:
        result = _TASKS[task["kind"]](task)
    except EdgepruneError as exc:
        result = {"error": str(exc)}
    task_file.with_name("result.json").write_text(json.dumps(result), encoding="utf-8")


def _report(line: str) -> None:
    print(PROGRESS_MARK + line, file=sys.stderr, flush=True)


def _import_llama_cpp():
    """Import llama_cpp and route its log into this process's `llama_log.process_log()`: silent, yet the sizes
    it reports stay readable."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise EdgepruneError("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36") from exc
    llama_log.process_log()
    return llama_cpp


class _Model:
    """A loaded model and one reusable llama_batch: the raw calls llama-perplexity and llama-bench make."""

    def __init__(self, path: str, *, n_ctx: int, n_batch: int, threads: int, kv_cache_type: str = "f16",
                 flash_attention: bool = False):
        self.lib = _import_llama_cpp()
        log = llama_log.process_log()
        self.log_start = log.mark()
        try:
            self.llm = self.lib.Llama(
                model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_batch, SPEED_BATCH),
                n_threads=threads, n_threads_batch=threads, verbose=False, flash_attn=flash_attention,
                type_k=GGML_TYPE_IDS[kv_cache_type], type_v=GGML_TYPE_IDS[kv_cache_type],
            )
        except (ValueError, RuntimeError) as exc:
            reason = llama_log.error_line(log.text(self.log_start)) or str(exc)
            raise EdgepruneError(f"llama.cpp could not load {path}: {reason}") from exc
        self.log_end = log.mark()  # the log of this model's loading and its context's allocations
        self.ctx = self.llm.ctx
        vocab = self.lib.llama_model_get_vocab(self.llm.model)
        self.n_vocab = self.lib.llama_vocab_n_tokens(vocab)
        self.add_bos = bool(self.lib.llama_vocab_get_add_bos(vocab))
        self.bos = self.lib.llama_vocab_bos(vocab)
        self.n_batch = n_batch
        self.batch = self.lib.llama_batch_init(n_batch, 0, 1)
        for i in range(n_batch):
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0
        self.tokens = np.ctypeslib.as_array(self.batch.token, shape=(n_batch,))
        self.positions = np.ctypeslib.as_array(self.batch.pos, shape=(n_batch,))
        self.wants_logits = np.ctypeslib.as_array(self.batch.logits, shape=(n_batch,))

    def tokenize(self, text: str) -> list[int]:
        """Tokens of `text` with BOS when the vocab asks for one: llama-perplexity's common_tokenize(..., true)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, tokens, first_pos: int, outputs: range) -> None:
        """Decode `tokens` at positions first_pos..., asking for logits at the indices in `outputs`."""
        n = len(tokens)
        self.tokens[:n] = tokens
        self.positions[:n] = np.arange(first_pos, first_pos + n)
        self.wants_logits[:n] = 0
        self.wants_logits[outputs.start:outputs.stop] = 1
        self.batch.n_tokens = n
        status = self.lib.llama_decode(self.ctx, self.batch)
        if status != 0:
            raise EdgepruneError(f"llama.cpp could not decode a batch of {n} tokens (llama_decode returned {status})")
        self.lib.llama_synchronize(self.ctx)

    def logits(self, n_outputs: int) -> np.ndarray:
        """A float32 copy of the logits asked for in the last decode, in batch order."""
        data = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(n_outputs * self.n_vocab,))
        return data.reshape(n_outputs, self.n_vocab).copy()

    def score(self, chunk: list[int], first: int) -> np.ndarray:
        """Logits of positions first..n-2 of a chunk decoded on a cleared cache: the ones that predict a scored token."""
        self.clear()
        self.decode(chunk, 0, range(first, len(chunk) - 1))
        return self.logits(len(chunk) - 1 - first)


def _measure_quality(task: dict) -> dict:
    """Perplexity and KL divergence the llama-perplexity way, chunk by chunk. The reference is a GGUF (whose
    top-k log-probs are saved for a validation bundle when `save_topk` names a file) or a bundle's top-k file,
    which also holds the chunks to decode."""
    from edgeprune.device import bundle_logits

    runtime = task["runtime"]
    threads = runtime["threads"]
    _report(f"loading {task['gguf']}")
    cand = _Model(task["gguf"], n_ctx=task["n_ctx"], n_batch=task["n_ctx"], threads=threads,
                  kv_cache_type=runtime["kv_cache_type"], flash_attention=runtime["flash_attention"])
    ref, topk = None, None
    if task.get("reference_topk"):
        topk, chunks = bundle_logits.load(task["reference_topk"])
        chunks = chunks[:task["max_chunks"]]  # the first chunks: their rows come first in topk
        if int(chunks.max()) >= cand.n_vocab:
            raise EdgepruneError(f"{task['gguf']} has {cand.n_vocab} tokens but the bundle's text uses token "
                                 f"{int(chunks.max())}: the bundle belongs to another model")
    else:
        tokens = cand.tokenize(task["text"])
        if task["reference"]:
            _report(f"loading reference {task['reference']}")
            ref = _Model(task["reference"], n_ctx=task["n_ctx"], n_batch=task["n_ctx"], threads=threads)
            if ref.n_vocab != cand.n_vocab or ref.tokenize(task["text"]) != tokens:
                raise EdgepruneError(
                    f"{task['gguf']} and reference {task['reference']} have different vocabularies: KL divergence "
                    "needs a reference with the same tokenizer (the unpruned, unquantized model as GGUF)"
                )
        check_evaluation_length(task["text_name"], len(tokens), task["n_ctx"], task["max_chunks"])
        chunks = bundle_logits.evaluation_chunks(tokens, task["n_ctx"], task["max_chunks"],
                                                 cand.bos if cand.add_bos else None)
    n_chunks, n_ctx = chunks.shape
    first = n_ctx // 2
    per_chunk = n_ctx - 1 - first
    rows: dict[str, list[np.ndarray]] = {}
    saved: list = []
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
        nll_mean = -float(np.concatenate(rows["cand_logp"]).mean())
        line = f"perplexity chunk {i + 1}/{n_chunks}: PPL {math.exp(nll_mean):.3f}"
        if "kld" in rows:
            line += f", mean KLD {float(np.concatenate(rows['kld']).mean()):.5f}"
        _report(line)
    if saved:
        bundle_logits.save(task["save_topk"], bundle_logits.concatenate(saved), chunks)
    perplexity = {"ppl": math.exp(nll_mean), "nll_mean": nll_mean, "n_chunks": n_chunks, "n_ctx": n_ctx,
                  "n_tokens_scored": n_chunks * per_chunk, "kv_cache_type": runtime["kv_cache_type"],
                  "flash_attention": runtime["flash_attention"]}
    divergence = None
    if "kld" in rows:
        _report("divergence: summarizing")
        merged = {key: np.concatenate(values) for key, values in rows.items()}
        divergence = dataclasses.asdict(summarize_divergence(merged, task["reference"] or task["reference_topk"]
                                                             or task["save_topk"]))
    return {"perplexity": perplexity, "divergence": divergence}


def _measure_speed(task: dict) -> dict:
    """llama-bench's pp and tg tests plus time to first token, with the context the device will allocate."""
    runtime, ttft_tokens = Runtime(**task["runtime"]), task["ttft_tokens"]
    threads = runtime.threads
    _report(f"speed: loading {task['gguf']} ({runtime.describe()})")
    model = _Model(task["gguf"], n_ctx=runtime.context_length, n_batch=SPEED_BATCH, threads=threads,
                   kv_cache_type=runtime.kv_cache_type, flash_attention=runtime.flash_attention)
    rng = np.random.default_rng(0)

    def random_prompt(n: int) -> np.ndarray:
        """Random tokens after BOS, as llama-bench feeds: the cost of a token does not depend on which it is."""
        tokens = rng.integers(0, model.n_vocab, n)
        if model.add_bos:
            tokens[0] = model.bos
        return tokens

    def process_prompt(tokens: np.ndarray) -> None:
        model.clear()
        for start in range(0, len(tokens), model.n_batch):
            part = tokens[start:start + model.n_batch]
            model.decode(part, start, range(len(part) - 1, len(part)))

    def generate(n: int) -> None:
        model.clear()
        token = model.bos if model.add_bos else int(rng.integers(model.n_vocab))
        for pos in range(n):
            model.decode([token], pos, range(0, 1))
            token = int(rng.integers(model.n_vocab))

    def timed(fn, *args) -> float:
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start

    def first_token(n: int) -> tuple[float, float]:
        """Seconds to process an n-token prompt, and to its first token (the prompt, then the argmax)."""
        tokens = random_prompt(n)
        start = time.perf_counter()
        process_prompt(tokens)
        prompt = time.perf_counter() - start
        int(model.logits(1)[0].argmax())
        return prompt, time.perf_counter() - start

    process_prompt(random_prompt(N_PROMPT))  # warm-up, as llama-bench does
    generate(1)
    pp, tg, ttft = [], [], []
    for rep in range(REPETITIONS):
        _report(f"speed: repetition {rep + 1}/{REPETITIONS} (pp{N_PROMPT}, tg{N_GEN}, TTFT at {ttft_tokens} tokens)")
        prompt_s, first_s = first_token(N_PROMPT)
        pp.append(N_PROMPT / prompt_s)
        tg.append(N_GEN / timed(generate, N_GEN))
        # every shipped profile's TTFT prompt is pp's: one run times both (SmolLM2 Q4_K_M: 16.1 -> 12.9 s of CPU)
        ttft.append(first_s if ttft_tokens == N_PROMPT else first_token(ttft_tokens)[1])
    buffers = llama_log.buffer_bytes(llama_log.process_log().text(model.log_start, model.log_end))
    return {
        "speed": {"prefill_tps": float(np.median(pp)), "decode_tps": float(np.median(tg)),
                  "ttft_s": float(np.median(ttft)), "n_prompt": N_PROMPT, "n_gen": N_GEN, "repetitions": REPETITIONS,
                  "threads": threads, "ttft_prompt_tokens": ttft_tokens, "prefill_tps_stdev": float(np.std(pp, ddof=1)),
                  "decode_tps_stdev": float(np.std(tg, ddof=1))},
        "llama_cpp": {"version": getattr(model.lib, "__version__", "unknown"),
                      "system_info": model.lib.llama_print_system_info().decode("utf-8", errors="replace").strip()},
        "per_repetition": {"prefill_tps": pp, "decode_tps": tg},  # for pooling over several measurements
        "n_params": int(model.lib.llama_model_n_params(model.llm.model)),
        **buffers,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def machine_record(threads: int, llama_cpp: dict) -> dict:
    """What the numbers were measured on: CPU, cores, RAM, OS, the llama.cpp build and its system info, threads."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.lower().startswith(("model name", "hardware"))]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    return {"hostname": platform.node(), "cpu": cpu, "machine": platform.machine(), "cores": os.cpu_count(),
            "ram_bytes": ram, "os": platform.platform(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp["version"], "llama_cpp_system_info": llama_cpp["system_info"],
            "threads": threads}


def peak_rss_bytes() -> int:
    """This process's own peak RSS. On Linux ru_maxrss survives exec and so carries the parent's peak from
    before the fork; VmHWM belongs to the current image alone, so it is read first."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


_TASKS = {"quality": _measure_quality, "speed": _measure_speed}
