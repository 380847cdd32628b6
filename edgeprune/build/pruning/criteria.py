"""Importance scores for query heads and FFN channels, one criterion per name; higher means keep.

A head or channel is what o_proj / down_proj reads as input columns, so activation-aware criteria score
those columns. Each criterion scores a projection's input columns from the modules that own them: the
same function serves heads (q_proj rows, o_proj columns) and channels (gate/up rows, down_proj columns).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from edgeprune.build.calibration import CalibrationStats

CRITERIA = ("magnitude", "wanda-sp", "flap", "taylor", "random")
NEEDS_STATISTICS = ("wanda-sp", "flap")


@dataclass
class LayerScores:
    heads: np.ndarray  # one score per query head; empty once the layer's attention is gone
    channels: np.ndarray  # one score per FFN channel


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _rows(w: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    return _np(f(w.detach().double()).sum(1))


def _cols(w: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    return _np(f(w.detach().double()).sum(0))


@dataclass
class _Group:
    """The modules owning one kind of structure: `inputs` produce it (rows), `output` reads it (columns)."""

    inputs: list[torch.nn.Linear]
    output: torch.nn.Linear
    output_name: str  # HF module name of `output`, the key of its input statistics
    block: int  # input columns per structure: head_dim for heads, 1 for FFN channels

    def per_block(self, column_scores: np.ndarray) -> np.ndarray:
        return column_scores.reshape(-1, self.block).sum(1)


def _magnitude(g: _Group, stats: CalibrationStats, rng: np.random.Generator) -> np.ndarray:
    """Squared L2 norm of every weight the structure owns: the textbook criterion, blind to activations."""
    return g.per_block(sum(_rows(m.weight, torch.square) for m in g.inputs) + _cols(g.output.weight, torch.square))


def _wanda_sp(g: _Group, stats: CalibrationStats, rng: np.random.Generator) -> np.ndarray:
    """Σ|W|·‖x‖ over the output projection's column: Wanda made structured, as in the FLAP paper's baseline."""
    return g.per_block(_cols(g.output.weight, torch.abs) * np.sqrt(stats.mean_square(g.output_name)))


def _flap(g: _Group, stats: CalibrationStats, rng: np.random.Generator) -> np.ndarray:
    """Fluctuation: input variance × squared column norm; a steady column can be replaced by a bias."""
    return g.per_block(_cols(g.output.weight, torch.square) * stats.variance(g.output_name))


def _taylor(g: _Group, stats: CalibrationStats, rng: np.random.Generator) -> np.ndarray:
    """First-order loss change Σ|W·∂L/∂W| over the structure's weights (LLM-Pruner's element-wise Taylor)."""

    def saliency(m: torch.nn.Linear) -> torch.Tensor:
        return (m.weight.detach() * m.weight.grad).double().abs()

    return g.per_block(sum(_np(saliency(m).sum(1)) for m in g.inputs) + _np(saliency(g.output).sum(0)))


def _random(g: _Group, stats: CalibrationStats, rng: np.random.Generator) -> np.ndarray:
    return rng.random(g.output.in_features // g.block)


_SCORERS = {"magnitude": _magnitude, "wanda-sp": _wanda_sp, "flap": _flap, "taylor": _taylor, "random": _random}


def accumulate_gradients(model: torch.nn.Module, batches: torch.Tensor, batch_size: int = 4) -> None:
    """Leave ∂(mean LM loss)/∂W in every decoder weight's .grad, for the Taylor criterion."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    model.requires_grad_(True)
    model.get_input_embeddings().requires_grad_(False)  # its gradient (the tied lm_head's too) is never used
    with torch.enable_grad():
        for start in range(0, len(batches), batch_size):
            batch = batches[start : start + batch_size].to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            (loss * len(batch) / len(batches)).backward()


def release_gradients(model: torch.nn.Module) -> None:
    """Free the gradients and leave requires_grad as from_pretrained sets it."""
    model.zero_grad(set_to_none=True)
    model.requires_grad_(True)


def score_layers(
    model: torch.nn.Module, criterion: str, stats: CalibrationStats | None, head_dim: int, seed: int = 0
) -> list[LayerScores]:
    """Score every layer's heads and channels. Activation-aware criteria need `stats` (magnitude, Taylor and
    random do not); Taylor expects accumulate_gradients to have run."""
    rng = np.random.default_rng(seed)
    return [score_layer(i, layer, criterion, stats, head_dim, rng) for i, layer in enumerate(model.model.layers)]


def score_layer(index: int, layer: torch.nn.Module, criterion: str, stats: CalibrationStats | None, head_dim: int,
                rng: np.random.Generator) -> LayerScores:
    """One layer's scores; layers scored in order with one `rng` give what score_layers gives (streaming)."""
    scorer = _SCORERS[criterion]
    attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{index}"
    channels = scorer(_Group([mlp.gate_proj, mlp.up_proj], mlp.down_proj, f"{prefix}.mlp.down_proj", 1), stats, rng)
    heads = np.zeros(0)
    if getattr(attn, "q_proj", None) is not None:
        heads = scorer(_Group([attn.q_proj], attn.o_proj, f"{prefix}.self_attn.o_proj", head_dim), stats, rng)
    return LayerScores(heads, channels)
