"""llama.cpp's own converter and its tokenizer test vocabularies, from the llama-cpp-python sdist on PyPI (the
wheel lacks them): the yardstick that our conversions are compared with, in the benchmarks and the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

import gguf

from edgeprune.core.errors import EdgepruneError
from edgeprune.core.fetch import DEFAULT_CACHE


def llama_cpp_version() -> str:
    """The converter must come from the llama.cpp we run, so take the installed llama-cpp-python's version."""
    return metadata.version("llama-cpp-python")


def converter_script(progress, cache: Path = DEFAULT_CACHE) -> Path:
    """convert_hf_to_gguf.py with its conversion/ and gguf-py/ packages, from the sdist on PyPI (the wheel lacks it)."""
    version = llama_cpp_version()
    target = cache / f"llama.cpp-converter-{version}"
    if not (target / "convert_hf_to_gguf.py").is_file() or not (target / "models").is_dir():
        sdist = cache / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.is_file():
            progress(f"downloading the llama-cpp-python {version} sdist from PyPI (once) for its converter")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                   str(cache), f"llama-cpp-python=={version}"]
            if subprocess.run(cmd).returncode != 0 or not sdist.is_file():
                raise EdgepruneError(f"could not download the llama-cpp-python {version} sdist: check pip's network")
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        wanted = (prefix + "convert_hf_to_gguf.py", prefix + "conversion/", prefix + "gguf-py/",
                  prefix + "models/ggml-vocab-")
        with tarfile.open(sdist) as tar, tempfile.TemporaryDirectory(dir=cache) as staging:
            tar.extractall(staging, members=[m for m in tar.getmembers() if m.name.startswith(wanted)],
                           filter="data")
            shutil.rmtree(target, ignore_errors=True)  # an older extraction without the test vocabularies
            os.replace(Path(staging) / prefix, target)
    return target / "convert_hf_to_gguf.py"


def llama_cpp_convert(hf_dir: Path, out: Path, progress) -> tuple[Path, float]:
    """Run llama.cpp's converter (it puts its own gguf-py first on sys.path) and time it."""
    script = converter_script(progress)
    progress(f"running llama.cpp's {script.name} on {hf_dir}")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", "f16"],
                          capture_output=True, text=True, errors="replace")
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise EdgepruneError(f"llama.cpp's converter failed on {hf_dir}: {last}")
    return out, seconds


def vocab_test_files(name: str, progress=lambda _msg: None) -> tuple[Path, list[str], list[list[int]]]:
    """llama.cpp's tokenizer test for one vocabulary (tests/test-tokenizer-0): the vocab-only GGUF, its inputs,
    and the ids llama.cpp must produce for each (no BOS, special tokens not parsed)."""
    models = converter_script(progress).parent / "models"
    path = models / f"ggml-vocab-{name}.gguf"
    expected = [[int(t) for t in line.split()]
                for line in (models / f"{path.name}.out").read_text(encoding="utf-8").splitlines()]
    inputs = (models / f"{path.name}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    return path, inputs[:len(expected)], expected  # every input ends with the separator


def _describe(ours, theirs) -> dict:
    """A readable account of two differing metadata values; long lists by their first difference."""
    if isinstance(ours, list) and isinstance(theirs, list):
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        return {"lengths": [len(ours), len(theirs)], "first_difference": first,
                "at_first_difference": [repr(ours[first:first + 1])[:120], repr(theirs[first:first + 1])[:120]]}
    return {"values": [repr(ours)[:200], repr(theirs)[:200]]}


def compare_ggufs(ours_path: Path, theirs_path: Path) -> dict:
    ours, theirs = gguf.GGUFReader(ours_path), gguf.GGUFReader(theirs_path)
    ours_t, theirs_t = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    common = sorted(ours_t.keys() & theirs_t.keys())
    shapes = [n for n in common if list(ours_t[n].shape) != list(theirs_t[n].shape)]
    types = [n for n in common if ours_t[n].tensor_type != theirs_t[n].tensor_type]
    data = [n for n in common if n not in shapes and n not in types
            and ours_t[n].data.tobytes() != theirs_t[n].data.tobytes()]
    ours_kv = {k: f.contents() for k, f in ours.fields.items() if not k.startswith("GGUF.")}
    theirs_kv = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    return {
        "tensors": [len(ours_t), len(theirs_t)],
        "tensors_only_ours": sorted(ours_t.keys() - theirs_t.keys()),
        "tensors_only_theirs": sorted(theirs_t.keys() - ours_t.keys()),
        "shape_differences": shapes,
        "type_differences": {n: [ours_t[n].tensor_type.name, theirs_t[n].tensor_type.name] for n in types},
        "data_differences": data,
        "byte_identical_tensors": len(common) - len(shapes) - len(types) - len(data),
        "keys_only_ours": {k: repr(ours_kv[k])[:200] for k in sorted(ours_kv.keys() - theirs_kv.keys())},
        "keys_only_theirs": {k: repr(theirs_kv[k])[:200] for k in sorted(theirs_kv.keys() - ours_kv.keys())},
        "keys_differing": {k: _describe(ours_kv[k], theirs_kv[k]) for k in sorted(ours_kv.keys() & theirs_kv.keys())
                           if ours_kv[k] != theirs_kv[k]},
        "file_bytes": [ours_path.stat().st_size, theirs_path.stat().st_size],
    }
