"""Model input: a Hugging Face Llama-family directory or GGUF becomes a float torch model plus tokenizer.

Model files are untrusted input. Everything is checked before it is loaded: the architecture, the
safetensors headers against the file sizes, the GGUF header against its tensors. Pickle weights are
refused unless the user names the risk, and remote code never runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from converters import check_config, family_writer
from converters.config import config_defaults
from converters.rope import check_rope_scaling, rope_parameters
from converters.vocab import Vocab, vocab_from_gguf, vocab_from_hf_dir

from edgeprune.core.errors import EdgepruneError
from edgeprune.core.shapes import DEFAULT_SWA_PATTERN, swa_pattern
from edgeprune.core.families import MODEL_TYPES, family_for_gguf, family_for_model_type, family_of
from edgeprune.device.gguf_check import read_gguf
from edgeprune.build.weights import GGUFWeights, SafetensorsWeights, read_safetensors_header

SUPPORTED = ("a Hugging Face directory of a Llama, Mistral, Qwen2/2.5, Qwen3 or Gemma 3 model (config.json, "
             "*.safetensors, tokenizer) or a llama, qwen2, qwen3 or gemma3 .gguf")
Progress = Callable[[str], None]


@dataclass
class LoadedModel:
    model: torch.nn.Module  # transformers LlamaForCausalLM (or its family's), float32, eval mode
    tokenizer: object  # transformers tokenizer, used to tokenize calibration text
    vocab: Vocab  # what the GGUF's tokenizer section will hold
    name: str
    source: Path
    context_length: int


def load_model(path: str | Path, *, allow_pickle: bool = False, progress: Progress | None = None) -> LoadedModel:
    path = Path(path)
    say = progress or (lambda _msg: None)
    if not path.exists():
        raise EdgepruneError(f"model path {path} does not exist: give {SUPPORTED}")
    say(f"loading {path}")
    if path.is_dir():
        loaded = _load_hf_directory(path, allow_pickle)
    elif path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        loaded = _load_gguf(path)
    else:
        raise EdgepruneError(f"{path} is neither a directory nor a GGUF file: give {SUPPORTED}")
    _check_finite(loaded.model, path)
    loaded.model.eval()
    return loaded


@dataclass
class LazyModel:
    """A model opened without loading its weights: the layer-streamed pipeline reads them one layer at a time."""

    weights: SafetensorsWeights | GGUFWeights
    config: object  # transformers LlamaConfig (or its family's)
    tokenizer: object
    vocab: Vocab
    name: str
    source: Path
    context_length: int

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(self.weights.shape(n))) for n in self.weights.names())


def open_model(path: str | Path, progress: Progress | None = None) -> LazyModel:
    """Check and open a model for the layer-streamed pipeline: config, tokenizer and vocab now, weights later."""
    path = Path(path)
    if not path.exists():
        raise EdgepruneError(f"model path {path} does not exist: give {SUPPORTED}")
    (progress or (lambda _msg: None))(f"opening {path} (weights are read layer by layer)")
    if path.is_dir():
        raw, safetensors = _check_hf_directory(path, allow_pickle=False)
        config = family_for_model_type(raw["model_type"], str(path)).transformers_class("Config").from_pretrained(path)
        weights = SafetensorsWeights(safetensors)
        name, context, tokenizer = raw.get("_name_or_path") or path.name, _context_length(raw), \
            load_tokenizer(path, {})
        vocab = vocab_from_hf_dir(path, config.vocab_size)
    elif path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        info = read_gguf(path)
        config = _gguf_config(path, info)
        weights = GGUFWeights(path, config.num_attention_heads, config.num_key_value_heads,
                              family_writer(family_of(config)), info.reader)
        config.tie_word_embeddings = "lm_head.weight" not in weights.names()
        name, context, tokenizer = info.name or path.stem, info.context_length, load_tokenizer(path.parent, {"gguf_file": path.name})
        vocab = vocab_from_gguf(info.reader)
    else:
        raise EdgepruneError(f"{path} is neither a directory nor a GGUF file: give {SUPPORTED}")
    _check_lazy_tensors(weights, config, path)
    config._attn_implementation = "sdpa"  # what from_pretrained picks here, so both paths run the same kernels
    return LazyModel(weights, config, tokenizer, vocab, name, path, context)


def _check_lazy_tensors(weights, config, path: Path) -> None:
    """The tensors the config implies, present and no others: the lazy twin of from_pretrained's key check.
    A layer's tensors are those its family's decoder layer has (built on the meta device: no memory)."""
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        expected.add("lm_head.weight")
    with torch.device("meta"):
        layer_names = family_of(config).transformers_class("DecoderLayer")(config, layer_idx=0).state_dict().keys()
    for i in range(config.num_hidden_layers):
        expected |= {f"model.layers.{i}.{name}" for name in layer_names}
    found = weights.names() - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    disagreeing = sorted(expected ^ found)
    if disagreeing:
        raise EdgepruneError(f"{path} does not match its config ({', '.join(disagreeing[:3])}"
                             f"{', …' if len(disagreeing) > 3 else ''}): the checkpoint is incomplete or its config was edited")


def layer_count(path: str | Path) -> int:
    """The model's decoder layers, read from config.json or the GGUF header without loading any weights, so that
    flags such as --layers are checked before the long work starts."""
    path = Path(path)
    if not path.exists():
        raise EdgepruneError(f"model path {path} does not exist: give {SUPPORTED}")
    if path.is_dir():
        count = _read_config(path).get("num_hidden_layers")
        if not isinstance(count, int) or count < 1:
            raise EdgepruneError(f"{path}/config.json has no valid num_hidden_layers: the checkpoint's config is damaged")
        return count
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return read_gguf(path).block_count
    raise EdgepruneError(f"{path} is neither a directory nor a GGUF file: give {SUPPORTED}")


def save_hf_directory(loaded: LoadedModel, directory: str | Path) -> Path:
    """Write a plain Hugging Face checkpoint (safetensors + tokenizer), e.g. to compare with other converters."""
    directory = Path(directory)
    loaded.model.save_pretrained(directory, safe_serialization=True)
    loaded.tokenizer.save_pretrained(directory)
    return directory


# --- Hugging Face directories

def _check_hf_directory(directory: Path, allow_pickle: bool) -> tuple[dict, list[Path]]:
    """The checked config and the safetensors files (empty when only trusted pickle weights are there)."""
    config = _read_config(directory)
    safetensors = sorted(directory.glob("*.safetensors"))
    pickles = sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt")) + sorted(directory.glob("*.pth"))
    if safetensors:
        for f in safetensors:
            read_safetensors_header(f)  # every tensor inside the file, before anything is allocated
    elif pickles and not allow_pickle:
        raise EdgepruneError(
            f"{directory} has only pickle weights ({pickles[0].name}), which can run arbitrary code when loaded: "
            "convert them to safetensors, or pass --allow-pickle if you trust the file"
        )
    elif not pickles:
        raise EdgepruneError(f"{directory} has no weights: expected model.safetensors (or shards) next to config.json")
    if not ((directory / "tokenizer.json").is_file() or (directory / "tokenizer.model").is_file()):
        raise EdgepruneError(f"{directory} has no tokenizer: expected tokenizer.json or tokenizer.model")
    return config, safetensors


def _load_hf_directory(directory: Path, allow_pickle: bool) -> LoadedModel:
    config, safetensors = _check_hf_directory(directory, allow_pickle)
    causal_lm = family_for_model_type(config["model_type"], str(directory)).transformers_class("ForCausalLM")
    try:
        model, info = causal_lm.from_pretrained(
            directory, dtype=torch.float32, use_safetensors=bool(safetensors), trust_remote_code=False,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise EdgepruneError(f"cannot load {directory}: {_first_line(exc)}") from exc
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    disagreeing = sorted(set(info.get("missing_keys", [])) - tied) + sorted(info.get("unexpected_keys", [])) + \
        sorted(str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys", []))
    if disagreeing:
        raise EdgepruneError(
            f"{directory}/config.json does not match the weights ({', '.join(disagreeing[:3])}"
            f"{', …' if len(disagreeing) > 3 else ''}): the checkpoint is incomplete or its config was edited"
        )
    tokenizer = load_tokenizer(directory, {})
    vocab = vocab_from_hf_dir(directory, model.config.vocab_size)
    return LoadedModel(model, tokenizer, vocab, config.get("_name_or_path") or directory.name, directory,
                       _context_length(config))


def _read_config(directory: Path) -> dict:
    """config.json, checked: a supported family, and nothing in it that llama.cpp would run differently."""
    path = directory / "config.json"
    if not path.is_file():
        raise EdgepruneError(f"{directory} has no config.json: give {SUPPORTED}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgepruneError(f"{path} is not valid JSON: {exc}") from exc
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        archs = ", ".join(config.get("architectures") or []) or "unknown"
        family_for_model_type(model_type, f"{directory} ({archs})")  # refuses, naming what is supported
    check_config(config, f"{directory}/config.json")
    check_rope_scaling(rope_parameters(SimpleNamespace(**config)), f"{directory}/config.json")
    return config


def _context_length(config: dict) -> int:
    """max_position_embeddings, or when config.json leaves it out the value transformers' class takes."""
    value = config.get("max_position_embeddings")
    return int(config_defaults(config["model_type"])["max_position_embeddings"] if value is None else value)


# --- GGUF files

def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _load_gguf(path: Path) -> LoadedModel:
    """Every tensor through the lazy GGUF reader (q/k rows and biases un-permuted), into a model built from the
    GGUF's own metadata. transformers' GGUF loader is not used: it drops biases and rope scaling without a word."""
    lazy = open_model(path)
    model = family_of(lazy.config).transformers_class("ForCausalLM")(lazy.config)
    missing, unexpected = model.load_state_dict({name: lazy.weights.load(name) for name in lazy.weights.names()},
                                                strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise EdgepruneError(f"{path} does not match its own metadata: tensors {sorted(unexpected or missing)[:3]} disagree")
    model.tie_weights()
    return LoadedModel(model, lazy.tokenizer, lazy.vocab, lazy.name, path, lazy.context_length)


def _gguf_config(path: Path, info):
    """A transformers config of the GGUF's family, read from its own keys and tensors, including what
    transformers' GGUF loader leaves out: q/k/v and MLP biases, and rope scaling (linear, YaRN, Llama-3's
    rope_freqs)."""
    family = family_for_gguf(info.architecture, str(path))

    def number(key: str, default=None):
        value = info.arch_value(key, default)
        if value is None:
            raise EdgepruneError(f"{path} has no {info.architecture}.{key}: the GGUF's metadata is incomplete")
        return value

    embedding = next((t for t in info.reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise EdgepruneError(f"{path} has no token_embd.weight: it is not a complete llama GGUF")
    n_head = int(number("attention.head_count"))
    hidden = int(number("embedding_length"))
    special = {kind: info.value(f"tokenizer.ggml.{kind}_token_id") for kind in ("bos", "eos", "padding")}
    config = family.transformers_class("Config")(  # the keys transformers' GGUF loader maps, read with the reader already open
        vocab_size=int(embedding.shape[1]), hidden_size=hidden, intermediate_size=int(number("feed_forward_length")),
        num_hidden_layers=info.block_count, num_attention_heads=n_head,
        num_key_value_heads=int(number("attention.head_count_kv", n_head)),
        head_dim=int(number("attention.key_length", number("rope.dimension_count", hidden // n_head))),
        max_position_embeddings=info.context_length, rms_norm_eps=float(number("attention.layer_norm_rms_epsilon")),
        bos_token_id=special["bos"], eos_token_id=special["eos"], pad_token_id=special["padding"],
    )
    names = {t.name for t in info.reader.tensors}
    if family.module == "llama":  # Qwen2's q/k/v biases are fixed by its architecture, Qwen3 and Gemma 3 have none
        config.attention_bias = "blk.0.attn_q.bias" in names
        config.mlp_bias = "blk.0.ffn_gate.bias" in names
    rope = {"rope_type": "default", "rope_theta": float(info.arch_value("rope.freq_base", 10000.0))}
    kind = str(info.arch_value("rope.scaling.type", "none"))
    if kind in ("linear", "yarn"):
        rope.update(rope_type=kind, factor=float(info.arch_value("rope.scaling.factor")))
    if kind == "yarn":
        rope["original_max_position_embeddings"] = int(info.arch_value("rope.scaling.original_context_length"))
        for key, name in (("yarn_attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                          ("yarn_beta_slow", "beta_slow")):
            if info.arch_value(f"rope.scaling.{key}") is not None:
                rope[name] = float(info.arch_value(f"rope.scaling.{key}"))
    elif kind not in ("none", "linear"):
        raise EdgepruneError(f"{path} uses rope scaling {kind!r}: edgeprune reads none, linear, yarn and Llama-3's "
                             "rope_freqs")
    if "rope_freqs.weight" in names:
        rope = _llama3_rope(path, info, rope, config)
    config.rope_parameters = rope
    if family.module == "gemma3":
        _gemma3_settings(info, config)
    return config


def _gemma3_settings(info, config) -> None:
    """What a gemma3 GGUF holds beyond Llama's keys, with llama.cpp's defaults where it says nothing
    (src/models/gemma3.cpp): the window and its per-layer pattern (every sixth layer global), the sliding
    layers' rope base (10,000), the logit soft-cap; the query scale is 1/sqrt(head_dim)."""
    from converters.gemma3 import DEFAULT_SWA_BASE

    window = int(info.arch_value("attention.sliding_window", 0) or 0)
    sliding = swa_pattern(info.arch_value("attention.sliding_window_pattern", DEFAULT_SWA_PATTERN),
                          config.num_hidden_layers)
    config.layer_types = ["sliding_attention" if window and swa else "full_attention" for swa in sliding]
    config.sliding_window = window or None
    config.query_pre_attn_scalar = config.head_dim
    config.final_logit_softcapping = info.arch_value("final_logit_softcapping")
    config.rope_parameters = {
        "full_attention": config.rope_parameters,
        "sliding_attention": {"rope_type": "default",
                              "rope_theta": float(info.arch_value("rope.freq_base_swa", DEFAULT_SWA_BASE))},
    }


def _llama3_rope(path: Path, info, rope: dict, config) -> dict:
    """Llama-3 rope scaling, recovered from the rope_freqs factors llama.cpp stores. The factors fix only the
    two wavelength thresholds, so the context length is taken as Llama-3.1's 8192 and the frequency factors
    solved from it; the recovered settings must give back the stored factors, or the GGUF is refused."""
    from converters.rope import llama3_rope_factors

    tensor = next(t for t in info.reader.tensors if t.name == "rope_freqs.weight")
    stored = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    wavelength = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    factor = float(stored.max())
    smooth = (1 / stored - 1 / factor) / (1 - 1 / factor) if factor > 1 else np.zeros_like(stored)
    between = (stored > 1 + 1e-6) & (stored < factor - 1e-6)
    context = 8192
    recovered = None
    if between.sum() >= 2:  # smooth = context / wavelength * a + b is a line in 1 / wavelength
        slope, intercept = np.polyfit(context / wavelength[between], smooth[between], 1)
        low, high = -intercept / slope, (1 - intercept) / slope
        recovered = {**rope, "rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
                     "high_freq_factor": float(high), "original_max_position_embeddings": context}
    if recovered is None or not np.allclose(llama3_rope_factors(recovered, head_dim).numpy(), stored, rtol=1e-5):
        raise EdgepruneError(f"{path} has rope_freqs factors that are not Llama-3's rope scaling: edgeprune cannot "
                             "reproduce them")
    return recovered


def load_tokenizer(directory: Path, kwargs: dict):
    """transformers' tokenizer; tokenizers raises a bare Exception on a damaged tokenizer.json, so catch all."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure here is the tokenizer file's
        raise EdgepruneError(f"cannot load the tokenizer in {directory}: {_first_line(exc)}") from exc


def _check_finite(model: torch.nn.Module, path: Path) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise EdgepruneError(f"{path} has NaN or Inf values in {name}: the checkpoint is damaged")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
