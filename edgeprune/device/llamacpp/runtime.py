"""llama.cpp's models and contexts as the device creates them: the runtime settings a profile names, and a loaded
model driven by the raw calls llama-perplexity and llama-bench make."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeprune.core.errors import EdgepruneError
from edgeprune.device.llamacpp import log as llama_log

SPEED_BATCH = 512  # llama.cpp's default n_ubatch: how apps on the device feed a long prompt
GGML_TYPE_IDS = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type values of the KV cache types a profile can name
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
    batch_size: int = SPEED_BATCH  # n_ubatch: sizes the compute buffer (a batch's logits)
    swa_full: bool = True  # sliding-window layers cache the whole context (llama.cpp's default) or the window

    @classmethod
    def of(cls, profile: Any, *, threads: int | None = None, default_context: int = 512) -> Runtime:
        """The profile's runtime. Threads: `threads` when given, else the profile's `device.threads`, capped at
        this machine's cores: more threads than cores only make llama.cpp's threads wait on each other."""
        cores = os.cpu_count() or 1
        if profile is None:
            return cls(default_context, threads=threads or cores)
        rt = profile.runtime
        return cls(profile.budgets.context_length, rt.kv_cache_type, rt.flash_attention,
                   threads or min(profile.device.threads, cores), rt.micro_batch, rt.swa_full)

    def describe(self) -> str:
        return (f"ctx {self.context_length}, KV {self.kv_cache_type}, flash attention "
                f"{'on' if self.flash_attention else 'off'}, {self.threads} thread(s)"
                + (f", batch {self.batch_size}" if self.batch_size != SPEED_BATCH else "")
                + ("" if self.swa_full else ", sliding-window cache"))

    def for_scoring(self) -> Runtime:
        """The runtime perplexity and KL divergence are scored with: the KV cache type, which costs quality, and
        flash attention only where llama.cpp needs it (a quantized V cache), so that a file's scores are its own
        whichever profile ships it. Elsewhere flash attention only reorders the attention sums. Measured on SmolLM2's
        Q5_K_M against its F16 reference, 20 chunks of 512: turning it on moved the mean KLD by +0.000042 (0.7%),
        under the shift's own standard error over chunks (0.000082), and PPL from 11.5404 to 11.5432. Threads change
        nothing: 1 and 2 give bit-identical logits."""
        return dataclasses.replace(self, flash_attention=self.kv_cache_type != "f16")


def import_llama_cpp():
    """Import llama_cpp and route its log into this process's `llama_log.process_log()`: silent, yet the sizes
    it reports stay readable."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise EdgepruneError("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36") from exc
    llama_log.process_log()
    return llama_cpp


class Model:
    """A loaded model and one reusable llama_batch: the raw calls llama-perplexity and llama-bench make."""

    def __init__(self, path: str, *, n_ctx: int, n_batch: int, threads: int, kv_cache_type: str = "f16",
                 flash_attention: bool = False, ubatch: int = SPEED_BATCH, swa_full: bool = True):
        self.lib = import_llama_cpp()
        log = llama_log.process_log()
        self.log_start = log.mark()
        try:
            self.llm = self.lib.Llama(
                model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_batch, ubatch), swa_full=swa_full,
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
        """The float32 logits asked for in the last decode, in batch order: a read-only view of llama.cpp's buffer,
        valid until this model's next decode. Not copied: a 512-token chunk of a 49k vocabulary is 50 MB, and its
        copy took 62 ms of the 0.8 s of Python work per chunk that scoring SmolLM2 against its reference cost."""
        data = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(n_outputs * self.n_vocab,))
        view = data.reshape(n_outputs, self.n_vocab)
        view.flags.writeable = False
        return view

    def score(self, chunk: list[int], first: int) -> np.ndarray:
        """Logits of positions first..n-2 of a chunk decoded on a cleared cache, the ones that predict a scored token
        (`logits`: a view, until the next decode)."""
        self.clear()
        self.decode(chunk, 0, range(first, len(chunk) - 1))
        return self.logits(len(chunk) - 1 - first)
