"""A build's score cache: each distinct file's perplexity and KL divergence, scored once for all the build's targets
(edgeprune.device.validation.entry.validate_gguf takes it as its `scores`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from pathlib import Path
from typing import Callable

from edgeprune.core.atomic import write_text_atomic
from edgeprune.device.gguf_check import logits_digest
from edgeprune.device.llamacpp.runtime import Runtime
from edgeprune.device.validation.results import DivergenceResult, PerplexityResult


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
