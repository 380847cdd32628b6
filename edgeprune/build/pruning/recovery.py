"""Recovery after removing input columns of o_proj / down_proj: none, FLAP's bias compensation, or a ridge
least-squares refit of the kept columns and a bias, layer by layer on the pruned model's own activations.

Bias compensation is the special case of the refit that may only move the bias, and only towards the
original model's mean; the refit also lets the kept columns absorb what correlated with the removed ones,
and it targets the original model's residual stream, so each layer corrects drift left by the ones before.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from edgeprune.build.calibration import (
    ChunkStore, LayerContext, ModelLayers, chunk_sizes, embed_chunks, has_sandwich_norms,
)
from edgeprune.core.families import family_of
from edgeprune.build.pruning.allocation import LayerPlan
from edgeprune.build.pruning.surgery import add_output_bias, head_index, shrink_attention, shrink_mlp

# The ridge refit's Gram matrices and solve run in float32: the ridge keeps them well conditioned. Measured on
# SmolLM2-135M, 20% of MLP channels (prune_model with PruneOptions(ffn=0.2), once with each dtype): the two pruned
# models' logits differ by a mean KLD below 1e-8 on 4×512 tokens of the odd reference topics, PPL 14.76574 against
# 14.76575 there and 63.8432 against 63.8430 on The Tempest, and the prune took 148 s instead of 177 s on 2 cores;
# on Gemma 3 270M, the same: weights within 2.3e-5 (relative), KLD below 1e-8, PPL 14.61364 against 14.61363 and
# 75.5523 against 75.5528, 130 s instead of 155 s.
# On an 8B layer the float64 refit is about 113 s of fp64 work (32.6 GFLOPS matmul, 26.4 solve here), float32
# about half of it (61.7 and 40.7).
REFIT_DTYPE = torch.float32


def bias_compensation(
    linear: torch.nn.Linear, keep: torch.Tensor, input_mean: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept columns unchanged; the removed columns' mean contribution becomes (part of) the bias."""
    w = linear.weight.detach()
    removed = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    removed[keep] = False
    mean = torch.as_tensor(input_mean, dtype=torch.float64, device=w.device)
    bias = w[:, removed].double() @ mean[removed]
    if linear.bias is not None:
        bias += linear.bias.detach().double()
    return w[:, keep], bias.to(w.dtype)


def plain_removal(linear: torch.nn.Linear, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = linear.bias.detach() if linear.bias is not None else None
    return linear.weight.detach()[:, keep], bias


def ridge_refit(
    linear: torch.nn.Linear, keep: torch.Tensor, kept_inputs: torch.Tensor, targets: torch.Tensor, ridge: float,
    fit_bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias over the kept columns that best map `kept_inputs` (tokens × kept columns) to `targets`
    (tokens × out). Without `fit_bias` (llama.cpp's qwen3 and gemma3 graphs have no o_proj/down_proj bias) only
    the weight is refitted and the layer keeps the bias it had, none.

    The ridge pulls towards the original kept columns and bias (not towards zero), scaled by the mean input
    energy, so few calibration tokens cannot wreck a wide layer.
    """
    w = linear.weight.detach()
    z = kept_inputs.to(REFIT_DTYPE)
    if fit_bias:
        z = torch.cat([z, torch.ones(len(z), 1, dtype=REFIT_DTYPE, device=z.device)], 1)
    # In place where it can be: the Gram matrix of an 8B model's down_proj is over half a GB in float32, and
    # `gzz + torch.diag(reg)` would hold three of them at once.
    gzz = (z.T @ z).div_(len(z))
    rhs = (targets.to(REFIT_DTYPE).T @ z).div_(len(z))
    del z
    columns = gzz.shape[1] - int(fit_bias)
    energy = float(gzz.diagonal()[:columns].mean()) if columns else 0.0
    reg = torch.full((gzz.shape[1],), ridge * energy, dtype=REFIT_DTYPE, device=gzz.device)
    prior = w[:, keep].to(REFIT_DTYPE)
    if fit_bias:
        reg[-1] = 0.0  # the bias is free: a constant shift costs nothing to fit
        prior = torch.cat([prior, _bias_or_zero(linear)[:, None]], 1)
    gzz.diagonal().add_(reg)
    rhs += prior * reg  # the pull to the prior
    # (a product then a sum, not addcmul_: its fused multiply-add rounds differently, and the refit must give the
    # bytes it gave before)
    solved = torch.linalg.solve(gzz, rhs.T).T
    if not fit_bias:
        return solved.to(w.dtype), (linear.bias.detach() if linear.bias is not None else None)
    return solved[:, :-1].to(w.dtype), solved[:, -1].to(w.dtype)


def _bias_or_zero(linear: torch.nn.Linear) -> torch.Tensor:
    if linear.bias is None:
        return torch.zeros(linear.out_features, dtype=REFIT_DTYPE, device=linear.weight.device)
    return linear.bias.detach().to(REFIT_DTYPE)


class _Capture:
    """Forward pre-hook that keeps the kept columns of the inputs a module sees, per chunk, flattened to
    tokens × kept columns: the refit's inputs, and, through the refitted module, the pruned layer's output
    without running its other projections again: one attention and one MLP pass fewer per layer (SmolLM2,
    20% of the FFN, 30 layers: 480 → 360 of each, reconstruction 45.6 → 43.2 s under cProfile).
    With `outputs`, a forward hook that keeps what the module returns instead (the refit's targets where a
    norm follows the projection)."""

    def __init__(self, module: torch.nn.Module, keep: torch.Tensor | None = None, outputs: bool = False):
        self.parts: list[torch.Tensor] = []
        if outputs:
            self.handle = module.register_forward_hook(
                lambda m, args, out: self.parts.append(out.detach().flatten(0, -2)))
        else:
            self.handle = module.register_forward_pre_hook(
                lambda m, args: self.parts.append(args[0].detach().flatten(0, -2)[:, keep]))

    def take(self) -> torch.Tensor:
        self.handle.remove()
        return torch.cat(self.parts)

    def add_output(self, ctx: LayerContext, module: torch.nn.Module, stream: ChunkStore,
                   norm: torch.nn.Module | None) -> ChunkStore:
        """`stream` plus `module` (the refitted projection) applied to the captured inputs, chunk by chunk, through
        the sub-layer's output norm where it has one: what the shrunk sub-layer adds to the residual stream."""
        parts = iter(self.parts)
        post = norm or (lambda y: y)
        return ctx.run(lambda x, _chunk: x + post(module(next(parts)).view_as(x)), stream)


def reconstruct_layer(ctx: LayerContext, layer: torch.nn.Module, plan: LayerPlan, original: ChunkStore,
                      pruned: ChunkStore, head_dim: int, ridge: float,
                      fit_bias: bool = True) -> tuple[ChunkStore, ChunkStore, torch.Tensor | None]:
    """Prune one layer, refitting o_proj and down_proj so that the pruned stream after each sub-layer matches the
    original model's. Returns both streams after the layer, and the constant the caller must add to the previous
    layer's down_proj when all heads went (deci has no attention tensors to hold it).

    Where a norm follows each projection (Gemma 3), a shift of the residual stream is not a linear function of
    the projection's output: there the refit targets the original projection's outputs on the original stream."""
    has_attention = getattr(layer.self_attn, "q_proj", None) is not None
    sandwich = has_sandwich_norms(layer)
    moved = None
    # the original sub-layers on the original stream give the targets
    o_outputs = _Capture(layer.self_attn.o_proj, outputs=True) if has_attention and sandwich else None
    mid_o = ctx.run(ctx.attention(layer), original) if has_attention else original
    o_targets = o_outputs.take() if o_outputs else None
    down_outputs = _Capture(layer.mlp.down_proj, outputs=True) if sandwich else None
    out_o = ctx.run(ctx.mlp(layer), mid_o)
    down_targets = down_outputs.take() if down_outputs else None
    if has_attention:
        keep = head_index(plan.keep_heads, head_dim)
        capture = _Capture(layer.self_attn.o_proj, keep)
        ctx.run(ctx.attention(layer), pruned)  # kept heads' outputs are the same before and after shrinking
        targets = o_targets if sandwich else torch.cat([(m - p).flatten(0, -2) for m, p in zip(mid_o, pruned)])
        o_weight, o_bias = ridge_refit(layer.self_attn.o_proj, keep, capture.take(), targets, ridge, fit_bias)
        del targets
        if len(plan.keep_heads) == 0:
            moved = o_bias
            pruned = ctx.run(lambda p, _chunk: p + o_bias, pruned)
        shrink_attention(layer, plan.keep_heads, plan.keep_kv, head_dim, o_weight, o_bias)
        post = layer.post_attention_layernorm if sandwich else None
        mid_p = capture.add_output(ctx, layer.self_attn.o_proj, pruned, post) if len(plan.keep_heads) else pruned
        del capture
    else:
        mid_p = pruned
    keep = torch.as_tensor(plan.keep_channels, dtype=torch.long)
    capture = _Capture(layer.mlp.down_proj, keep)
    ctx.run(ctx.mlp(layer), mid_p)
    targets = down_targets if sandwich else torch.cat([(o - m).flatten(0, -2) for o, m in zip(out_o, mid_p)])
    d_weight, d_bias = ridge_refit(layer.mlp.down_proj, keep, capture.take(), targets, ridge, fit_bias)
    del targets
    shrink_mlp(layer, plan.keep_channels, d_weight, d_bias)
    post = layer.post_feedforward_layernorm if sandwich else None
    return out_o, capture.add_output(ctx, layer.mlp.down_proj, mid_p, post), moved


def reconstruct_sequentially(
    model: torch.nn.Module,
    plans: list[LayerPlan],
    batches: torch.Tensor,
    head_dim: int,
    ridge: float,
    progress: Callable[[str], None] | None = None,
    batch_size: int = 8,
) -> None:
    """Prune an in-memory model layer by layer with reconstruct_layer."""
    source = ModelLayers(model)
    with torch.no_grad():  # not inference_mode: the new weights must stay trainable
        ctx = LayerContext(model.config, source.rotary_emb, chunk_sizes(len(batches), batch_size), batches.shape[1],
                           source.device)
        original = embed_chunks(source, batches, ctx, batch_size)
        pruned = original
        for i, plan in enumerate(plans):
            original, pruned, moved = reconstruct_layer(ctx, source.layer(i), plan, original, pruned, head_dim, ridge,
                                                        family_of(model.config).output_biases)
            if moved is not None:  # move the constant upstream
                previous = model.model.layers[i - 1].mlp
                previous.down_proj = add_output_bias(previous.down_proj, moved)
            if progress:
                progress(f"reconstruct: layer {i + 1}/{len(plans)}")
