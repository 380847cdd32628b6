"""Before long work starts: how much memory and disk a run will need, which path to take, and a clear refusal
when this machine cannot do it.

The model's size is read from file headers only (safetensors headers, the GGUF header). The estimates err
high. They were fitted on this project's runs on a 2-core, 24 GB machine: SmolLM2-135M exports in memory at
2.7 GB peak RSS; streamed, a layer's float32 weights are held about three times over (the weights, their pruned
copies, the load buffers), the importance-matrix and reconstruction streams hold the hidden states of the
calibration tokens, and the ridge refit of down_proj holds two float64 n_ff × n_ff matrices.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgeprune.core.errors import EdgepruneError

GIB = 1 << 30
RUNTIME_BYTES = int(1.5 * GIB)  # Python, torch, transformers and llama.cpp loaded, before any weights
COMFORTABLE = 0.5  # the in-memory path is taken when its estimate is at most this share of the available RAM
STREAMING = ("auto", "on", "off")


@dataclass(frozen=True)
class ModelSize:
    """What the estimates need, from headers alone."""

    n_params: int
    stored_bytes: int
    n_layers: int
    hidden: int
    n_ff: int
    vocab: int

    @property
    def layer_params(self) -> int:
        return (self.n_params - 2 * self.vocab * self.hidden) // max(self.n_layers, 1)


@dataclass(frozen=True)
class Resources:
    """The estimates for one run, and the path chosen."""

    streamed: bool
    peak_bytes: int
    disk_bytes: int
    in_memory_bytes: int
    available_bytes: int
    free_disk_bytes: int

    def describe(self) -> str:
        return (f"{'layer-streamed' if self.streamed else 'in-memory'} path: about {self.peak_bytes / GIB:.1f} GiB of "
                f"RAM ({self.available_bytes / GIB:.1f} available) and {self.disk_bytes / GIB:.1f} GiB of disk "
                f"({self.free_disk_bytes / GIB:.1f} free)")


def model_size(path: str | Path) -> ModelSize:
    """Parameter counts from the safetensors headers or the GGUF header, without reading a weight."""
    import numpy as np

    path = Path(path)
    if path.is_dir():
        from edgeprune.build.weights import read_safetensors_header

        shapes: dict[str, tuple[int, ...]] = {}
        stored = 0
        for file in sorted(path.glob("*.safetensors")):
            header, _ = read_safetensors_header(file)
            for name, info in header.items():
                if name != "__metadata__":
                    shapes[name] = tuple(info["shape"])
                    stored += info["data_offsets"][1] - info["data_offsets"][0]
        if not shapes:  # pickle weights: their size on disk is the best guess there is
            stored = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth"))
            return ModelSize(stored // 2, stored, 1, 1, 1, 0)
        embed = shapes.get("model.embed_tokens.weight", (0, 0))
        gate = [s for n, s in shapes.items() if n.endswith("mlp.gate_proj.weight")]
        return ModelSize(sum(int(np.prod(s)) for s in shapes.values()), stored, len(gate), embed[1],
                         max((s[0] for s in gate), default=0), embed[0])
    from edgeprune.device.gguf_check import read_gguf

    info = read_gguf(path)
    tensors = {t.name: t for t in info.reader.tensors}
    embed = tensors.get("token_embd.weight")
    gates = [t for n, t in tensors.items() if n.endswith("ffn_gate.weight")]
    return ModelSize(sum(int(t.n_elements) for t in tensors.values()), sum(int(t.n_bytes) for t in tensors.values()),
                     info.block_count, int(embed.shape[0]) if embed is not None else 0,
                     max((int(t.shape[1]) for t in gates), default=0), int(embed.shape[1]) if embed is not None else 0)


def in_memory_peak(size: ModelSize) -> int:
    """The whole model in float32, about three times over (load, dequantization, pruning copies)."""
    return RUNTIME_BYTES + 3 * 4 * size.n_params


def streamed_peak(size: ModelSize, calibration_tokens: int, pruning: bool) -> int:
    """The largest of the streamed phases: one layer at work, or the embedding matrix being written."""
    layer = 3 * 4 * size.layer_params + 3 * 4 * calibration_tokens * size.hidden
    if pruning:  # down_proj's captured inputs (float32 and float64) and the refit's two n_ff² float64 matrices
        layer += 12 * calibration_tokens * size.n_ff + 2 * 8 * size.n_ff ** 2
    embedding = 6 * size.vocab * size.hidden  # float32 and float16 copies while it is written
    return RUNTIME_BYTES + max(layer, embedding)


def disk_needed(size: ModelSize, *, reference: bool, quantized: bool) -> int:
    """The F16 files written (the output or its intermediate, and the reference), plus the quantized output."""
    f16 = 2 * size.n_params
    return f16 * (2 if reference else 1) + (f16 // 2 if quantized else 0)


def readable(n_bytes: int) -> str:
    """GiB for sizes a model run has, MiB below one GiB, so a small shortfall does not read as 0.0 against 0.0."""
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping); total RAM elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_resources(model_path: str | Path, out_dir: Path, streaming: str, *, calibration_tokens: int,
                   pruning: bool, reference: bool, quantized: bool) -> Resources:
    """Choose the path (`streaming` auto: streamed when the in-memory estimate is over half the available RAM)
    and refuse, in one line, a run that this machine's memory or disk cannot hold."""
    if streaming not in STREAMING:
        raise EdgepruneError(f"unknown --streaming {streaming!r}: choose one of {', '.join(STREAMING)}")
    size = model_size(model_path)
    available = available_memory()
    in_memory = in_memory_peak(size)
    streamed = streaming == "on" or (streaming == "auto" and in_memory > COMFORTABLE * available)
    peak = streamed_peak(size, calibration_tokens, pruning) if streamed else in_memory
    disk = disk_needed(size, reference=reference, quantized=quantized)
    free = shutil.disk_usage(out_dir if out_dir.exists() else out_dir.parent).free
    found = Resources(streamed, peak, disk, in_memory, available, free)
    if peak > available:
        fix = ("use fewer calibration sequences (--calib-sequences) or a machine with more memory" if streamed else
               "use --streaming auto or on, which reads the model one layer at a time")
        raise EdgepruneError(f"{Path(model_path).name} needs about {readable(peak)} of RAM on the "
                             f"{'layer-streamed' if streamed else 'in-memory'} path and this machine has "
                             f"{readable(available)} available: {fix}")
    if disk > free:
        raise EdgepruneError(f"not enough disk: the output needs about {readable(disk)} and {out_dir} has "
                             f"{readable(free)} free: free some space or choose another --out")
    return found
