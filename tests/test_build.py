"""`edgeprune init` and `edgeprune build`: one build file, several targets, shared work, a cache keyed by
content, reproducible files and runtime hand-off that works."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edgeprune.build.builds.buildfile import EXAMPLE, init_build_file, load_build_file
from edgeprune.core.errors import EdgepruneError
from edgeprune.build.handoff import chat_family

from conftest import build_toml, run_cli

TINY_BUILD = """
[model]
path = "{model}"
[evaluation]
context = 128
chunks = 2
fixed = true
[output]
dir = "{out}"
[[targets]]
name = "pi5"
profile = "raspberry-pi-5-8gb"
[[targets]]
name = "laptop"
profile = "x86-laptop-16gb"
quants = ["{laptop_quant}"]
context_length = 1024
"""


def _build_file(tmp_path: Path, model: Path, out: str = "out", laptop_quant: str = "Q8_0",
                name: str = "edgeprune.toml") -> Path:
    path = tmp_path / name
    path.write_text(TINY_BUILD.format(model=model, out=out, laptop_quant=laptop_quant))
    return path


def _ggufs(out: Path) -> dict[str, tuple[str, float]]:
    """sha256 and mtime of every target's GGUF, from the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    found = {}
    for name, entry in manifest["targets"].items():
        artifact = next(a for a in entry["artifacts"] if a["path"] == entry["gguf"])
        found[name] = (artifact["sha256"], (out / name / entry["gguf"]).stat().st_mtime_ns)
    return found


def test_init_writes_an_example_that_loads_and_never_overwrites(tmp_path):
    path = tmp_path / "edgeprune.toml"
    result = run_cli("init", str(path))
    assert result.returncode == 0 and path.read_text() == EXAMPLE
    build = load_build_file(path)
    assert [t.name for t in build.targets] == ["pi5", "laptop"] and build.model == "smollm2"
    again = run_cli("init", str(path))
    assert again.returncode == 2 and "already exists" in again.stderr
    with pytest.raises(EdgepruneError):
        init_build_file(path)


@pytest.mark.parametrize("text, message", [
    ("[model]\npath = 'm'\n", "no \\[\\[targets\\]\\]"),
    ("[[targets]]\nname = 'a'\nprofile = 'x'\nquant = ['Q8_0']\n", "unknown key 'quant' in \\[targets\\]"),
    ("[modle]\n", "unknown section \\[modle\\]"),
    ("[[targets]]\nname = 'a'\nprofile = 'p'\n[[targets]]\nname = 'a'\nprofile = 'q'\n", "target names repeat \\(a\\)"),
    ("[[targets]]\nname = 'a'\nprofile = 'p'\nallocation = 'wide'\n", "allocation must be"),
    ("[[targets]]\nname = 'a'\nprofile = 'p'\nmix = 'yes'\n", "mix must be true or false"),
    ("[[targets]]\nname = 'a'\nprofile = 'p'\nrecovery_minutes = -1\n", "recovery_minutes must be a number of minutes"),
    ("[[targets]]\nname = '../a'\nprofile = 'p'\n", "needs a name of letters"),
    ("[evaluation]\nchunks = 0\n[[targets]]\nname = 'a'\nprofile = 'p'\n", "chunks must be a whole number"),
    ("[evaluation]\nprecision = 1.5\n[[targets]]\nname = 'a'\nprofile = 'p'\n", "precision must be a number between"),
    ("[evaluation]\nfixed = 'yes'\n[[targets]]\nname = 'a'\nprofile = 'p'\n", "fixed must be true or false"),
    ("[evaluation]\nfixed = true\nprecision = 0.1\n[[targets]]\nname = 'a'\nprofile = 'p'\n", "drop precision"),
    ("[evaluation]\nchunks = 2\n[[targets]]\nname = 'a'\nprofile = 'p'\n", "chunks = 2 is below the 4 chunks"),
])
def test_bad_build_files_fail_in_one_line(tmp_path, text, message):
    path = tmp_path / "b.toml"
    path.write_text(text)
    with pytest.raises(EdgepruneError, match=message) as err:
        load_build_file(path)
    assert "\n" not in str(err.value)


def test_a_target_can_ask_for_mixed_precision_and_recovery(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text("[[targets]]\nname = 'a'\nprofile = 'p'\nmix = true\nrecovery_minutes = 15\n"
                    "[[targets]]\nname = 'b'\nprofile = 'p'\n")
    targets = load_build_file(path).targets
    assert [t.mix for t in targets] == [True, False] and [t.recovery_minutes for t in targets] == [15.0, None]


def test_chat_families_are_recognised():
    assert chat_family("{% for m in messages %}<|im_start|>{{ m.role }}").name == "chatml"
    assert chat_family("<|start_header_id|>{{ role }}<|end_header_id|>").name == "llama3"
    assert chat_family("{{ bos_token }}[INST] {{ content }} [/INST]").name == "llama2"
    assert chat_family("{{ messages }}") is None and chat_family(None) is None


def test_build_caches_rebuilds_one_target_and_is_reproducible(tiny_bpe_llama, tmp_path):
    path = _build_file(tmp_path, tiny_bpe_llama)
    first = run_cli("build", str(path), timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    built = _ggufs(out)
    assert set(built) == {"pi5", "laptop"} and (out / "index.html").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["edgeprune"] and manifest["versions"]["llama-cpp-python"]
    laptop = manifest["targets"]["laptop"]
    assert laptop["quant"] == "Q8_0" and laptop["overrides"] == {"context_length": 1024, "quants": ["Q8_0"]}
    assert "PARAMETER num_ctx 1024" in (out / "laptop" / "Modelfile").read_text()
    assert "--n_ctx 1024" in (out / "laptop" / "README.md").read_text()
    for entry in manifest["targets"].values():  # every artifact as listed
        for artifact in entry["artifacts"]:
            assert (out / entry["target"] / artifact["path"]).stat().st_size == artifact["bytes"]
    # nothing changed: nothing rebuilt, and it says so
    start = time.perf_counter()
    second = run_cli("build", str(path), timeout=300)
    assert second.returncode == 0 and "nothing to rebuild" in second.stdout
    assert time.perf_counter() - start < 30
    assert _ggufs(out) == built
    # one target changed: only that one is rebuilt
    _build_file(tmp_path, tiny_bpe_llama, laptop_quant="Q6_K")
    third = run_cli("build", str(path), timeout=900)
    assert third.returncode == 0 and "1 built" in third.stdout
    now = _ggufs(out)
    assert now["pi5"] == built["pi5"] and now["laptop"] != built["laptop"]
    # the same inputs into another empty directory: the same bytes
    _build_file(tmp_path, tiny_bpe_llama, out="again", laptop_quant="Q6_K", name="again.toml")
    assert run_cli("build", str(tmp_path / "again.toml"), timeout=900).returncode == 0
    assert {k: v[0] for k, v in _ggufs(tmp_path / "again").items()} == {k: v[0] for k, v in now.items()}


def test_a_killed_build_is_repaired(tiny_bpe_llama, tmp_path):
    """A target directory without its build.json (killed mid-build) and a stale previous output are rebuilt and
    removed; --only builds the one target named."""
    path = _build_file(tmp_path, tiny_bpe_llama)
    out = tmp_path / "out"
    (out / "pi5").mkdir(parents=True)
    (out / "pi5" / "tiny-bpe-Q5_K_M.gguf").write_bytes(b"GGUF half written")
    (out / ".partial-old-pi5-123").mkdir()
    result = run_cli("build", str(path), "--only", "pi5", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interrupted build" in result.stderr
    assert not list(out.glob(".partial-*")) and not (out / "laptop").exists()
    assert (out / "pi5" / "build.json").is_file()
    unknown = run_cli("build", str(path), "--only", "phone")
    assert unknown.returncode == 2 and "no target 'phone'" in unknown.stderr


def test_a_target_with_the_references_tensors_reuses_its_scores(tiny_bpe_llama, tmp_path):
    """An unpruned F16 target is not scored again: the reference's own scores against its top-k file are the
    target's, the same numbers measuring the target gives, on one thread as on the build's."""
    from edgeprune.device.llamacpp.runtime import Runtime
    from edgeprune.device.validation.quality import measure_perplexity

    path = _build_file(tmp_path, tiny_bpe_llama, laptop_quant="F16")
    result = run_cli("build", str(path), "--only", "laptop", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity and divergence are reused" in result.stderr
    shared, target = tmp_path / "out" / ".shared", tmp_path / "out" / "laptop"
    validation = json.loads((target / "report.json").read_text())["validation"]
    gguf = target / json.loads((target / "build.json").read_text())["entry"]["gguf"]
    measured = measure_perplexity(gguf, None, reference_topk=shared / "reference-topk.npz",
                                  runtime=Runtime(128, threads=1), progress=lambda _line: None)
    assert [vars(part) for part in measured] == [validation["perplexity"], validation["divergence"]]


def test_targets_wanting_the_same_quant_of_the_unpruned_model_quantize_and_score_it_once(tiny_bpe_llama, tmp_path):
    path = tmp_path / "edgeprune.toml"
    path.write_text(build_toml(tiny_bpe_llama, {"name": "laptop", "profile": "x86-laptop-16gb", "quants": ["Q8_0"]},
                               {"name": "mac", "profile": "apple-m1-8gb", "quants": ["Q8_0"]}))
    result = run_cli("build", str(path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("quantized for an earlier target") == 1
    built = _ggufs(tmp_path / "out")
    assert built["laptop"][0] == built["mac"][0]
    # the Mac's flash attention changes speed, not the file's quality: one scoring serves both targets
    assert result.stderr.count("perplexity and divergence are reused") == 1
    assert "scoring quality with ctx" in result.stderr
    laptop, mac = (json.loads((tmp_path / "out" / name / "report.json").read_text())["validation"]
                   for name in ("laptop", "mac"))
    assert (laptop["perplexity"], laptop["divergence"]) == (mac["perplexity"], mac["divergence"])
    assert (laptop["memory"]["flash_attention"], mac["memory"]["flash_attention"]) == (False, True)
    assert mac["perplexity"]["flash_attention"] is False


def _parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Ollama's Modelfile grammar: comments, INSTRUCTION arguments, and triple-quoted multi-line values."""
    instructions, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        command, _, argument = line.partition(" ")
        if argument.startswith('"""'):
            value = argument[3:]
            while not value.endswith('"""'):
                assert i < len(lines), "unterminated triple-quoted value"
                value += "\n" + lines[i]
                i += 1
            argument = value[:-3]
        instructions.append((command.upper(), argument))
    return instructions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_smollm2_build_hands_off_to_ollama_and_a_server(smollm2_gguf, tmp_path):
    """The real model for two devices: each Modelfile parses, and the printed llama-cpp-python server command
    serves the built GGUF and answers a chat request."""
    path = tmp_path / "edgeprune.toml"
    path.write_text(f"""
[model]
path = "{smollm2_gguf}"
[evaluation]
context = 256
chunks = 4
[[targets]]
name = "pi5"
profile = "raspberry-pi-5-8gb"
[[targets]]
name = "phone"
profile = "snapdragon-8-gen-3-phone"
""")
    result = run_cli("build", str(path), timeout=2400)
    out = tmp_path / "out"
    verdicts = [json.loads((out / t / "report.json").read_text())["validation"]["passed"] for t in ("pi5", "phone")]
    assert result.returncode == (0 if all(verdicts) else 1), result.stderr[-3000:]
    for target in ("pi5", "phone"):
        instructions = _parse_modelfile((out / target / "Modelfile").read_text())
        commands = [c for c, _ in instructions]
        assert commands[0] == "FROM" and set(commands) <= {"FROM", "TEMPLATE", "PARAMETER"}
        assert (out / target / instructions[0][1]).is_file()
        template = dict(instructions)["TEMPLATE"]
        assert "<|im_start|>" in template and "{{ .Content }}" in template  # SmolLM2 speaks ChatML
        parameters = [a.split(" ", 1)[0] for c, a in instructions if c == "PARAMETER"]
        assert {"stop", "num_ctx", "num_thread"} <= set(parameters)
    printed = re.search(r"serve: \(cd (\S+) && (.+)\)", result.stdout)
    directory, command = Path(printed.group(1)), printed.group(2).split()
    port = _free_port()
    command[command.index("--port") + 1] = str(port)
    command[0] = sys.executable
    log = tmp_path / "server.log"  # a file, not a pipe: llama.cpp's load log would fill a pipe and stall it
    with open(log, "wb") as sink:
        server = subprocess.Popen(command, cwd=directory, stdout=sink, stderr=subprocess.STDOUT)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}).encode())
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None, log.read_text(errors="replace")[-2000:]
                assert time.time() < deadline, "the server did not come up"
                time.sleep(1)
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["choices"][0]["message"]["content"].strip()
    finally:
        server.terminate()
        server.wait(timeout=30)
