"""Mixed precision by sensitivity: a ggml type per tensor, chosen to minimise the expected damage within a
file size and a decode-speed budget, then applied by llama.cpp's own quantizer through its per-tensor type
overrides (`quantize.quantize_gguf(tensor_types=...)`), with the importance matrix.

Sensitivity of a tensor W at type T is the imatrix-weighted error of llama.cpp's own quantization of W to T,
Σ_j imatrix_j Σ_i (W_ij − Ŵ_ij)², which is E‖(W − Ŵ) x‖² over the calibration activations: the squared
perturbation the tensor adds to its output. It is measured, not modelled: the float GGUF is quantized once per
candidate type (every tensor that type can store forced to it) and each tensor read back and compared.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from edgeprune.device.costmodel import (
    SizeEstimate, TensorCost, decode_seconds_per_token, read_per_token, tensor_decode_seconds,
)
from edgeprune.device.llamacpp.quantizer import dry_run_types
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.gguf_copy import copy_gguf
from edgeprune.build.planner import MIB, SPEED_MARGIN
from edgeprune.build.quantize import quantize_gguf

# The types a tensor may take, each one quantizer pass in the sensitivity measurement: the K-quants for
# 256-aligned rows, the 32-block types for the rest (SmolLM2's 576-wide rows take no K-quant), q8_0 on top.
# iq4_nl is left out: its quantizer took 108 s for SmolLM2 on 2 cores, more than every other type together.
CANDIDATE_TYPES = ("q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0")
# Rows are quantized independently, so a tensor's error is estimated on every SAMPLE_EVERY-th row and scaled
# up; reading back every row cost SmolLM2 about 20 s per type on 2 cores, the quantizer itself 5.
SAMPLE_EVERY = 4
Progress = Callable[[str], None]


@dataclass(frozen=True)
class TypeOption:
    type_name: str
    nbytes: int
    error: float  # E‖ΔW x‖² per token over the calibration activations
    plain_error: float  # Σ(W − Ŵ)², unweighted: the estimator the imatrix-weighted one is compared with (bench)


@dataclass
class Sensitivity:
    """For every matrix of the float GGUF, its options: the candidate types its row width allows."""

    options: dict[str, list[TypeOption]]
    shapes: dict[str, tuple[int, int]]  # rows and row length of each matrix
    fixed: list[TensorCost]  # vectors (norms, biases) that stay float
    metadata_bytes: int
    seconds: float

    def file_bytes_at(self, types: dict[str, str]) -> int:
        """The file size with these types (e.g. those llama.cpp's dry run gives a named quant)."""
        matrices = sum(_padded(rows * row_bytes(types[name], length)) for name, (rows, length) in self.shapes.items())
        vectors = sum(_padded(t.nbytes) for t in self.fixed)
        return self.metadata_bytes + matrices + vectors

    def size(self, choice: dict[str, str]) -> SizeEstimate:
        tensors = list(self.fixed)
        for name, options in self.options.items():
            option = next(o for o in options if o.type_name == choice[name])
            rows, length = self.shapes[name]
            tensors.append(TensorCost(name, length, rows, option.type_name, option.nbytes))
        return SizeEstimate("mixed", tuple(tensors), self.metadata_bytes, "")

    def damage(self, choice: dict[str, str], weighted: bool = True) -> float:
        """The estimated damage of a choice: the sum of its tensors' errors."""
        return sum(next(o.error if weighted else o.plain_error for o in self.options[n] if o.type_name == t)
                   for n, t in choice.items())


@dataclass
class MixedPlan:
    types: dict[str, str]  # GGUF tensor name -> ggml type name
    file_bytes: int
    estimated_damage: float
    decode_s_per_token: float | None
    bits_by_kind: list[str] = field(default_factory=list)  # "ffn_down 5.1 bpw", most bits first: where they went
    sensitivity_seconds: float = 0.0
    against_named: str = ""  # which tensors got more or fewer bits than the named type's, and the estimated gain

    def describe(self) -> str:
        mix = ", ".join(f"{n} {t}" for t, n in Counter(self.types.values()).most_common())
        return f"mixed types by sensitivity ({mix}; {self.file_bytes / MIB:.1f} MiB)"


def row_bytes(type_name: str, row_length: int) -> int | None:
    """Bytes of one row at `type_name`, or None where the row is not a whole number of the type's blocks."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name.upper()]]
    return None if row_length % block else row_length // block * size


def measure_sensitivity(float_gguf: str | Path, imatrix: dict[str, np.ndarray], *,
                        types: tuple[str, ...] = CANDIDATE_TYPES, threads: int = 0,
                        progress: Progress | None = None) -> Sensitivity:
    """Quantize `float_gguf` once per candidate type with the imatrix and measure every matrix's weighted error."""
    say = progress or (lambda _m: None)
    start = time.perf_counter()
    reference = gguf.GGUFReader(float_gguf)
    matrices = {t.name: t for t in reference.tensors if len(t.shape) == 2}
    if not matrices:
        raise EdgepruneError(f"{float_gguf} has no weight matrices to quantize")
    tied = "output.weight" not in matrices
    weights = {name: _column_weights(name, imatrix, tied) for name in matrices}
    errors: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in matrices}
    with tempfile.TemporaryDirectory(prefix=".edgeprune-sensitivity-", dir=Path(float_gguf).parent) as tmp:
        # without its vocabulary: the quantizer does not read it, and gguf-py spends seconds parsing 49k tokens
        source = copy_gguf(reference, Path(tmp) / "float.gguf", drop_prefixes=("tokenizer.",))
        for i, type_name in enumerate(types):
            say(f"sensitivity: quantizing every tensor to {type_name} ({i + 1}/{len(types)})")
            storable = {name for name, t in matrices.items() if row_bytes(type_name, int(t.shape[0]))}
            if not storable:
                continue
            out = Path(tmp) / f"{type_name}.gguf"
            # The base type must be a quantized one (llama.cpp applies overrides only when it quantizes); the
            # tensors this type cannot store are overridden to f16, a copy, so the pass costs no more than it must.
            overrides = {name: type_name if name in storable else "f16" for name in matrices}
            quantize_gguf(source, out, "Q8_0", imatrix=imatrix, threads=threads, tensor_types=overrides)
            for tensor in gguf.GGUFReader(out).tensors:
                if tensor.name in storable and tensor.tensor_type.name.lower() == type_name:
                    errors[tensor.name][type_name] = _weighted_error(matrices[tensor.name], tensor, weights[tensor.name])
            out.unlink()
    options, shapes = {}, {}
    for name, tensor in matrices.items():
        rows, row_length = shapes[name] = int(tensor.shape[1]), int(tensor.shape[0])
        options[name] = sorted((TypeOption(t, rows * row_bytes(t, row_length), *e) for t, e in errors[name].items()),
                               key=lambda o: o.nbytes)
        if not options[name]:
            raise EdgepruneError(f"{name} (rows of {row_length}) can take none of {', '.join(types)}")
    fixed = [TensorCost(t.name, int(t.shape[0]), 1, t.tensor_type.name.lower(), int(t.n_bytes))
             for t in reference.tensors if len(t.shape) != 2]
    metadata = min(t.data_offset for t in reference.tensors)
    return Sensitivity(options, shapes, fixed, int(metadata), time.perf_counter() - start)




def _column_weights(name: str, imatrix: dict[str, np.ndarray], tied: bool) -> np.ndarray | None:
    """The imatrix entry of a matrix; a tied embedding is the output matrix too, so it takes output's. An untied
    embedding is only looked up, one row per token: every column weighs 1, rows are averaged below."""
    values = imatrix.get("output.weight" if name == "token_embd.weight" and tied else name)
    return None if values is None else np.asarray(values, dtype=np.float64)


def _weighted_error(original, quantized, weights: np.ndarray | None) -> tuple[float, float]:
    """(Σ_j w_j Σ_i (W_ij − Ŵ_ij)², Σ_ij (W_ij − Ŵ_ij)²), estimated on every SAMPLE_EVERY-th row. With no weights
    the first is the mean over rows of ‖W_i − Ŵ_i‖² (an embedding row looked up per token)."""
    rows = int(original.shape[1])
    picked = np.arange(0, rows, SAMPLE_EVERY)
    w = gguf.quants.dequantize(np.ascontiguousarray(original.data[picked]), original.tensor_type)
    q = gguf.quants.dequantize(np.ascontiguousarray(quantized.data[picked]), quantized.tensor_type)
    delta = np.asarray(q, dtype=np.float32) - np.asarray(w, dtype=np.float32)
    per_column = (delta * delta).sum(axis=0, dtype=np.float64)
    plain = float(per_column.sum()) * rows / len(picked)
    return (plain / rows if weights is None else float(per_column @ weights) * rows / len(picked)), plain


def solve(sensitivity: Sensitivity, *, max_file_bytes: int, device=None,
          max_decode_s_per_token: float | None = None) -> MixedPlan:
    """The least damage within the budgets: every tensor starts at its smallest type, then the upgrade that
    removes the most error per share of the budgets it spends is taken, again and again, while one fits.

    A share is the upgrade's bytes over the file budget left, or its decode seconds over the time left, whichever
    is larger, so the binding budget prices upgrades. Decode seconds are the cost model's: each tensor's bytes at
    its type's measured efficiency on `device`."""
    choice = {name: options[0] for name, options in sensitivity.options.items()}
    read = {t.name for t in read_per_token(sensitivity.size({n: o.type_name for n, o in choice.items()}))}

    def seconds(name: str, option: TypeOption) -> float:
        if device is None or name not in read:
            return 0.0
        return tensor_decode_seconds(TensorCost(name, 0, 0, option.type_name, option.nbytes), device)

    def totals() -> tuple[int, float | None]:
        size = sensitivity.size({n: o.type_name for n, o in choice.items()})
        return size.file_bytes, decode_seconds_per_token(size, device) if device is not None else None

    file_bytes, decode_s = totals()
    too_slow = max_decode_s_per_token is not None and decode_s > max_decode_s_per_token
    if file_bytes > max_file_bytes or too_slow:
        speed = f" and {1 / decode_s:.1f} tok/s" if decode_s else ""
        wanted = f", {1 / max_decode_s_per_token:.1f} tok/s" if max_decode_s_per_token else ""
        raise EdgepruneError(f"even the smallest candidate types give {file_bytes / MIB:.1f} MiB{speed}, over the "
                             f"budget ({max_file_bytes / MIB:.1f} MiB{wanted}): prune, or allow a smaller type")
    while True:
        room_bytes = max_file_bytes - file_bytes
        room_s = max_decode_s_per_token - decode_s if max_decode_s_per_token is not None else None
        best, best_value = None, 0.0
        for name, current in choice.items():
            for option in sensitivity.options[name]:
                gained, extra = current.error - option.error, _padded(option.nbytes) - _padded(current.nbytes)
                extra_s = seconds(name, option) - seconds(name, current)
                if gained <= 0 or extra > room_bytes or (room_s is not None and extra_s > room_s):
                    continue
                share = max(extra / max(room_bytes, 1), extra_s / room_s if room_s else 0.0, 1e-12)
                if gained / share > best_value:
                    best, best_value = (name, option, extra, extra_s), gained / share
        if best is None:
            break
        name, option, extra, extra_s = best
        choice[name] = option
        file_bytes += extra
        decode_s = decode_s + extra_s if decode_s is not None else None
    types = {n: o.type_name for n, o in choice.items()}
    file_bytes, decode_s = totals()
    return MixedPlan(types, file_bytes, sensitivity.damage(types), decode_s, _bits_by_kind(sensitivity, types))


def _padded(nbytes: int) -> int:
    """A tensor's bytes in the file: each is aligned, as SizeEstimate.file_bytes counts them."""
    return gguf.GGUFWriter.ggml_pad(nbytes, gguf.GGUF_DEFAULT_ALIGNMENT)


def _bits_by_kind(sensitivity: Sensitivity, types: dict[str, str]) -> list[str]:
    """Bits per weight of each kind of tensor (attn_v, ffn_down, …), most first: where the bits went."""
    bits: dict[str, list[float]] = {}
    for name, type_name in types.items():
        kind = _kind(name)
        option = next(o for o in sensitivity.options[name] if o.type_name == type_name)
        rows, length = sensitivity.shapes[name]
        total = bits.setdefault(kind, [0.0, 0.0])
        total[0] += 8 * option.nbytes
        total[1] += rows * length
    ranked = sorted(((b / w, kind) for kind, (b, w) in bits.items()), reverse=True)
    return [f"{kind} {bpw:.2f} bpw" for bpw, kind in ranked]


def _kind(name: str) -> str:
    return name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]


def _bits(type_name: str) -> float:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name.upper()]]
    return 8 * size / block


def against_named(sensitivity: Sensitivity, types: dict[str, str], named: dict[str, str], quant: str) -> str:
    """Which tensors the mix gives more and fewer bits than llama.cpp's `quant` (its types `named`), by kind, and
    why: the estimated damage of both."""
    def by_kind(names: list[str]) -> str:
        return ", ".join(f"{kind} {n}" for kind, n in Counter(_kind(name) for name in names).most_common())

    more = [n for n, t in types.items() if _bits(t) > _bits(named[n])]
    fewer = [n for n, t in types.items() if _bits(t) < _bits(named[n])]
    text = (f"against {quant}: more bits for {len(more)} tensors ({by_kind(more) or 'none'}), fewer for "
            f"{len(fewer)} ({by_kind(fewer) or 'none'})")
    if all(any(o.type_name == t for o in sensitivity.options[n]) for n, t in named.items() if n in types):
        mine, theirs = sensitivity.damage(types), sensitivity.damage({n: named[n] for n in types})
        text += (f": bytes moved to where they cut the imatrix-weighted error most, estimated damage {mine:.4g} "
                 f"against {theirs:.4g}")
    return text


def choose_mix(float_gguf: str | Path, imatrix: dict[str, np.ndarray], quant: str, profile=None, *,
               threads: int = 0, progress: Progress | None = None) -> MixedPlan:
    """Types per tensor for the bytes llama.cpp's `quant` gives this float GGUF (its dry run), and within the
    profile's decode-speed budget (with the planner's margin) where a profile is given."""
    sensitivity = measure_sensitivity(float_gguf, imatrix, threads=threads, progress=progress)
    named = dry_run_types(Path(float_gguf), quant)
    budget = sensitivity.file_bytes_at(named)
    device = profile.device if profile is not None else None
    max_s = 1.0 / (profile.budgets.min_decode_tps * (1 + SPEED_MARGIN)) if profile is not None else None
    if progress:
        progress(f"mixed precision: solving for {budget / MIB:.1f} MiB (the size of {quant})"
                 + (f" and {1 / max_s:.1f} tok/s on {profile.device.name}" if max_s else ""))
    plan = solve(sensitivity, max_file_bytes=budget, device=device, max_decode_s_per_token=max_s)
    plan.sensitivity_seconds = sensitivity.seconds
    plan.against_named = against_named(sensitivity, plan.types, named, quant)
    return plan

