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

# The ridge refit runs in float32, on centred inputs, by Cholesky in the smaller space (_ridge_fit): the ridge keeps
# it well conditioned. Measured against the earlier float64 LU refit of the uncentred system on SmolLM2-135M, 20% of
# MLP channels (prune_model with PruneOptions(ffn=0.2), 32 sequences, script in the stop 35 note): the pruned
# models' logits differ by a mean KLD of 3.6e-9 on 4×512 tokens of the odd reference topics, PPL 14.76574 against
# 14.76574 there and 63.8436 against 63.8432 on The Tempest; the prune took 152 s instead of 183 s on 2 cores. On
# random data of SmolLM2's and the 8B shapes it is nearer the float64 solution than a float32 LU was (weights 2-4e-7
# against 1e-6 relative, biases 9e-7 against 5e-5). An 8B down_proj refit on 2,048 tokens: 47 s -> 10 s.
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

    The ridge pulls towards the original kept columns (not towards zero), scaled by the mean input energy, so few
    calibration tokens cannot wreck a wide layer; the bias is free, since a constant shift costs nothing to fit.
    A free bias is the same as fitting centred inputs to centred targets, then setting the bias from the means.
    """
    w = linear.weight.detach()
    z, t = kept_inputs.to(REFIT_DTYPE), targets.to(REFIT_DTYPE)
    n, columns = z.shape
    energy = float(z.square().sum()) / (n * columns) if columns else 0.0  # the mean input energy, uncentred
    if fit_bias:
        z_mean, t_mean = z.mean(0), t.mean(0)
        z, t = z - z_mean, t - t_mean
    weight = _ridge_fit(z, t, w[:, keep].to(REFIT_DTYPE), n * ridge * energy)
    if not fit_bias:
        return weight.to(w.dtype), (linear.bias.detach() if linear.bias is not None else None)
    return weight.to(w.dtype), (t_mean - weight @ z_mean).to(w.dtype)


def _ridge_fit(z: torch.Tensor, t: torch.Tensor, prior: torch.Tensor, penalty: float) -> torch.Tensor:
    """argmin_W ‖z·Wᵀ − t‖² + p·‖W − prior‖², by Cholesky in the smaller of the two spaces. Over the columns:
    (zᵀz + pI)·Wᵀ = zᵀt + p·priorᵀ. Over the tokens, the same solution by the push-through identity:
    Wᵀ = priorᵀ + zᵀ(zzᵀ + pI)⁻¹(t − z·priorᵀ). An 8B down_proj refit on 8×256 tokens keeps about 11,500
    columns: the token side is 2,048 wide, 0.5 TFLOP where the column side's LU solve took 2.8."""
    n, columns = z.shape
    if columns == 0 or penalty == 0.0:  # nothing kept, or inputs that are all zero: the prior stands
        return prior
    if n < columns:
        residual = t - z @ prior.T
        gram = z @ z.T
        gram.diagonal().add_(penalty)
        return prior + (z.T @ torch.cholesky_solve(residual, torch.linalg.cholesky(gram))).T
    gram = z.T @ z
    gram.diagonal().add_(penalty)
    rhs = z.T @ t
    rhs += penalty * prior.T
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram)).T


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


def reconstruct_layer(ctx: LayerContext, layer: torch.nn.Module, plan: LayerPlan | Callable[[], LayerPlan],
                      original: ChunkStore, pruned: ChunkStore, head_dim: int, ridge: float,
                      fit_bias: bool = True) -> tuple[ChunkStore, ChunkStore, torch.Tensor | None]:
    """Prune one layer, refitting o_proj and down_proj so that the pruned stream after each sub-layer matches the
    original model's. Returns both streams after the layer, and the constant the caller must add to the previous
    layer's down_proj when all heads went (deci has no attention tensors to hold it).

    `plan` may be a function, called once the original sub-layers have run over the original stream: a caller
    that scores the layer from that run's activations (its hooks) plans it there, without a pass of its own.

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
    if callable(plan):
        plan = plan()
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
