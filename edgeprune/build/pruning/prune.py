"""prune_model: score, allocate, cut and recover, in one or more steps, on a transformers Llama in place."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from edgeprune.build.calibration import calibration_batches, collect_calibration
from converters import per_layer_widths
from edgeprune.core.errors import EdgepruneError
from edgeprune.core.families import family_of
from edgeprune.core.shapes import LayerShape, ModelShape, shape_of
from edgeprune.build.pruning.allocation import (
    LayerPlan, build_plans, channel_units, head_units, select_adaptive, select_uniform,
)
from edgeprune.build.pruning.criteria import CRITERIA, NEEDS_STATISTICS, accumulate_gradients, release_gradients, score_layers
from edgeprune.build.pruning.evaluate import mean_nll
from edgeprune.build.pruning.recovery import bias_compensation, plain_removal, reconstruct_sequentially
from edgeprune.build.pruning.surgery import add_output_bias, head_index, remove_layers, shrink_attention, shrink_mlp, sync_config

DEFAULT_METHOD = "edgeprune"
METHODS = (DEFAULT_METHOD, *CRITERIA)
ALLOCATIONS = ("uniform", "adaptive")
HEAD_MODES = ("auto", "per-group", "kv-groups")
RECOVERIES = ("none", "bias", "reconstruct")
# The refit's regularization, relative to the mean input energy (recovery.ridge_refit). Chosen on both held-out
# texts: `python -m edgeprune.build.bench.pruning --ratios 0.2 0.3 --methods edgeprune --ridges 0.05 0.5 5` on SmolLM2
# (PPL odd reference topics / The Tempest, uniform): 20% 13.55 / 85.56, 13.27 / 78.16, 13.55 / 78.49; 30% 15.55 /
# 131.78, 14.82 / 110.97, 15.71 / 116.19. 0.5 has the lowest mean Δ log PPL over both texts at both ratios and for
# both allocations (adaptive at 20%, ridge 5 is 1% better on The Tempest and 3% worse in-domain).
RIDGE = 0.5
TAYLOR_SEQUENCES = 8  # backward passes cost ~3 forwards; a few sequences rank channels well enough
AUTO_SEQUENCES = 8  # calibration sequences that decide head_mode="auto"

Progress = Callable[[str], None]


@dataclass
class PruneOptions:
    """What to remove and how. Ratios are fractions of the attention (q,k,v,o) and MLP parameters of the
    layers left after `layers` whole layers are dropped by block influence.

    `method` names the importance criterion; the default "edgeprune" ranks by FLAP's fluctuation, and the
    default recovery refits o_proj/down_proj by ridge least squares layer by layer. FLAP as published is
    method="flap", recovery="bias", allocation="adaptive". Uniform allocation exports as `llama`, adaptive
    as `deci`. Uniform is the default, chosen on both held-out texts (the RIDGE bench run, ridge 0.5; PPL odd
    reference topics / The Tempest, dense 11.74 / 37.41): at 20% uniform 13.27 / 78.16 against adaptive 13.48 / 74.66 (mean
    Δ log PPL 0.430 against 0.415), at 30% 14.82 / 110.97 against 16.50 / 139.98 (0.660 against 0.830). Adaptive
    is a little better on the mean at 20% through The Tempest, uniform far better at 30% on both texts, and its
    `llama` GGUF loads in every runtime. `align` is the multiple kept FFN
    widths land on (256 for K-quants, 32 otherwise). `ridge` is the refit's regularization (RIDGE).
    """

    heads: float = 0.0
    ffn: float = 0.0
    layers: int = 0
    method: str = DEFAULT_METHOD
    allocation: str = "uniform"
    head_mode: str = "auto"
    recovery: str = "reconstruct"
    align: int = 32
    steps: int = 1
    calib_sequences: int = 32
    calib_seq_len: int = 256
    seed: int = 0
    ridge: float = RIDGE

    def validate(self, n_layers: int) -> None:
        for name, allowed in (("method", METHODS), ("allocation", ALLOCATIONS), ("head_mode", HEAD_MODES),
                              ("recovery", RECOVERIES)):
            if getattr(self, name) not in allowed:
                raise EdgepruneError(f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        for name in ("heads", "ffn"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise EdgepruneError(f"{name} ratio {getattr(self, name)} is outside [0, 1): give e.g. 0.2")
        if not 0 <= self.layers < n_layers:
            raise EdgepruneError(f"cannot remove {self.layers} of {n_layers} layers: give 0 … {n_layers - 1}")
        if not (self.heads or self.ffn or self.layers):
            raise EdgepruneError("nothing to prune: give --heads or --ffn above zero, or --layers 1 or more")
        for name in ("align", "steps", "calib_sequences", "calib_seq_len"):
            if getattr(self, name) < 1:
                raise EdgepruneError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.ridge > 0:
            raise EdgepruneError(f"ridge must be above zero, got {self.ridge}")

    @property
    def criterion(self) -> str:
        """The criterion behind the method name (the default measured best of those in CRITERIA)."""
        return "flap" if self.method == DEFAULT_METHOD else self.method


@dataclass
class PruneResult:
    model: torch.nn.Module
    shape: ModelShape
    removed_params: int
    decoder_params_before: int
    seconds: float
    details: dict = field(default_factory=dict)


def _attention_params(s: LayerShape, d: int, head_dim: int) -> int:
    return 2 * d * head_dim * (s.n_head + s.n_head_kv)


def _mlp_params(s: LayerShape, d: int) -> int:
    return 3 * d * s.n_ff


def check_family(options: PruneOptions, config) -> None:
    """Refuse what the family's llama.cpp graph cannot hold: per-layer widths where its loader reads one width
    for every layer, output biases (FLAP's compensation) where it has none (Qwen3, Gemma 3)."""
    family = family_of(config)
    if options.allocation == "adaptive" and not per_layer_widths(config):
        raise EdgepruneError(f"--allocation adaptive gives layers their own widths, but llama.cpp's {family.gguf_arch} "
                             f"loader creates every layer at layer 0's: use --allocation uniform")
    if options.recovery == "bias" and not family.output_biases:
        raise EdgepruneError(f"recovery 'bias' adds o_proj/down_proj biases, which llama.cpp's {family.gguf_arch} "
                             "graph does not have: use recovery 'reconstruct' (refits the weights only) or 'none'")


def prune_targets(base: ModelShape, current: ModelShape, options: PruneOptions, fraction: float) -> tuple[float, float]:
    """Attention and MLP parameters still to remove so that `fraction` of the ratios' totals (of `base`, after
    layer removal) is gone from `current`: cumulative targets, so each iterative step re-scores what is left."""
    d, hd = base.hidden_size, base.head_dim
    attn_total = sum(_attention_params(s, d, hd) for s in base.layers)
    mlp_total = sum(_mlp_params(s, d) for s in base.layers)
    head_target = options.heads * attn_total * fraction - (attn_total - sum(
        _attention_params(s, d, hd) for s in current.layers))
    ffn_target = options.ffn * mlp_total * fraction - (mlp_total - sum(_mlp_params(s, d) for s in current.layers))
    return head_target, ffn_target


def _drop_layers(model, ids, options: PruneOptions, progress: Progress | None) -> list[int]:
    """ShortGPT: remove the layers whose output is most like their input; layer 0 always stays."""
    stats = collect_calibration(model, ids, n_seq=options.calib_sequences, seq_len=options.calib_seq_len,
                                include_lm_head=False, progress=progress)
    influence = stats.block_influence()
    influence[0] = np.inf
    drop = sorted(int(i) for i in np.argsort(influence, kind="stable")[: options.layers])
    remove_layers(model, drop)
    return drop


def plan_removals(shape: ModelShape, scores, options: PruneOptions, head_mode: str, head_target: float,
                  ffn_target: float) -> list[LayerPlan]:
    """Which heads and channels each layer loses for the targets (the in-memory and streamed paths share it)."""
    d, hd = shape.hidden_size, shape.head_dim
    heads = [head_units(i, s, sc.heads, head_mode, d, hd) for i, (s, sc) in enumerate(zip(shape.layers, scores))]
    chans = [channel_units(i, s.n_ff, sc.channels, options.align, d) for i, (s, sc) in enumerate(zip(shape.layers, scores))]
    if options.allocation == "uniform":
        head_taken = select_uniform(heads, head_target, keep_last=True)
        chan_taken = select_uniform(chans, ffn_target, keep_last=False)
    else:
        head_taken = select_adaptive(heads, head_target, protected_last={0})
        chan_taken = select_adaptive(chans, ffn_target, protected_last=set())
    return build_plans(list(shape.layers), head_taken, chan_taken)


def _apply_direct(model, plans: list[LayerPlan], stats, recovery: str, head_dim: int) -> None:
    """Cut every layer with bias compensation or none; the statistics come from the unpruned model."""
    for i, (layer, plan) in enumerate(zip(model.model.layers, plans)):
        moved = cut_layer(i, layer, plan, stats, recovery, head_dim)
        if moved is not None:  # deci has no attention tensors: move the bias up
            previous = model.model.layers[i - 1].mlp
            previous.down_proj = add_output_bias(previous.down_proj, moved)


def cut_layer(index: int, layer, plan: LayerPlan, stats, recovery: str, head_dim: int):
    """Cut one layer with bias compensation ("bias") or none; returns the attention bias that must move to the
    previous layer's down_proj when all its heads went, else None."""
    prefix, moved = f"model.layers.{index}", None
    if getattr(layer.self_attn, "q_proj", None) is not None:
        o_proj, keep = layer.self_attn.o_proj, head_index(plan.keep_heads, head_dim)
        if recovery == "bias":
            w, b = bias_compensation(o_proj, keep, stats.mean(f"{prefix}.self_attn.o_proj"))
        else:
            w, b = plain_removal(o_proj, keep)
        if len(plan.keep_heads) == 0 and b is not None:
            moved = b
        shrink_attention(layer, plan.keep_heads, plan.keep_kv, head_dim, w, b)
    down, keep = layer.mlp.down_proj, torch.as_tensor(plan.keep_channels, dtype=torch.long)
    if recovery == "bias":
        w, b = bias_compensation(down, keep, stats.mean(f"{prefix}.mlp.down_proj"))
    else:
        w, b = plain_removal(down, keep)
    shrink_mlp(layer, plan.keep_channels, w, b)
    return moved


def _choose_head_mode(model, shape, scores, options, head_target, stats, batches) -> tuple[str, dict]:
    """head_mode="auto": cut the heads both ways on copies (bias recovery, cheap) and keep the lower loss."""
    losses = {}
    recovery = "bias" if options.recovery != "none" and family_of(model.config).output_biases else "none"
    for mode in ("per-group", "kv-groups"):
        trial = copy.deepcopy(model)
        _apply_direct(trial, plan_removals(shape, scores, options, mode, head_target, 0), stats, recovery, shape.head_dim)
        losses[mode] = mean_nll(trial, batches[:AUTO_SEQUENCES], first=0)
        del trial
    return min(losses, key=losses.get), losses


def _prune_step(model, ids, batches, options: PruneOptions, head_mode: str, head_target: float,
                ffn_target: float, progress: Progress | None) -> tuple[str, dict]:
    """Score what is left, allocate the step's budget, cut and recover; returns the head mode it used."""
    shape = shape_of(model)
    stats = None
    if options.criterion in NEEDS_STATISTICS or options.recovery == "bias" or (head_mode == "auto" and options.heads):
        stats = collect_calibration(model, ids, n_seq=options.calib_sequences, seq_len=options.calib_seq_len,
                                    include_lm_head=False, progress=progress)
    if options.criterion == "taylor":
        accumulate_gradients(model, batches[:TAYLOR_SEQUENCES])
    scores = score_layers(model, options.criterion, stats, shape.head_dim, seed=options.seed)
    if options.criterion == "taylor":
        release_gradients(model)
    details: dict = {}
    if head_mode == "auto":
        head_mode = "per-group"
        if options.heads:
            head_mode, details["head_mode_losses"] = _choose_head_mode(
                model, shape, scores, options, head_target, stats, batches)
    plans = plan_removals(shape, scores, options, head_mode, head_target, ffn_target)
    if options.recovery == "reconstruct":
        reconstruct_sequentially(model, plans, batches, shape.head_dim, options.ridge, progress)
    else:
        _apply_direct(model, plans, stats, options.recovery, shape.head_dim)
    return head_mode, details


def prune_model(
    model: torch.nn.Module, calib_token_ids: list[int], options: PruneOptions, progress: Progress | None = None,
    recover: Callable[[torch.nn.Module, int], None] | None = None,
) -> PruneResult:
    """Prune `model` in place and return it with its new shape; see PruneOptions for what is removed. `recover`
    (e.g. distillation) runs after each of the `steps`, so the next step scores a recovered model: iterative
    prune-and-recover."""
    start = time.perf_counter()
    before = shape_of(model)
    options.validate(before.n_layers)
    check_family(options, model.config)
    batches = calibration_batches(calib_token_ids, options.calib_sequences, options.calib_seq_len,
                                  model.config.bos_token_id)
    details: dict = {"method": options.method, "criterion": options.criterion, "allocation": options.allocation,
                     "recovery": options.recovery, "calibration_tokens": batches.numel(), "steps": []}
    if options.layers:
        details["dropped_layers"] = _drop_layers(model, calib_token_ids, options, progress)
    base = shape_of(model)
    head_mode = options.head_mode
    n_steps = options.steps if options.heads or options.ffn else 0
    for step in range(1, n_steps + 1):
        shape = shape_of(model)
        head_target, ffn_target = prune_targets(base, shape, options, step / options.steps)
        head_mode, step_details = _prune_step(model, calib_token_ids, batches, options, head_mode, head_target,
                                              ffn_target, progress)
        details["steps"].append(step_details)
        if progress:
            progress(f"pruning step {step}/{options.steps} done")
        if recover is not None:
            sync_config(model)
            recover(model, step)
    details["head_mode"] = head_mode
    sync_config(model)
    after = shape_of(model)
    if after.decoder_params() == before.decoder_params():
        raise EdgepruneError(f"the pruning ratios remove nothing from this model (heads {options.heads:g}, ffn "
                             f"{options.ffn:g}): each layer keeps whole heads and FFN widths on multiples of "
                             f"{options.align}; give larger ratios")
    details["widths"] = [(s.n_head, s.n_head_kv, s.n_ff) for s in after.layers]
    return PruneResult(
        model=model,
        shape=after,
        removed_params=before.decoder_params() - after.decoder_params(),
        decoder_params_before=before.decoder_params(),
        seconds=time.perf_counter() - start,
        details=details,
    )
