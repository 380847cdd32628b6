"""What decides the bytes edgeprune writes, beyond its inputs: its own code and data.

The package version is fixed between releases, so it cannot tell an edited or upgraded checkout from the one
that made a build. The digest of the source and data files of the three shipped packages (`edgeprune`,
`converters`, `profiles`) can: build keys and cache keys include it, and `edgeprune --version` prints it, so
that a remote validator in another version is noticed.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from edgeprune import __version__

PACKAGES = ("edgeprune", "converters", "profiles")
SUFFIXES = (".py", ".toml")


def _package_root() -> Path:
    return Path(__file__).resolve().parents[2]


def code_files() -> list[Path]:
    """Every source and data file of the shipped packages, in a fixed order."""
    root = _package_root()
    found = []
    for package in PACKAGES:
        directory = root / package
        found += [f for f in directory.rglob("*") if f.suffix in SUFFIXES and f.is_file()
                  and "__pycache__" not in f.parts]
    return sorted(found, key=lambda f: f.relative_to(root).as_posix())


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the relative paths and contents of `code_files()`; computed once per process."""
    root = _package_root()
    digest = hashlib.sha256()
    for file in code_files():
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def version_string() -> str:
    """The package version and the first 12 hex digits of the code digest, e.g. `0.1.0+code.1a2b3c4d5e6f`."""
    return f"{__version__}+code.{code_digest()[:12]}"
