"""Perplexity in torch, computed the way llama-perplexity does, so torch and GGUF numbers compare directly."""

from __future__ import annotations

import math

import torch

from edgeprune.core.errors import EdgepruneError


def chunk_tokens(token_ids: list[int], n_ctx: int, n_chunks: int, bos_id: int | None) -> torch.Tensor:
    """Cut the token list into up to n_chunks chunks of n_ctx, each starting with BOS (llama-perplexity)."""
    n = min(n_chunks, len(token_ids) // n_ctx)
    if n == 0:
        raise EdgepruneError(
            f"evaluation text has {len(token_ids)} tokens, need at least {n_ctx}: give a longer --eval file"
        )
    chunks = torch.tensor(token_ids[: n * n_ctx], dtype=torch.long).reshape(n, n_ctx)
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def mean_nll(model: torch.nn.Module, chunks: torch.Tensor, first: int, batch_size: int = 4) -> float:
    """Mean next-token NLL of positions first … n−2 predicting first+1 … n−1; logits only where scored."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start : start + batch_size].to(device)
            hidden = model.model(input_ids=batch, use_cache=False).last_hidden_state[:, first:-1]
            logits = model.lm_head(hidden).float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, first + 1 :].reshape(-1), reduction="sum"
            )
            total += nll.item()
            count += hidden.shape[0] * hidden.shape[1]
    return total / count


def perplexity(model: torch.nn.Module, token_ids: list[int], *, n_ctx: int = 512, n_chunks: int = 20) -> float:
    """PPL over the second half of each chunk, as llama-perplexity reports it."""
    chunks = chunk_tokens(token_ids, n_ctx, n_chunks, model.config.bos_token_id)
    return math.exp(mean_nll(model, chunks, n_ctx // 2))
