"""Speed: llama-bench's prompt-processing (pp) and token-generation (tg) tests plus time to first token, with the
context the device will allocate, measured in the child process; its log gives the KV and compute buffers too.
The parent asks (`measure_speed`); the child process measures (`speed_task`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgeprune.device.llamacpp import log as llama_log
from edgeprune.device.llamacpp.child import print_to_stderr, report, run_child
from edgeprune.device.llamacpp.runtime import SPEED_BATCH, Model, Runtime
from edgeprune.device.validation.machine import peak_rss_bytes

N_PROMPT = 128  # llama-bench style prompt-processing test
N_GEN = 64  # llama-bench style token-generation test (long enough to average out scheduler noise)
REPETITIONS = 5


def measure_speed(path: Path, *, runtime: Runtime | None = None, threads: int | None = None, n_ctx: int = 512,
                  ttft_tokens: int = N_PROMPT, progress: Callable[[str], None] = print_to_stderr) -> dict:
    """llama-bench's pp and tg, TTFT, KV and compute buffers and peak RSS of `path`, measured in a child process
    with `runtime`'s settings (or llama.cpp's defaults at `n_ctx` on `threads`). The context is the runtime's
    context length, so the buffers are the device's."""
    runtime = runtime or Runtime(n_ctx, threads=threads or os.cpu_count() or 1)
    n_ctx = max(runtime.context_length, ttft_tokens + 1, N_PROMPT + N_GEN)
    return run_child(speed_task, {
        "gguf": str(path), "runtime": dataclasses.asdict(dataclasses.replace(runtime, context_length=n_ctx)),
        "ttft_tokens": ttft_tokens,
    }, f"measuring the speed of {path}", progress)


# --- the child side: runs in the measuring process ---------------------------------------------------------


def speed_task(task: dict) -> dict:
    """llama-bench's pp and tg tests plus time to first token, with the context the device will allocate."""
    runtime, ttft_tokens = Runtime(**task["runtime"]), task["ttft_tokens"]
    threads = runtime.threads
    report(f"speed: loading {task['gguf']} ({runtime.describe()})")
    model = Model(task["gguf"], n_ctx=runtime.context_length, n_batch=SPEED_BATCH, threads=threads,
                  kv_cache_type=runtime.kv_cache_type, flash_attention=runtime.flash_attention,
                  ubatch=runtime.batch_size, swa_full=runtime.swa_full)
    bench = _Bench(model)
    bench.process_prompt(bench.random_prompt(N_PROMPT))  # warm-up, as llama-bench does
    bench.generate(1)
    pp, tg, ttft = _repetitions(bench, ttft_tokens)
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


def _repetitions(bench: _Bench, ttft_tokens: int) -> tuple[list[float], list[float], list[float]]:
    """Prefill and decode tokens/s and TTFT seconds, once per repetition."""
    pp, tg, ttft = [], [], []
    for rep in range(REPETITIONS):
        report(f"speed: repetition {rep + 1}/{REPETITIONS} (pp{N_PROMPT}, tg{N_GEN}, TTFT at {ttft_tokens} tokens)")
        prompt_s, first_s = bench.first_token(N_PROMPT)
        pp.append(N_PROMPT / prompt_s)
        tg.append(N_GEN / _timed(bench.generate, N_GEN))
        # every shipped profile's TTFT prompt is pp's: one run times both (SmolLM2 Q4_K_M: 16.1 -> 12.9 s of CPU)
        ttft.append(first_s if ttft_tokens == N_PROMPT else bench.first_token(ttft_tokens)[1])
    return pp, tg, ttft


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


class _Bench:
    """llama-bench's tests on one loaded model, with its random tokens drawn from one seeded generator."""

    def __init__(self, model: Model):
        self.model = model
        self.rng = np.random.default_rng(0)

    def random_prompt(self, n: int) -> np.ndarray:
        """Random tokens after BOS, as llama-bench feeds: the cost of a token does not depend on which it is."""
        tokens = self.rng.integers(0, self.model.n_vocab, n)
        if self.model.add_bos:
            tokens[0] = self.model.bos
        return tokens

    def process_prompt(self, tokens: np.ndarray) -> None:
        model = self.model
        model.clear()
        for start in range(0, len(tokens), model.n_batch):
            part = tokens[start:start + model.n_batch]
            model.decode(part, start, range(len(part) - 1, len(part)))

    def generate(self, n: int) -> None:
        model = self.model
        model.clear()
        token = model.bos if model.add_bos else int(self.rng.integers(model.n_vocab))
        for pos in range(n):
            model.decode([token], pos, range(0, 1))
            token = int(self.rng.integers(model.n_vocab))

    def first_token(self, n: int) -> tuple[float, float]:
        """Seconds to process an n-token prompt, and to its first token (the prompt, then the argmax)."""
        tokens = self.random_prompt(n)
        start = time.perf_counter()
        self.process_prompt(tokens)
        prompt = time.perf_counter() - start
        int(self.model.logits(1)[0].argmax())
        return prompt, time.perf_counter() - start
