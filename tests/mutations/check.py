"""Each weak assertion of issue 25, broken on purpose: apply one patch to a temporary copy of the repository and check
that the named test fails there (PASS) where it passes on the unpatched copy. Not part of the suite; run it by hand:

    .venv/bin/python tests/mutations/check.py                 # every patch, against the committed HEAD
    .venv/bin/python tests/mutations/check.py NAME ...        # only these patches (file names without .patch)
    .venv/bin/python tests/mutations/check.py --baseline NAME # also run the test on the unpatched copy first
    .venv/bin/python tests/mutations/check.py --worktree NAME # copy the working tree instead of HEAD

The copy is imported through PYTHONPATH (the virtualenv's editable install points at the checkout); every run prints
the edgeprune it imported to show it is the copy's. Tests on SmolLM2 take minutes each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# patch -> (the weak assertion it shows fixed, the tests that must fail with it applied)
MUTATIONS = {
    "validate-kld-zero": ("the validate fixture scored a model against itself (KLD 0 passes trivially)",
                          ["tests/test_validate.py::test_divergence_against_another_file_matches_an_independent_computation"]),
    "validate-decode-doubled": ("speeds were only checked to be above zero",
                                ["tests/test_validate.py::test_speed_and_memory_are_measured"]),
    "costmodel-decode-gib": ("host-probe tests fitted speeds that the cost model itself generated",
                             ["tests/test_hostprobe.py::test_fitted_type_efficiencies_reproduce_the_runs_and_predict_a_new_mix"]),
    "costmodel-embedding-not-read": ("export tests compared a check with the prediction it was copied from",
                                     ["tests/test_export_pruning.py::test_off_device_verdict_fails_on_the_prediction_although_this_machine_is_fast",
                                      "tests/test_export_pruning.py::test_off_device_verdict_passes_on_the_prediction_although_this_machine_is_slow"]),
    "topk-kld-biased": ("the bundle's KLD was allowed 10% where the README claims 1%",
                        ["tests/test_bundle.py::test_bundle_validates_without_torch_and_agrees_with_the_host"]),
    "quantize-q8-as-q5": ("Q8_0 quality was accepted anywhere in 5 < PPL < 40, KLD < 0.05",
                          ["tests/test_smollm2.py::test_export_cli_end_to_end"]),
    "export-exits-1": ("tests accepted exit 0 or 1 where the case has one right answer",
                       ["tests/test_reliability.py::test_interrupts_leave_nothing_partial_and_rerun_completes"]),
    "laptop-context-line": ("a fixture edited a shipped profile with an unchecked str.replace",
                            ["tests/test_bundle.py::test_export_writes_a_small_complete_bundle"]),
    "report-page-without-validation": ("the report-page test rendered synthetic dataclasses, never a real export",
                                       ["tests/test_reporting.py::test_a_real_exports_page_shows_its_own_report_json"]),
}


def copy_repository(destination: Path, worktree: bool) -> None:
    """HEAD's files (git archive), or the working tree without the virtualenv, git and caches."""
    if worktree:
        shutil.copytree(REPO, destination, ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", ".pytest_cache", "test-artifacts", "*.egg-info"))
    else:
        destination.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)


def run_tests(copy: Path, tests: list[str]) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(copy))
    where = subprocess.run([sys.executable, "-c", "import edgeprune; print(edgeprune.__file__)"], cwd=copy, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(copy)):
        raise SystemExit(f"the copy's edgeprune is not the one imported: {where}")
    print(f"    edgeprune imported from {where}", flush=True)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--rootdir", str(copy),
                        *tests], cwd=copy, env=env, capture_output=True, text=True)
    return r.returncode, (r.stdout + r.stderr).strip().splitlines()[-1] if (r.stdout + r.stderr).strip() else ""


def check(name: str, baseline: bool, worktree: bool) -> bool:
    why, tests = MUTATIONS[name]
    print(f"{name}: {why}", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"mutation-{name}-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repository(copy, worktree)
        if baseline:
            code, last = run_tests(copy, tests)
            print(f"    unpatched: exit {code}: {last}", flush=True)
            if code != 0:
                print(f"    BROKEN: the test fails without the patch", flush=True)
                return False
        applied = subprocess.run(["git", "apply", str(HERE / f"{name}.patch")], cwd=copy, capture_output=True, text=True)
        if applied.returncode != 0:
            print(f"    BROKEN: the patch no longer applies: {applied.stderr.strip()}", flush=True)
            return False
        code, last = run_tests(copy, tests)
        print(f"    patched: exit {code}: {last}", flush=True)
        caught = code == 1  # 1: tests ran and failed (2-5: interrupted, internal, usage or nothing collected)
        print(f"    {'PASS: the test fails under the break' if caught else 'FAIL: the break went unnoticed'}", flush=True)
        return caught


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"patches to check: {', '.join(MUTATIONS)}")
    parser.add_argument("--baseline", action="store_true", help="run each test on the unpatched copy first")
    parser.add_argument("--worktree", action="store_true", help="copy the working tree, not HEAD")
    args = parser.parse_args()
    unknown = set(args.names) - set(MUTATIONS)
    if unknown:
        parser.error(f"no such patch: {', '.join(sorted(unknown))}")
    results = {name: check(name, args.baseline, args.worktree) for name in args.names or MUTATIONS}
    print("\n".join(f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in results.items()))
    sys.exit(0 if all(results.values()) else 1)


if __name__ == "__main__":
    main()
