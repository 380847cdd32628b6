"""What a validation found, as dataclasses that round-trip through report.json (`ValidationReport.to_dict` and
`from_dict`): the reports the device writes are read back on the host and merged into pages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edgeprune.device.costmodel import predict_gguf

MIB = 1024 * 1024


@dataclass
class PerplexityResult:
    ppl: float
    nll_mean: float
    n_chunks: int
    n_ctx: int
    n_tokens_scored: int
    kv_cache_type: str = "f16"  # the runtime scored with (Runtime.for_scoring)
    flash_attention: bool = False
    nll_stderr: float | None = None  # standard error of nll_mean over the chunks (None from one chunk)
    precision_target: float | None = None  # the relative standard error scoring stopped at; None: a fixed count

    @property
    def ppl_stderr(self) -> float | None:
        """The PPL's standard error: exp moves nll's error by the factor PPL."""
        return None if self.nll_stderr is None else self.ppl * self.nll_stderr

    def chunks_text(self) -> str:
        """How many chunks were scored and what decided it, for reports."""
        why = ("a fixed count" if self.precision_target is None
               else f"until standard errors were within {self.precision_target:.0%}, or the budget")
        return f"{self.n_chunks} chunks of {self.n_ctx} tokens, {why}"


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
    kld_stderr: float | None = None  # standard error of kld_mean over the chunks (None from one chunk)


def with_stderr(value: float, stderr: float | None, digits: int) -> str:
    """`value ± stderr` (the standard error over chunks), or the value alone when there is none."""
    return f"{value:.{digits}f}" + ("" if stderr is None else f" ± {stderr:.{digits}f}")


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
