"""Mixed precision by sensitivity: a ggml type per tensor, chosen to minimise the expected damage within a
file size and a decode-speed budget, then applied by llama.cpp's own quantizer through its per-tensor type
overrides (`quantize.quantize_gguf(tensor_types=...)`), with the importance matrix.

Sensitivity of a tensor W at type T is the imatrix-weighted error of llama.cpp's own quantization of W to T,
Σ_j imatrix_j Σ_i (W_ij − Ŵ_ij)², which is E‖(W − Ŵ) x‖² over the calibration activations: the squared
perturbation the tensor adds to its output. It is measured, not modelled: a sample of the float GGUF's rows is
quantized once per candidate type (every tensor that type can store forced to it) and read back and compared.

An error counts relative to the tensor's own output, E‖ΔW x‖² / E‖W x‖² (diagonal: Σ_j imatrix_j ‖W_:j‖²): the
last layers' down projections write outliers hundreds of times larger than the rest, and their errors with them,
while the norms downstream scale them away. The same relative error still costs very different KL divergence in
different kinds of tensor (a query's passes through a softmax, a down projection's lands on the residual stream,
the tied embedding's on the logits), so each kind's is priced in KLD: that kind alone is quantized to a probe type
and the file's KLD against the float model measured by llama.cpp on the calibration text. The estimate of a mix is
Σ_kind KLD-per-relative-error × Σ relative errors. In bench mixed, on SmolLM2 and Gemma 3 270M moved off their
grids, it ranked every file as the measured KLD of held-out text did (rank correlation 1.0; raw imatrix-weighted
errors 0.57 and 0.94), predicted SmolLM2's mixes within 10% (Gemma's 8-30% high), and the mixes had 38%, 69% and
47% less KLD than the named types at Q4_K_M's, Q4_0's and Q3_K_M's sizes (Gemma 25%, 60%, 33%). On SmolLM2 moved
off its grid by noise, raw imatrix-weighted errors summed one to one gave 19% and 22% less at Q4_K_M's and
Q3_K_M's sizes, and priced by kind without the relative scale, 33% more at Q4_K_M's.

The solver is an exact multiple-choice knapsack over bytes (dynamic programming), with a decode-time budget kept by
a Lagrange multiplier on each type's predicted decode seconds.
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
from edgeprune.core.texts import Text
from edgeprune.device.validation.quality import measure_perplexity

# The types a tensor may take, each one quantizer pass over the row sample: every type llama.cpp stores from 2.5
# bits a weight up, the K- and IQ-quants for 256-aligned rows, the 32-block types (iq4_nl among them) for any row
# (SmolLM2's 576-wide and Gemma 3's 640-wide rows take no K-quant). Below 2.5 bits (iq2_xs, iq2_xxs, iq1_*) no
# named type's budget reaches. Measured on SmolLM2 on 2 cores, every eighth row: 20 s for all fifteen types, iq4_nl
# 4 s of it.
CANDIDATE_TYPES = ("iq2_s", "q2_k", "iq3_xxs", "q3_k", "iq3_s", "iq4_xs", "q4_0", "iq4_nl", "q4_1", "q4_k", "q5_0",
                   "q5_1", "q5_k", "q6_k", "q8_0")
NEEDS_IMATRIX = ("iq2_s", "iq3_xxs")  # llama.cpp refuses these without an importance matrix
# Each kind's KLD per unit of error is measured with that kind alone at the first of these it can store, on
# PROBE_CHUNKS chunks of PROBE_CTX tokens of the calibration text: errors of a 4-bit quantization are those a
# budget near Q4 trades, and 381 scored tokens rank the kinds (their prices differ by orders of magnitude). Each
# probe is a forward pass over all the chunks' tokens, most of the pass's time: 4 chunks of 512 cost SmolLM2 23 s
# a kind on 2 cores, and the whole pass 266 s; 3 chunks of 256 cost 6 s a kind, and the pass 106 s (bench mixed;
# Gemma 3 270M 250 s), under the 2 minutes it is to stay within on SmolLM2.
PROBE_TYPES = ("q4_0", "iq4_nl", "q4_k")
PROBE_CTX, PROBE_CHUNKS = 256, 3
# The knapsack's byte grid: bytes above each tensor's smallest type, in this many steps of the room; rounding up
# each tensor's cost to a step leaves at most one step per tensor unspent (SmolLM2: 211 tensors, 0.2% of the room).
KNAPSACK_STEPS = 100_000
# A mix "at a named type's size" spends at least this share of its bytes: an estimator that sees no gain in more
# bytes (weights already on one type's grid) would otherwise give a smaller file and call it a win at that size.
LEAST_FILL = 0.995
# Rows are quantized independently, so a tensor's error is estimated on every SAMPLE_EVERY-th row, quantized
# alone, and scaled up; quantizing and reading back every row cost SmolLM2 about 20 s per type on 2 cores, every
# fourth row 42 s for all fifteen types, every eighth 20 s. SmolLM2's narrowest matrices (192 rows) keep 24 rows
# of 576 weights.
SAMPLE_EVERY = 8
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
    energy: dict[str, float] = field(default_factory=dict)  # Σ_j imatrix_j ‖W_:j‖² of each matrix: E‖W x‖²
    kld_per_error: dict[str, float] = field(default_factory=dict)  # by kind, per relative error; a kind not here: 1

    def relative_error(self, name: str, option: TypeOption) -> float:
        return option.error / self.energy[name] if self.energy.get(name) else option.error

    def price(self, name: str, option: TypeOption) -> float:
        """The estimated KLD that `option` costs tensor `name`: its relative error at its kind's measured price."""
        return self.relative_error(name, option) * self.kld_per_error.get(tensor_kind(name), 1.0)

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

    def damage(self, choice: dict[str, str], estimator: str = "kld") -> float:
        """The estimated damage of a choice: its tensors' errors priced in KLD by kind ("kld"), or summed one to one,
        imatrix-weighted ("weighted") or plain ("plain"), the estimators the bench compares it with."""
        def one(name: str, option: TypeOption) -> float:
            return {"kld": self.price(name, option), "weighted": option.error, "plain": option.plain_error}[estimator]
        return sum(one(n, next(o for o in self.options[n] if o.type_name == t)) for n, t in choice.items())


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


def measure_sensitivity(float_gguf: str | Path, imatrix: dict[str, np.ndarray], *, text: Text | None = None,
                        types: tuple[str, ...] = CANDIDATE_TYPES, threads: int = 0,
                        progress: Progress | None = None) -> Sensitivity:
    """Quantize a row sample of `float_gguf` once per candidate type with the imatrix and measure every matrix's
    weighted error; with `text`, price each kind's error in KLD measured on it (else errors count one to one)."""
    say = progress or (lambda _m: None)
    start = time.perf_counter()
    reference = gguf.GGUFReader(float_gguf)
    matrices = {t.name: t for t in reference.tensors if len(t.shape) == 2}
    if not matrices:
        raise EdgepruneError(f"{float_gguf} has no weight matrices to quantize")
    tied = "output.weight" not in matrices
    weights = {name: _column_weights(name, imatrix, tied) for name in matrices}
    errors: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in matrices}
    types = tuple(t for t in types if imatrix or t not in NEEDS_IMATRIX)
    with tempfile.TemporaryDirectory(prefix=".edgeprune-sensitivity-", dir=Path(float_gguf).parent) as tmp:
        # Every SAMPLE_EVERY-th row of each matrix, without the vocabulary (the quantizer does not read it, and
        # gguf-py spends seconds parsing 49k tokens): rows quantize independently, so the sample's errors are the
        # whole file's rows' errors.
        source = copy_gguf(reference, Path(tmp) / "sample.gguf", drop_prefixes=("tokenizer.",),
                           every_nth_row=SAMPLE_EVERY)
        sample = {t.name: t for t in gguf.GGUFReader(source).tensors if t.name in matrices}
        energy = {name: _energy(t, int(matrices[name].shape[1]), weights[name]) for name, t in sample.items()}
        for i, type_name in enumerate(types):
            say(f"sensitivity: quantizing every tensor to {type_name} ({i + 1}/{len(types)})")
            storable = {name for name, t in matrices.items() if row_bytes(type_name, int(t.shape[0]))}
            if not storable:
                continue
            out = Path(tmp) / f"{type_name}.gguf"
            quantize_gguf(source, out, "Q8_0", imatrix=imatrix, threads=threads,
                          tensor_types=_only(storable, type_name, matrices))
            for tensor in gguf.GGUFReader(out).tensors:
                if tensor.name in storable and tensor.tensor_type.name.lower() == type_name:
                    rows = int(matrices[tensor.name].shape[1])
                    errors[tensor.name][type_name] = _weighted_error(sample[tensor.name], tensor, rows,
                                                                     weights[tensor.name])
            out.unlink()
        options, shapes = {}, {}
        for name, tensor in matrices.items():
            rows, row_length = shapes[name] = int(tensor.shape[1]), int(tensor.shape[0])
            options[name] = sorted((TypeOption(t, rows * row_bytes(t, row_length), *e)
                                    for t, e in errors[name].items()), key=lambda o: o.nbytes)
            if not options[name]:
                raise EdgepruneError(f"{name} (rows of {row_length}) can take none of {', '.join(types)}")
        fixed = [TensorCost(t.name, int(t.shape[0]), 1, t.tensor_type.name.lower(), int(t.n_bytes))
                 for t in reference.tensors if len(t.shape) != 2]
        metadata = int(min(t.data_offset for t in reference.tensors))
        sensitivity = Sensitivity(options, shapes, fixed, metadata, 0.0, energy)
        if text:
            sensitivity.kld_per_error = _kld_per_error(Path(float_gguf), imatrix, text, sensitivity, Path(tmp),
                                                       threads, say)
    sensitivity.seconds = time.perf_counter() - start
    return sensitivity


def _only(names: set[str], type_name: str, matrices, rest: str = "f16") -> dict[str, str]:
    """Per-tensor types putting `names` at `type_name` and every other matrix at `rest` (f16: a copy). (The base
    type must be a quantized one: llama.cpp applies overrides only when it quantizes.)"""
    return {name: type_name if name in names else rest for name in matrices}


def _kld_per_error(float_gguf: Path, imatrix: dict, text: Text, sensitivity: Sensitivity, tmp: Path, threads: int,
                   say: Progress) -> dict[str, float]:
    """Each kind's measured KLD with that kind alone at a probe type, over the kind's summed relative error there:
    the KLD one unit of that kind's relative error costs. The other kinds are at q8_0 in the probe and in the
    reference it is compared with: half the bytes of f16 to write and read, and the kind's KLD alone. Two quantizer
    passes serve every probe: the reference, and every kind at its probe type; each probe file is the reference
    with one kind's tensors copied in from the second."""
    options = sensitivity.options
    kinds: dict[str, list[str]] = {}
    for name in options:
        kinds.setdefault(tensor_kind(name), []).append(name)
    probes = {kind: probe for kind, names in kinds.items()
              if (probe := next((t for t in PROBE_TYPES
                                 if all(any(o.type_name == t for o in options[n]) for n in names)), None))}
    reference = quantize_gguf(float_gguf, tmp / "probe-reference.gguf", "Q8_0", imatrix=imatrix, threads=threads,
                              tensor_types=_only(set(), "q8_0", options, rest="q8_0")).path
    at_probe = quantize_gguf(float_gguf, tmp / "probe-all.gguf", "Q8_0", imatrix=imatrix, threads=threads,
                             tensor_types={n: probes.get(tensor_kind(n), "q8_0") for n in options}).path
    reference_reader = gguf.GGUFReader(reference)
    probed = {t.name: t for t in gguf.GGUFReader(at_probe).tensors}
    reference_topk = tmp / "reference-topk.npz"
    prices = {}
    for i, (kind, probe) in enumerate(sorted(probes.items())):
        say(f"sensitivity: the KLD of {kind} alone at {probe} ({i + 1}/{len(probes)})")
        names = kinds[kind]
        out = copy_gguf(reference_reader, tmp / f"probe-{kind}.gguf", replacements={n: probed[n] for n in names})
        against = ({"reference_topk": reference_topk} if reference_topk.exists()
                   else {"reference_gguf": reference, "save_topk": reference_topk})
        _, divergence = measure_perplexity(out, text, n_ctx=PROBE_CTX, max_chunks=PROBE_CHUNKS, threads=threads,
                                           progress=lambda _m: None, **against)
        out.unlink()
        error = sum(sensitivity.relative_error(n, o) for n in names for o in options[n] if o.type_name == probe)
        prices[kind] = max(divergence.kld_mean, 0.0) / max(error, 1e-30)
    return prices


def _column_weights(name: str, imatrix: dict[str, np.ndarray], tied: bool) -> np.ndarray | None:
    """The imatrix entry of a matrix; a tied embedding is the output matrix too, so it takes output's. An untied
    embedding is only looked up, one row per token: every column weighs 1, rows are averaged below."""
    values = imatrix.get("output.weight" if name == "token_embd.weight" and tied else name)
    return None if values is None else np.asarray(values, dtype=np.float64)


def _energy(sample, rows: int, weights: np.ndarray | None) -> float:
    """E‖W x‖² of a matrix of `rows` rows from a sample of its rows, taking the activations' columns as uncorrelated
    (Σ_j imatrix_j Σ_i W_ij²); an embedding looked up per token: the mean squared norm of a row."""
    w = np.asarray(gguf.quants.dequantize(sample.data, sample.tensor_type), dtype=np.float32)
    per_column = (w * w).sum(axis=0, dtype=np.float64)
    return float(per_column.sum()) / len(w) if weights is None else float(per_column @ weights) * rows / len(w)


def _weighted_error(original, quantized, rows: int, weights: np.ndarray | None) -> tuple[float, float]:
    """(Σ_j w_j Σ_i (W_ij − Ŵ_ij)², Σ_ij (W_ij − Ŵ_ij)²) of a matrix of `rows` rows, from a sample of its rows.
    With no weights the first is the mean over rows of ‖W_i − Ŵ_i‖² (an embedding row looked up per token)."""
    w = gguf.quants.dequantize(original.data, original.tensor_type)
    q = gguf.quants.dequantize(quantized.data, quantized.tensor_type)
    delta = np.asarray(q, dtype=np.float32) - np.asarray(w, dtype=np.float32)
    per_column = (delta * delta).sum(axis=0, dtype=np.float64)
    scale = rows / len(delta)
    plain = float(per_column.sum()) * scale
    return (plain / rows if weights is None else float(per_column @ weights) * scale), plain


def solve(sensitivity: Sensitivity, *, max_file_bytes: int, min_file_bytes: int = 0, device=None,
          max_decode_s_per_token: float | None = None) -> MixedPlan:
    """The least estimated KLD within the budgets: an exact multiple-choice knapsack over the file's bytes, spending
    at least `min_file_bytes` where the types can. A decode budget is kept by pricing each option's decode seconds
    (the cost model's: its bytes at its type's measured efficiency on `device`) at a Lagrange multiplier, raised by
    bisection until the choice is fast enough; the speed then decides the bytes, and the least is dropped."""
    names = list(sensitivity.options)
    read = {t.name for t in read_per_token(sensitivity.size({n: sensitivity.options[n][0].type_name for n in names}))}
    seconds = {n: np.array([tensor_decode_seconds(TensorCost(n, 0, 0, o.type_name, o.nbytes), device)
                            if device is not None and n in read else 0.0 for o in sensitivity.options[n]])
               for n in names}
    prices = {n: np.array([sensitivity.price(n, o) for o in sensitivity.options[n]]) for n in names}
    fixed = sensitivity.metadata_bytes + sum(_padded(t.nbytes) for t in sensitivity.fixed)
    costs = [np.array([_padded(o.nbytes) for o in sensitivity.options[n]]) for n in names]

    def choose(multiplier: float, least: int = 0) -> dict[str, str]:
        values = [prices[n] + multiplier * seconds[n] for n in names]
        picks = _knapsack(costs, values, max_file_bytes - fixed, least - fixed)
        return {n: sensitivity.options[n][k].type_name for n, k in zip(names, picks)}

    def decode_s(types: dict[str, str]) -> float | None:
        return decode_seconds_per_token(sensitivity.size(types), device) if device is not None else None

    least = {n: min(sensitivity.options[n], key=lambda o: (_padded(o.nbytes), sensitivity.price(n, o))).type_name
             for n in names}
    floor_bytes, floor_s = sensitivity.size(least).file_bytes, decode_s(least)
    too_slow = max_decode_s_per_token is not None and floor_s > max_decode_s_per_token
    if floor_bytes > max_file_bytes or too_slow:
        speed = f" and {1 / floor_s:.1f} tok/s" if floor_s else ""
        wanted = f", {1 / max_decode_s_per_token:.1f} tok/s" if max_decode_s_per_token else ""
        raise EdgepruneError(f"even the smallest candidate types give {floor_bytes / MIB:.1f} MiB{speed}, over the "
                             f"budget ({max_file_bytes / MIB:.1f} MiB{wanted}): prune, or allow a smaller type")
    types = choose(0.0, min_file_bytes)
    if max_decode_s_per_token is not None and decode_s(types) > max_decode_s_per_token:
        # Raise the multiplier until seconds outweigh estimated KLD enough (a large one picks the fastest choice
        # in the bytes, no slower than the smallest types, which keep the budget), then bisect down to the least
        # that keeps it: the best choice on the budget's edge.
        low, high = 0.0, max(float(p.max()) for p in prices.values()) / max(floor_s, 1e-12)
        types = choose(high)
        while decode_s(types) > max_decode_s_per_token:
            low, high = high, high * 10
            types = choose(high)
        for _ in range(30):
            middle = (low + high) / 2
            candidate = choose(middle)
            if decode_s(candidate) <= max_decode_s_per_token:
                high, types = middle, candidate
            else:
                low = middle
    size = sensitivity.size(types)
    return MixedPlan(types, size.file_bytes, sensitivity.damage(types), decode_s(types),
                     _bits_by_kind(sensitivity, types))


def _knapsack(costs: list[np.ndarray], values: list[np.ndarray], capacity: int, least: int = 0) -> list[int]:
    """One option per item, the least total value with total cost within `capacity` and, where the options reach
    it, at least `least`: dynamic programming over costs above each item's cheapest option, on a grid of
    KNAPSACK_STEPS steps rounded up, so it never overspends (and counts a step per item short of `least`)."""
    base = [c - c.min() for c in costs]
    cheapest = sum(int(c.min()) for c in costs)
    room = capacity - cheapest
    step = max(1, -(-room // KNAPSACK_STEPS))
    slots = room // step + 1
    best = np.full(slots, np.inf)  # least value of the items so far at exactly each number of steps
    best[0] = 0.0
    picks = np.zeros((len(costs), slots), dtype=np.int16)
    for i, (cost, value) in enumerate(zip(base, values)):
        steps = -(-cost // step)
        new, pick = np.full(slots, np.inf), picks[i]
        for k, (n, v) in enumerate(zip(steps, value)):
            if n >= slots:
                continue
            candidate = np.full(slots, np.inf)
            candidate[n:] = best[:slots - n] + v
            better = candidate < new
            new[better], pick[better] = candidate[better], k
        best = new
    short = least - cheapest + len(costs) * step  # rounding up overstates by < a step each
    reachable = np.flatnonzero(np.isfinite(best))
    floor = min(max(0, -(-short // step)), int(reachable[-1]))
    left = floor + int(np.argmin(best[floor:]))
    chosen = []
    for i in reversed(range(len(costs))):
        k = int(picks[i, left])
        chosen.append(k)
        left -= int(-(-base[i][k] // step))
    return chosen[::-1]


def _padded(nbytes: int) -> int:
    """A tensor's bytes in the file: each is aligned, as SizeEstimate.file_bytes counts them."""
    return gguf.GGUFWriter.ggml_pad(nbytes, gguf.GGUF_DEFAULT_ALIGNMENT)


def _bits_by_kind(sensitivity: Sensitivity, types: dict[str, str]) -> list[str]:
    """Bits per weight of each kind of tensor (attn_v, ffn_down, …), most first: where the bits went."""
    bits: dict[str, list[float]] = {}
    for name, type_name in types.items():
        kind = tensor_kind(name)
        option = next(o for o in sensitivity.options[name] if o.type_name == type_name)
        rows, length = sensitivity.shapes[name]
        total = bits.setdefault(kind, [0.0, 0.0])
        total[0] += 8 * option.nbytes
        total[1] += rows * length
    ranked = sorted(((b / w, kind) for kind, (b, w) in bits.items()), reverse=True)
    return [f"{kind} {bpw:.2f} bpw" for bpw, kind in ranked]


def tensor_kind(name: str) -> str:
    """attn_q, ffn_down, …; token_embd and output for the embedding and head."""
    return name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]


def _bits(type_name: str) -> float:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name.upper()]]
    return 8 * size / block


def against_named(sensitivity: Sensitivity, types: dict[str, str], named: dict[str, str], quant: str) -> str:
    """Which tensors the mix gives more and fewer bits than llama.cpp's `quant` (its types `named`), by kind, and
    why: the estimated damage of both."""
    def by_kind(names: list[str]) -> str:
        return ", ".join(f"{kind} {n}" for kind, n in Counter(tensor_kind(name) for name in names).most_common())

    more = [n for n, t in types.items() if _bits(t) > _bits(named[n])]
    fewer = [n for n, t in types.items() if _bits(t) < _bits(named[n])]
    text = (f"against {quant}: more bits for {len(more)} tensors ({by_kind(more) or 'none'}), fewer for "
            f"{len(fewer)} ({by_kind(fewer) or 'none'})")
    if all(any(o.type_name == t for o in sensitivity.options[n]) for n, t in named.items() if n in types):
        mine, theirs = sensitivity.damage(types), sensitivity.damage({n: named[n] for n in types})
        measure = "estimated KLD" if sensitivity.kld_per_error else "estimated relative error"
        text += f": bytes moved to where they cut the estimated damage most, {measure} {mine:.4g} against {theirs:.4g}"
    return text


def choose_mix(float_gguf: str | Path, imatrix: dict[str, np.ndarray], quant: str, profile=None, *,
               text: Text | None = None, threads: int = 0, progress: Progress | None = None) -> MixedPlan:
    """Types per tensor for the bytes llama.cpp's `quant` gives this float GGUF (its dry run), and within the
    profile's decode-speed budget (with the planner's margin) where a profile is given. Errors are priced in KLD
    measured on `text` (the calibration text), or counted one to one without it."""
    sensitivity = measure_sensitivity(float_gguf, imatrix, text=text, threads=threads, progress=progress)
    named = dry_run_types(Path(float_gguf), quant)
    budget = sensitivity.file_bytes_at(named)
    device = profile.device if profile is not None else None
    max_s = 1.0 / (profile.budgets.min_decode_tps * (1 + SPEED_MARGIN)) if profile is not None else None
    if progress:
        progress(f"mixed precision: solving for {budget / MIB:.1f} MiB (the size of {quant})"
                 + (f" and {1 / max_s:.1f} tok/s on {profile.device.name}" if max_s else ""))
    plan = solve(sensitivity, max_file_bytes=budget, min_file_bytes=int(LEAST_FILL * budget), device=device,
                 max_decode_s_per_token=max_s)
    plan.sensitivity_seconds = sensitivity.seconds
    plan.against_named = against_named(sensitivity, plan.types, named, quant)
    return plan

