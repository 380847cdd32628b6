"""Nothing stale: a build target's key covers the planner's tables and edgeprune's own code and says which input
changed; the score cache keys on the metadata llama.cpp reads as well as the tensors; a zero context is refused."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf

from edgeprune.device.gguf_copy import copy_gguf

from conftest import CLI_ENV, assert_clean_failure, build_toml, llama_cpp_logits, run_cli

ROOT = Path(__file__).resolve().parents[1]


def one_target(model: Path, context_length: int) -> str:
    return build_toml(model, {"name": "laptop", "profile": "x86-laptop-16gb", "quants": ["Q8_0"],
                              "context_length": context_length})


def _copy_of_edgeprune(tmp_path: Path) -> Path:
    """edgeprune's three packages copied, so a test can edit their files without touching the checkout's."""
    copy = tmp_path / "edgeprune-copy"
    for package in ("edgeprune", "converters", "profiles"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _cli_of(copy: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(CLI_ENV, PYTHONPATH=str(copy))
    return subprocess.run([sys.executable, "-m", "edgeprune.cli", *args], capture_output=True, text=True,
                          timeout=900, env=env, cwd=copy)


def test_an_edited_quality_table_rebuilds_and_says_why(tiny_bpe_llama, tmp_path):
    copy = _copy_of_edgeprune(tmp_path)
    where = subprocess.run([sys.executable, "-c", "import edgeprune; print(edgeprune.__file__)"], text=True,
                           capture_output=True, env=dict(CLI_ENV, PYTHONPATH=str(copy)), cwd=copy)
    assert Path(where.stdout.strip()).parent == copy / "edgeprune"  # the copy runs, not the checkout
    path = tmp_path / "edgeprune.toml"
    path.write_text(one_target(tiny_bpe_llama, 1024))
    first = _cli_of(copy, "build", str(path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "laptop: building (no earlier build here)" in first.stderr
    record = json.loads((tmp_path / "out" / "laptop" / "build.json").read_text())
    table = copy / "edgeprune" / "build" / "quality_table.toml"
    assert record["inputs"]["tables"]["quality_table.toml"] == hashlib.sha256(table.read_bytes()).hexdigest()
    gguf_file = tmp_path / "out" / "laptop" / record["entry"]["gguf"]
    built = hashlib.sha256(gguf_file.read_bytes()).hexdigest()

    again = _cli_of(copy, "build", str(path))
    assert again.returncode == 0 and "nothing to rebuild" in again.stdout, again.stderr[-3000:]
    assert "laptop: up to date" in again.stderr

    table.write_text(table.read_text() + "\n# edited, as `make bench` rewrites it\n")
    edited = _cli_of(copy, "build", str(path))
    assert edited.returncode == 0, edited.stderr[-3000:]
    assert "1 built" in edited.stdout
    assert "laptop: rebuilding: quality_table.toml changed" in edited.stderr
    assert "reference: up to date" not in edited.stderr  # the code digest keys the shared reference too
    # the key is not in the file: the same plan writes the same bytes
    assert hashlib.sha256(gguf_file.read_bytes()).hexdigest() == built

    planner = copy / "edgeprune" / "build" / "planner.py"
    planner.write_text(planner.read_text() + "\n# edited\n")
    code = _cli_of(copy, "build", str(path))
    assert code.returncode == 0 and "1 built" in code.stdout, code.stderr[-3000:]
    assert "laptop: rebuilding: edgeprune/build/planner.py changed" in code.stderr


def _copy_gguf(source: Path, destination: Path, **changes) -> Path:
    """A copy of `source` with the metadata values in `changes` (key: value) replaced."""
    return copy_gguf(gguf.GGUFReader(source), destination, changes=changes)


def test_a_changed_rope_freq_base_alone_misses_the_score_cache(tiny_bpe_llama, tmp_path):
    from converters import ConversionInput, write_gguf
    from edgeprune.device.gguf_check import read_gguf
    from edgeprune.build.loading import load_model
    from edgeprune.build.scorecache import ScoreCache
    from edgeprune.device.llamacpp.runtime import Runtime
    from edgeprune.device.validation.results import DivergenceResult, PerplexityResult

    loaded = load_model(tiny_bpe_llama)
    original = write_gguf(ConversionInput(loaded.model, loaded.vocab, "tiny", 256), tmp_path / "a.gguf")
    rope = _copy_gguf(original, tmp_path / "rope.gguf", **{"llama.rope.freq_base": 500000.0})
    renamed = _copy_gguf(original, tmp_path / "renamed.gguf", **{"general.name": "another name"})
    assert gguf.GGUFReader(rope).fields["llama.rope.freq_base"].contents() == 500000.0
    # llama.cpp computes other logits from the same tensors with another rope base: scores cannot be shared
    tokens = list(range(3, 40))
    assert abs(llama_cpp_logits(original, tokens, 64) - llama_cpp_logits(rope, tokens, 64)).max() > 1e-2

    cache, runtime = ScoreCache(tmp_path / "scores", "basis"), Runtime(128)
    scored = (PerplexityResult(9.0, 2.2, 2, 128, 254), DivergenceResult(0.1, 0.1, 0.2, 0.3, 0.4, 0.9, 0.0, 0.01,
                                                                         254, "ref.gguf", 8.0))
    cache.put(read_gguf(original), runtime, *scored)
    measured = []

    def measure():
        measured.append(True)
        return scored

    assert cache.scores(read_gguf(renamed), runtime, measure)[2] is True and not measured  # general.* only
    assert cache.scores(read_gguf(rope), runtime, measure)[2] is False and measured == [True]


def test_a_zero_context_length_is_refused_in_one_line(tmp_path):
    path = tmp_path / "edgeprune.toml"
    path.write_text(one_target(tmp_path / "model", 0))
    result = run_cli("build", str(path))
    line = assert_clean_failure(result, tmp_path / "out", "context_length")
    assert "'laptop'" in line and "got 0" in line and "at least 64" in line
