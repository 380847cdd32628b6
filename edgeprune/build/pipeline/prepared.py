"""What every output built from one model shares, made once: `prepare` loads (or opens) the model and tokenizes
the texts; `Prepared` writes the F16 reference and computes the unpruned model's importance matrix on demand."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from converters import ConversionInput

from edgeprune.build.calibration import check_calibration_length, collect_calibration
from edgeprune.build.pipeline.inmemory import InMemory
from edgeprune.build.pipeline.options import ExportOptions, Progress
from edgeprune.build.pipeline.stages import Route
from edgeprune.build.pipeline.streamed import Streamed
from edgeprune.build.resources import Resources
from edgeprune.build.streaming import compute_device
from edgeprune.core.atomic import atomic_output
from edgeprune.core.texts import Text, check_evaluation_length
from edgeprune.build.quantize import quantize_gguf, QuantizeResult


def route_for(resources: Resources) -> Route:
    """The path `plan_resources` chose: the model layer-streamed, or in memory."""
    return Streamed() if resources.streamed else InMemory()


@dataclass
class Prepared:
    """What every output built from one model shares, computed once: the model (loaded, or opened for the
    layer-streamed path), the tokenized calibration text, the F16 reference and the unpruned model's importance
    matrix. `edgeprune build` prepares once for all its targets."""

    model_path: Path
    loaded: object  # LoadedModel, or LazyModel on the layer-streamed path
    base_shape: object  # ModelShape
    tokens: list[int]
    calib: Text
    evaluation: Text | None
    resources: Resources
    options: ExportOptions
    timings: dict[str, float] = field(default_factory=dict)
    reference: Path | None = None
    shared: bool = False  # several targets: in-memory pruning works on a copy of the model
    teacher_dir: Path | None = None  # a build's cache of the teacher's outputs for every target's distillation
    cache: dict = field(default_factory=dict)  # shared by per-target copies (dataclasses.replace)
    lock: threading.Lock = field(default_factory=threading.Lock)
    route: Route = field(init=False)  # in memory or layer-streamed, as `resources` chose

    def __post_init__(self):
        self.route = route_for(self.resources)

    def timed(self, stage: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[stage] = round(time.perf_counter() - start, 2)
        return result

    def conversion_input(self, metadata: dict[str, str], model=None) -> ConversionInput:
        return self.route.conversion_input(self.loaded, metadata, model)

    def device(self):
        return compute_device(self.options.device)

    def write_reference(self, path: Path, metadata: dict[str, str], say: Progress) -> Path:
        """The unpruned model as F16: the reference for KL divergence, and the float input of unpruned outputs."""
        self.reference = self.route.write_reference(self, path, metadata, say)
        return self.reference

    def unpruned_imatrix(self, say: Progress) -> dict:
        """The unpruned model's importance matrix, computed on first use (once for all of a build's targets)."""
        with self.lock:
            if "imatrix" not in self.cache:
                model = self.route.calibration_model(self)
                self.cache["imatrix"] = self.timed(
                    "calibrate", collect_calibration, model, self.tokens, n_seq=self.options.calib_sequences,
                    seq_len=self.options.calib_seq_len, text_name=self.calib.name, progress=say).gguf_imatrix()
        return self.cache["imatrix"]

    def quantize(self, float_gguf: Path, final: Path, quant: str, imatrix: dict | None, threads: int,
                 say: Progress, tensor_types: dict[str, str] | None = None) -> QuantizeResult:
        """Quantize `float_gguf` into `final`. The unpruned reference is quantized once per type: a later target
        wanting the same copies the first one's file, the bytes llama.cpp would write again (SmolLM2 to Q5_K_M
        with its importance matrix: 9.6 s in the build bench; copying the 105 MB it writes: 0.1-1.1 s here).
        A mixed-precision target (`tensor_types`) is its own."""
        def run() -> QuantizeResult:
            return quantize_gguf(float_gguf, final, quant, imatrix=imatrix, imatrix_text=self.calib.name,
                                 threads=threads, tensor_types=tensor_types, progress=say)

        if float_gguf != self.reference or tensor_types:
            return run()
        with self.lock:
            done = self.cache.setdefault("quantized", {}).get((quant, imatrix is not None))
            if done is not None and done.path.is_file():
                say(f"{quant}: the unpruned model's, quantized for an earlier target")
                with atomic_output(final) as tmp:
                    shutil.copyfile(done.path, tmp)
                return replace(done, path=final)
            self.cache["quantized"][(quant, imatrix is not None)] = result = run()
            return result


def prepare(model_path: str | Path, options: ExportOptions, calib: Text, evaluation: Text | None,
            resources: Resources, say: Progress) -> Prepared:
    """Load (or open) the model and tokenize the texts, checking their lengths with the model's tokenizer."""
    prepared = Prepared(Path(model_path), None, None, [], calib, evaluation, resources, options)
    prepared.loaded, prepared.base_shape = prepared.route.load(prepared, model_path, say)
    say("tokenizing calibration text")
    prepared.tokens = prepared.loaded.tokenizer(calib.content, add_special_tokens=False)["input_ids"]
    check_calibration_length(len(prepared.tokens), options.calib_seq_len)
    if evaluation is not None:
        say("tokenizing evaluation text")
        eval_tokens = len(prepared.loaded.tokenizer(evaluation.content, add_special_tokens=False)["input_ids"]) + 1
        check_evaluation_length(evaluation.name, eval_tokens, options.eval_ctx, options.eval_chunks)
    return prepared

