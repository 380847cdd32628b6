"""The boundary between the device side and the build side is stated in pyproject.toml as import-linter
contracts and checked statically here: a change that crosses it fails before anything runs on a device."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_the_import_contracts_hold():
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


BREAKS = {  # case: (module file, line added at its top, the contract that must break, what the report names)
    "device_imports_torch": ("edgeprune/device/bundle.py", "import torch",
                             "never imports torch", "edgeprune.device.bundle -> torch"),
    "device_imports_the_build_side": ("edgeprune/device/bundle.py", "import edgeprune.build.planner",
                                      "Layers", "edgeprune.device.bundle -> edgeprune.build.planner"),
    "core_imports_the_device_side": ("edgeprune/core/shapes.py", "import edgeprune.device.profiles",
                                     "Layers", "edgeprune.core.shapes -> edgeprune.device.profiles"),
}


@pytest.mark.parametrize("case", BREAKS)
def test_each_contract_fails_when_broken_on_purpose(case, tmp_path):
    """The contracts run on a copy of the packages with one import added at a module's top."""
    module, line, contract, named = BREAKS[case]
    for part in ("edgeprune", "converters", "profiles"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    source = (tmp_path / module).read_text()
    docstring_end = source.index('"""', 3) + 3
    (tmp_path / module).write_text(source[:docstring_end] + f"\n{line}\n" + source[docstring_end:])

    result = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=tmp_path, capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}, timeout=300)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    broken = [c for c in result.stdout.split("\n\n") if "BROKEN" in c]
    assert any(contract in c for c in broken), result.stdout[-3000:]
    assert named in result.stdout.replace("\n    ", " "), result.stdout[-3000:]
