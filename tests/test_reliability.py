"""Reliability: bad inputs, interruptions, untrusted files, fuzzed GGUFs and determinism.

Each bad input must end as one `edgeprune: error:` line, a non-zero exit and no file under a final name;
an interrupted export exits 130 and leaves nothing half-written; no corrupt GGUF may crash the process.
Together with test_cli_errors.py this covers over twenty classes of bad input.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gguf
import pytest

from conftest import CLI_ENV as ENV
from conftest import assert_clean_failure, build_bpe_tokenizer, build_tiny_llama, run_cli
from conftest import run_export as export

from edgeprune.core.errors import EdgepruneError
from edgeprune.device.gguf_check import read_gguf

PROFILE = "x86-laptop-16gb"


# --- helpers

def assert_edgeprune_error(fn, *args, expected: str) -> str:
    with pytest.raises(EdgepruneError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and expected.lower() in message.lower(), message
    return message


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def rewrite_gguf(src: Path, dst: Path, arch: str | None = None, rename: dict[str, str | None] | None = None,
                 **overrides) -> Path:
    """Copy a GGUF through gguf-py's writer, optionally under another architecture name, with some
    metadata values replaced (keys as they read after the rename, e.g. llama.block_count) and some
    tensors renamed (or dropped, for None)."""
    reader = gguf.GGUFReader(src)
    old_arch = reader.fields["general.architecture"].contents()
    arch = arch or old_arch
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        key = arch + key[len(old_arch):] if key.startswith(old_arch + ".") else key
        value = overrides.pop(key) if key in overrides else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    assert not overrides, f"keys not in the file: {overrides}"
    rename = rename or {}
    for tensor in reader.tensors:
        name = rename.get(tensor.name, tensor.name)
        if name is not None:
            writer.add_tensor(name, tensor.data.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def profile_text(**replace: str) -> str:
    """The shipped x86 laptop profile with some `key = value` lines replaced."""
    from edgeprune.device.profiles import load_profile

    lines = load_profile(PROFILE).path.read_text().splitlines()
    for key, value in replace.items():
        hits = [i for i, line in enumerate(lines) if line.split("=")[0].strip() == key]
        assert len(hits) == 1, key
        lines[hits[0]] = f"{key} = {value}"
    return "\n".join(lines) + "\n"


# --- fixtures: a tiny HF Llama and its GGUF, built once for this module

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "tiny"
    d.mkdir()
    build_bpe_tokenizer(d)
    vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    return build_tiny_llama(d, len(vocab) + 3)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory) -> Path:
    from converters import ConversionInput, write_gguf
    from edgeprune.build.loading import load_model

    loaded = load_model(tiny_dir)
    source = ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length)
    return write_gguf(source, tmp_path_factory.mktemp("gguf") / "tiny-F16.gguf", "F16")


# --- 1. bad inputs

@pytest.mark.parametrize("damage", ["cut in half", "cut mid-character", "merge of unknown tokens"])
def test_truncated_or_damaged_tokenizer_json(tiny_dir, tmp_path, damage):
    model = copy_model(tiny_dir, tmp_path / "tiny")
    path = model / "tokenizer.json"
    raw = path.read_bytes()
    if damage == "cut in half":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "cut mid-character":  # inside a multi-byte UTF-8 sequence
        path.write_bytes(raw[: next(i for i in range(len(raw) // 3, len(raw)) if raw[i] >= 0xC0) + 1])
    else:  # valid JSON that the tokenizers library refuses with a bare Exception
        data = json.loads(raw)
        data["model"]["merges"].append(["zzq", "qzz"])
        path.write_text(json.dumps(data))
    r = export(model, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "tokenizer", "cannot load")


@pytest.mark.parametrize("key, value", [("hidden_size", 128), ("num_hidden_layers", 4), ("num_hidden_layers", 2)])
def test_config_disagrees_with_weights(tiny_dir, tmp_path, key, value):
    """A config edited after the weights were saved: transformers would re-initialise or drop the
    mismatched tensors at random, so this must be refused, not exported."""
    model = copy_model(tiny_dir, tmp_path / "tiny")
    edit_json(model / "config.json", **{key: value})
    r = export(model, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "config", "mismatch", "match", "shape")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights(tiny_dir, tmp_path, bad):
    from safetensors.torch import load_file, save_file

    model = copy_model(tiny_dir, tmp_path / "tiny")
    weights = load_file(model / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = bad
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    r = export(model, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "NaN or Inf")


@pytest.mark.parametrize("override, expected", [
    ({"llama.block_count": 4}, "4 layers"),
    ({"llama.block_count": 2}, "2 layers"),
    ({"llama.embedding_length": 128}, "embedding_length 128"),
    ({"llama.attention.head_count": 8}, "8 Q heads"),
    ({"llama.attention.head_count_kv": 1}, "1 K heads"),
])
def test_gguf_metadata_disagrees_with_tensors(tiny_gguf, tmp_path, override, expected):
    assert read_gguf(rewrite_gguf(tiny_gguf, tmp_path / "copy.gguf")).block_count == 3  # the copy itself is fine
    bad = rewrite_gguf(tiny_gguf, tmp_path / "bad.gguf", **override)
    assert_edgeprune_error(read_gguf, bad, expected=expected)


@pytest.mark.parametrize("rename, expected", [
    ({"blk.1.ffn_up.weight": "blk.1.ffn_uq.weight"}, "'blk.1.ffn_uq.weight' that a llama model does not have"),
    ({"blk.2.attn_v.weight": None}, "lacks the tensor 'blk.2.attn_v.weight'"),
])
def test_gguf_with_a_misnamed_or_missing_tensor(tiny_gguf, tmp_path, rename, expected):
    """transformers' GGUF loader fills a weight it cannot find with random values, without an error."""
    bad = rewrite_gguf(tiny_gguf, tmp_path / "bad.gguf", rename=rename)
    assert_edgeprune_error(read_gguf, bad, expected=expected)


def test_gguf_metadata_disagrees_with_tensors_cli(tiny_gguf, tmp_path):
    bad = rewrite_gguf(tiny_gguf, tmp_path / "bad.gguf", **{"llama.block_count": 5})
    r = export(bad, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "says 5 layers")


def test_unknown_architecture_gguf(tiny_gguf, tmp_path):
    gemma = rewrite_gguf(tiny_gguf, tmp_path / "gemma.gguf", arch="gemma")
    assert read_gguf(gemma).architecture == "gemma"  # a well-formed file, of a family edgeprune does not read
    r = export(gemma, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "is a 'gemma' GGUF: edgeprune reads llama, qwen2, qwen3, gemma3 GGUFs")


@pytest.mark.parametrize("key, value, expected", [
    ("memory_mib", "-4096", "above zero"),
    ("max_ttft_s", "-1.0", "above zero"),
    ("memory_mib", '"3 GB"', "without quotes or units"),
    ("context_length", '"8k"', "whole number"),
])
def test_bad_profile_values(tmp_path, key, value, expected):
    from edgeprune.device.profiles import load_profile

    path = tmp_path / "bad.toml"
    path.write_text(profile_text(**{key: value}))
    message = assert_edgeprune_error(load_profile, path, expected=expected)
    assert key in message and str(path) in message


def test_bad_profile_through_cli(tiny_dir, tmp_path):
    path = tmp_path / "units.toml"
    path.write_text(profile_text(memory_mib='"3 GB"'))
    r = export(tiny_dir, tmp_path / "out", profile=str(path))
    assert_clean_failure(r, tmp_path / "out", "memory_mib")


def test_calibration_text_shorter_than_one_sequence(tiny_dir, tmp_path):
    """The check must come before anything is written: a reference GGUF left behind is an output too."""
    calib = tmp_path / "calib.txt"
    calib.write_text("def main():\n    return 42\n")
    r = export(tiny_dir, tmp_path / "out", "--calib", str(calib), "--quant", "Q4_0")
    assert_clean_failure(r, tmp_path / "out", "calibration text has")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 64 KiB file system: writes past it fail with ENOSPC, as on a full disk."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_too_little_disk_is_refused_before_work(tiny_dir, small_tmpfs):
    out = small_tmpfs / "out"
    r = export(tiny_dir, out, "--quant", "Q4_0")
    message = assert_clean_failure(r, out, "not enough disk")
    assert "0.1 MiB free" in message, message  # the 64 KiB file system, in units a user can compare
    assert "loading" not in r.stderr  # refused before the model is read


def test_disk_full_during_write(tiny_dir, small_tmpfs):
    """The converter meets ENOSPC part-way through the tensors: a clear error and no partial file."""
    from converters import ConversionInput, write_gguf
    from edgeprune.build.loading import load_model

    loaded = load_model(tiny_dir)
    message = assert_edgeprune_error(write_gguf, ConversionInput(loaded.model, loaded.vocab, "tiny", 256),
                                     small_tmpfs / "tiny.gguf", expected="disk full")
    assert str(small_tmpfs) in message or "tiny.gguf" in message, message
    assert list(small_tmpfs.iterdir()) == []


def test_file_size_limit_during_write(tiny_dir, tmp_path):
    """RLIMIT_FSIZE (ulimit -f) makes writes past 64 KiB fail with EFBIG, as on a file system with a size cap."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    r = export(tiny_dir, tmp_path / "out", "--quant", "Q4_0", preexec_fn=limit)
    assert_clean_failure(r, tmp_path / "out", "file too large", "disk full")


def test_short_write_names_its_cause(tmp_path):
    """numpy reports a short write without errno; atomic_output must still name the cause."""
    from edgeprune.core.atomic import atomic_output

    code = textwrap.dedent("""
        import resource, sys, numpy as np
        from edgeprune.core.atomic import atomic_output
        from edgeprune.core.errors import EdgepruneError
        resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000))
        try:
            with atomic_output(sys.argv[1]) as tmp:
                np.zeros(5000, dtype=np.float32).tofile(tmp)
        except EdgepruneError as exc:
            print(exc)
    """)
    target = tmp_path / "big.bin"
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "file too large" in r.stdout, r.stdout
    assert list(tmp_path.iterdir()) == []
    with atomic_output(tmp_path / "ok.txt") as tmp:  # and a write that fits still lands
        tmp.write_text("fine")
    assert (tmp_path / "ok.txt").read_text() == "fine"


# --- 2. interruptions

@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """Bigger than the tiny model (3M parameters), so that its writes and quantization take long enough
    for a signal to land while a partial file exists."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch

    d = tmp_path_factory.mktemp("small") / "small"
    d.mkdir()
    build_bpe_tokenizer(d)
    vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(vocab) + 3, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(d, safe_serialization=True)
    return d


def interrupt_when(args: list[str], out: Path, marker: str, signum: int, timeout: float = 600):
    """Start an export, wait (polling every millisecond) for a partial file whose name contains `marker`,
    send `signum`, and return the exit status and stderr (kept in a file, so a full pipe cannot stall it)."""
    log = out.with_name(f"{out.name}-{signum}.log")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgeprune.cli", "export", *args, "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                names = os.listdir(out) if out.is_dir() else []
                if any(marker in n and ".partial-" in n for n in names):
                    proc.send_signal(signum)
                    break
                time.sleep(0.001)
            else:
                proc.kill()
                proc.wait()
                pytest.fail(f"no partial file with {marker!r} appeared: {log.read_text()[-2000:]}")
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, log.read_text()


def test_signal_swallowed_by_a_native_callback_still_stops_the_commit(tmp_path):
    """ctypes prints and drops an exception raised inside a callback from C, as llama.cpp's log callback
    is during quantization; the recorded signal must still stop atomic_output from renaming."""
    code = textwrap.dedent("""
        import ctypes, os, signal, sys
        from edgeprune.core.atomic import atomic_output, install_signal_handlers
        install_signal_handlers()
        compare_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        def compare(a, b):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, inside the callback
            return 0
        values = (ctypes.c_int * 4)(4, 3, 2, 1)
        try:
            with atomic_output(sys.argv[1]) as tmp:
                tmp.write_text("complete, but the user asked to stop")
                ctypes.CDLL(None).qsort(values, 4, 4, compare_type(compare))
            print("committed")
        except KeyboardInterrupt as exc:
            print("interrupted", type(exc).__name__)
    """)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.gguf")], capture_output=True, text=True,
                       timeout=120)
    assert "Exception ignored" in r.stderr  # the callback really swallowed it
    assert r.stdout.split() == ["interrupted", "Terminated"], r.stdout + r.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def assert_nothing_partial(out: Path) -> None:
    """No partial or hidden temporary file, and every GGUF under a final name is complete."""
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert hidden == [], hidden
    for path in out.glob("*.gguf"):
        read_gguf(path)


def test_interrupts_leave_nothing_partial_and_rerun_completes(small_model, tmp_path):
    profile = tmp_path / "laptop-512.toml"  # a short context keeps the re-run's validation quick
    profile.write_text(profile_text(context_length="512"))
    out = tmp_path / "out"
    args = [str(small_model), "--profile", str(profile), "--quant", "Q4_0", "--eval-chunks", "1", "--eval-fixed", "--eval-ctx", "128"]
    final = out / "small-Q4_0.gguf"

    # SIGINT (Ctrl-C) while the reference GGUF is being converted.
    code, err = interrupt_when(args, out, "reference-F16.gguf", signal.SIGINT)
    assert code == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err, err[-3000:]
    assert_nothing_partial(out)
    assert not final.exists()

    # SIGTERM while llama.cpp quantizes: its log callback must not swallow the signal.
    code, err = interrupt_when(args, out, final.name, signal.SIGTERM)
    assert code == 130, err[-3000:]
    assert_nothing_partial(out)
    assert not final.exists()  # the quantizer's ~0.3 s window is far wider than the 1 ms polling

    # A plain re-run finishes the job and passes (speed is judged on the laptop's prediction), with a complete GGUF.
    r = run_cli("export", *args, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["validation"]["passed"] is True
    assert_nothing_partial(out)
    assert read_gguf(final).block_count == 4
    assert (out / "report.json").is_file()


# --- 3. untrusted files

def test_remote_code_is_never_run(tiny_dir, tiny_gguf, tmp_path):
    """auto_map points transformers at Python files next to the model; they must never be imported."""
    from transformers import LlamaForCausalLM

    from edgeprune.build.loading import load_model

    model = copy_model(tiny_dir, tmp_path / "custom")
    marker = tmp_path / "remote-code-ran"
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (model / f"{module}.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).write_text({module!r})\n"
            "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
            "class EvilConfig(LlamaConfig): pass\n"
            "class EvilForCausalLM(LlamaForCausalLM): pass\n"
            "class EvilTokenizer(PreTrainedTokenizerFast): pass\n"
        )
    edit_json(model / "config.json", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                               "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    edit_json(model / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
    shutil.copy(tiny_gguf, model / "model.gguf")  # a GGUF input reads its directory's tokenizer files too
    for path in (model, model / "model.gguf"):
        try:
            loaded = load_model(path)
        except EdgepruneError:
            pass  # refusing is fine
        else:
            assert type(loaded.model) is LlamaForCausalLM
        assert not marker.exists(), f"custom code from {marker.read_text()}.py ran while loading {path}"


def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


HUGE_HEADERS = {
    "tensor count": _header(1 << 60, 0),
    "metadata count": _header(0, 1 << 60),
    "array length": _header(0, 1) + _key("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 0, 1 << 40),
    "string array length": _header(0, 1) + _key("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 40),
    "string length": _header(0, 1) + _key("general.name") + struct.pack("<IQ", 8, 1 << 62),
    "tensor dims": (_header(1, 0) + _key("token_embd.weight")
                    + struct.pack("<I4QIQ", 4, 1 << 40, 1 << 40, 1 << 40, 1 << 40, 0, 0)),
}


@pytest.mark.parametrize("claim", list(HUGE_HEADERS))
def test_enormous_header_claims_fail_fast_without_allocating(tmp_path, claim):
    """A header claiming 2^60 entries, followed by 64 MiB of zeros (sparse): gguf-py alone would walk the
    zeros for minutes building millions of objects. The check must refuse it at once, in little memory."""
    path = tmp_path / "huge.gguf"
    with open(path, "wb") as f:
        f.write(HUGE_HEADERS[claim])
        f.truncate(64 << 20)
    code = textwrap.dedent("""
        import sys, time
        start = time.perf_counter()
        from edgeprune.device.gguf_check import read_gguf
        from edgeprune.core.errors import EdgepruneError
        try:
            read_gguf(sys.argv[1])
            print("accepted")
        except EdgepruneError as exc:
            print("error:", exc)
        # VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the forking parent's (pytest's) peak across exec
        peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        print(time.perf_counter() - start, peak)
    """)
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    assert r.returncode == 0, r.stderr[-2000:]
    verdict, numbers = r.stdout.strip().splitlines()
    seconds, max_rss_kib = numbers.split()
    assert verdict.startswith("error:") and "corrupt" in verdict, verdict
    assert float(seconds) < 10 and wall < 30, (seconds, wall)
    assert int(max_rss_kib) < 400 * 1024, f"peak RSS {int(max_rss_kib) // 1024} MiB"


# --- 4. fuzzing

FUZZ_CASES = 300
FUZZ_SEED = 20261128
LLAMA_WORKER = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort here must not leave core files behind
    from llama_cpp import Llama
    for line in sys.stdin:
        path = line.strip()
        print("START", path, flush=True)
        try:
            llm = Llama(path, n_ctx=64, n_threads=1, verbose=False)
            llm.eval(llm.tokenize(b"def main():\\n    return 42")[:8])
            llm.close()
            print("LOADED", path, flush=True)
        except Exception as exc:
            print("REFUSED", path, type(exc).__name__, flush=True)
""")


def fuzz_cases(base: bytes, header_end: int, directory: Path) -> list[tuple[str, Path]]:
    """Seeded damage: a third truncations, a third bit flips anywhere, a third flips in the header/metadata."""
    rng = random.Random(FUZZ_SEED)
    cases = []
    for i in range(FUZZ_CASES):
        data = bytearray(base)
        kind = ("truncate", "flip", "flip-header")[i % 3]
        if kind == "truncate":
            data = data[: rng.randrange(len(data))]
        else:
            limit = header_end if kind == "flip-header" else len(data)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(limit)] ^= 1 << rng.randrange(8)
        path = directory / f"case{i:03d}.gguf"
        path.write_bytes(bytes(data))
        cases.append((kind, path))
    return cases


def run_in_llama_cpp(paths: list[Path]) -> tuple[dict[str, str], list[str]]:
    """Load each file in llama.cpp in a worker process; a native crash kills only the worker, which is
    restarted after the file that killed it. Returns each file's outcome and the crashes."""
    outcome: dict[str, str] = {}
    crashes: list[str] = []
    todo = [str(p) for p in paths]
    while todo:
        r = subprocess.run([sys.executable, "-c", LLAMA_WORKER], input="\n".join(todo) + "\n", capture_output=True,
                           text=True, timeout=600, env=ENV)
        lines = [line.split() for line in r.stdout.splitlines() if line.startswith(("START", "LOADED", "REFUSED"))]
        for word, path, *_ in lines:
            outcome[path] = word
        started = [path for word, path, *_ in lines if word == "START"]
        if r.returncode == 0 and all(outcome.get(p) in ("LOADED", "REFUSED") for p in todo):
            break
        dead = started[-1] if started else todo[0]
        crashes.append(f"{Path(dead).name}: exit {r.returncode} {r.stderr.strip()[-300:]}")
        todo = todo[todo.index(dead) + 1:]
    return outcome, crashes


def test_fuzzed_gguf_never_crashes(tiny_gguf, tmp_path):
    """300 damaged copies of a small GGUF: read_gguf either accepts or raises EdgepruneError, nothing else,
    and every file it accepts loads in llama.cpp (or is refused there) without crashing the process."""
    from edgeprune.build.loading import load_model

    start = time.perf_counter()
    base = tiny_gguf.read_bytes()
    header_end = gguf.GGUFReader(tiny_gguf).data_offset
    cases = fuzz_cases(base, header_end, tmp_path)
    accepted, counts, unexpected = [], {}, []
    for kind, path in cases:
        try:
            read_gguf(path)
            result = "accepted"
            accepted.append(path)
        except EdgepruneError as exc:
            result = "error"
            if "\n" in str(exc):
                unexpected.append(f"{path.name}: multi-line error {str(exc)[:200]!r}")
        except Exception as exc:  # noqa: BLE001 - exactly what must never happen
            result = "other"
            unexpected.append(f"{path.name} ({kind}): {type(exc).__name__}: {str(exc)[:200]}")
        counts[(kind, result)] = counts.get((kind, result), 0) + 1
    checked_at = time.perf_counter()
    assert not unexpected, unexpected
    assert counts.get(("truncate", "error"), 0) >= FUZZ_CASES // 3 - 2  # nearly every cut is caught
    assert 10 <= len(accepted) < FUZZ_CASES

    outcome, crashes = run_in_llama_cpp(accepted)
    assert not crashes, crashes
    loaded_at = time.perf_counter()

    sample = accepted[:: max(1, len(accepted) // 8)][:8]  # transformers' GGUF loader on a sample
    for path in sample:
        try:
            load_model(path)
        except EdgepruneError:
            pass
    done = time.perf_counter()
    print(f"\nfuzz: {FUZZ_CASES} cases {counts}; llama.cpp on {len(accepted)} accepted: "
          f"{sum(v == 'LOADED' for v in outcome.values())} loaded; "
          f"read_gguf {checked_at - start:.1f}s, llama.cpp {loaded_at - checked_at:.1f}s, "
          f"load_model x{len(sample)} {done - loaded_at:.1f}s, total {done - start:.1f}s")


def test_duplicate_token_is_refused_before_llama_cpp_aborts(tiny_gguf, tmp_path):
    """Two equal tokens trip a GGML_ASSERT in llama.cpp's vocab loader, which aborts the whole process."""
    reader = gguf.GGUFReader(tiny_gguf)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    tokens[100] = tokens[101]
    bad = rewrite_gguf(tiny_gguf, tmp_path / "dup.gguf", **{"tokenizer.ggml.tokens": tokens})
    assert_edgeprune_error(read_gguf, bad, expected="appears twice")
    _, crashes = run_in_llama_cpp([bad])
    assert crashes, "llama.cpp no longer aborts on duplicate tokens: this check may be relaxed"


# --- 5. determinism

def test_conversion_and_quantization_are_deterministic(tiny_dir, tmp_path):
    from converters import ConversionInput, write_gguf
    from edgeprune.build.calibration import collect_calibration
    from edgeprune.build.loading import load_model
    from edgeprune.build.quantize import quantize_gguf
    from edgeprune.core.texts import default_calibration_text

    paths = []
    for i in range(2):  # two independent loads and conversions
        loaded = load_model(tiny_dir)
        source = ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length)
        paths.append(write_gguf(source, tmp_path / f"f16-{i}.gguf", "F16"))
    assert paths[0].read_bytes() == paths[1].read_bytes()

    tokens = loaded.tokenizer(default_calibration_text().content[:20000], add_special_tokens=False)["input_ids"]
    stats = collect_calibration(loaded.model, tokens, n_seq=4, seq_len=128)
    from converters import gguf_tensor_name

    imatrix = {gguf_tensor_name(k): v for k, v in stats.imatrix().items() if gguf_tensor_name(k)}
    quantized = [quantize_gguf(paths[0], tmp_path / f"q4-{threads}.gguf", "Q4_0", imatrix=imatrix,
                               imatrix_text="calib", threads=threads).path for threads in (1, 2)]
    assert quantized[0].read_bytes() == quantized[1].read_bytes()
    assert read_gguf(quantized[0]).value("quantize.imatrix.entries_count") == len(imatrix)
    plain = quantize_gguf(paths[0], tmp_path / "q4-plain.gguf", "Q4_0", threads=2).path
    assert plain.read_bytes() != quantized[0].read_bytes()  # the imatrix really took part
