"""Activation statistics from one forward pass over calibration text.

Every consumer (the quantizer's importance matrix, the pruning criteria, block influence) needs the same
per-input-column moments of the linear layers, so they are collected once, in float64 so that sums over
tens of thousands of tokens do not lose precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import EdgepruneError

Progress = Callable[[str], None]


@dataclass
class CalibrationStats:
    """Per input column of each nn.Linear: sum x, sum x², token count; per layer: input/output cosine."""

    text_name: str
    n_tokens: int
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    square_sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    layer_cosines: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def _known(self, name: str) -> None:
        if name not in self.counts:
            raise KeyError(f"no calibration statistics for module {name!r}")

    def mean(self, name: str) -> np.ndarray:
        self._known(name)
        return self.sums[name] / self.counts[name]

    def mean_square(self, name: str) -> np.ndarray:
        self._known(name)
        return self.square_sums[name] / self.counts[name]

    def variance(self, name: str) -> np.ndarray:
        """Population variance per column; clipped at 0 because E[x²]−E[x]² can round below it."""
        return np.maximum(self.mean_square(name) - self.mean(name) ** 2, 0.0)

    def imatrix(self) -> dict[str, np.ndarray]:
        """Mean of x² per input column, keyed by HF module name: exactly what llama-imatrix computes."""
        return {name: self.mean_square(name).astype(np.float32) for name in self.counts}

    def gguf_imatrix(self) -> dict[str, np.ndarray]:
        """imatrix() keyed by GGUF tensor name, the way llama.cpp's quantizer looks its entries up."""
        from converters import gguf_tensor_name

        named = {gguf_tensor_name(hf): values for hf, values in self.imatrix().items()}
        return {name: values for name, values in named.items() if name}

    def block_influence(self) -> np.ndarray:
        """1 − mean cosine(input, output) per decoder layer (ShortGPT): low means the layer barely acts."""
        return 1.0 - self.layer_cosines


class _Accumulator:
    """Forward hooks that add each linear input's column moments into a CalibrationStats."""

    def __init__(self, stats: CalibrationStats, n_layers: int):
        self.stats = stats
        self.cos_sum = np.zeros(n_layers)
        self.cos_count = np.zeros(n_layers)
        # q/k/v (and gate/up) receive the same tensor; remember the last one so its moments are computed once.
        self._last: tuple[torch.Tensor, np.ndarray, np.ndarray, int] | None = None

    def add(self, name: str, x: torch.Tensor) -> None:
        if self._last is None or self._last[0] is not x:
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            self._last = (x, flat.sum(0).cpu().numpy(), flat.square().sum(0).cpu().numpy(), flat.shape[0])
        _, s, sq, n = self._last
        st = self.stats
        if name in st.counts:
            st.sums[name] += s
            st.square_sums[name] += sq
            st.counts[name] += n
        else:
            st.sums[name], st.square_sums[name], st.counts[name] = s.copy(), sq.copy(), n

    def linear_hook(self, name: str):
        return lambda module, args: self.add(name, args[0])

    def output_hook(self, name: str):
        """For lm_head: record the final norm's output, so the logits never need computing."""
        return lambda module, args, output: self.add(name, output)

    def layer_hook(self, index: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            self.cos_sum[index] += cos.sum().item()
            self.cos_count[index] += cos.numel()

        return hook


def check_calibration_length(n_tokens: int, seq_len: int) -> None:
    """At least one whole calibration sequence is needed; checked early so that nothing is written first."""
    if n_tokens < seq_len:
        raise EdgepruneError(f"calibration text has {n_tokens} tokens, need at least {seq_len}: give a longer --calib file")


def calibration_batches(token_ids: list[int], n_seq: int, seq_len: int, bos_id: int | None) -> torch.Tensor:
    """Cut consecutive sequences from the token list; each starts with BOS, as llama-imatrix does."""
    check_calibration_length(len(token_ids), seq_len)
    available = len(token_ids) // seq_len
    n = min(n_seq, available)
    batch = torch.tensor(token_ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)
    if bos_id is not None:
        batch[:, 0] = bos_id
    return batch


def collect_calibration(
    model: torch.nn.Module,
    token_ids: list[int],
    *,
    n_seq: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    include_lm_head: bool = True,
    text_name: str = "",
    progress: Progress | None = None,
) -> CalibrationStats:
    """Run the model once over up to n_seq×seq_len calibration tokens and return activation statistics."""
    batches = calibration_batches(token_ids, n_seq, seq_len, model.config.bos_token_id)
    stats = CalibrationStats(text_name=text_name, n_tokens=batches.numel())
    layers = model.model.layers
    acc = _Accumulator(stats, len(layers))
    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(acc.layer_hook(i), with_kwargs=True))
            for sub, module in layer.named_modules():
                if isinstance(module, torch.nn.Linear):
                    handles.append(module.register_forward_pre_hook(acc.linear_hook(f"model.layers.{i}.{sub}")))
        if include_lm_head:
            handles.append(model.model.norm.register_forward_hook(acc.output_hook("lm_head")))
        device = next(model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(batches), batch_size):
                model.model(input_ids=batches[start : start + batch_size].to(device), use_cache=False)
                acc._last = None
                if progress:
                    done = min(start + batch_size, len(batches))
                    progress(f"calibration: {done}/{len(batches)} sequences of {seq_len} tokens")
    finally:
        for h in handles:
            h.remove()
    stats.layer_cosines = acc.cos_sum / np.maximum(acc.cos_count, 1)
    return stats
