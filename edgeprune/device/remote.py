"""`edgeprune validate BUNDLE --remote user@host[:port]`: validate a bundle on the device itself, over SSH.

The device is where speed and memory are real, but it is often a headless board the user reaches only by SSH,
and a bundle can be gigabytes. So this copies only the files the remote lacks (checked by SHA-256 there, so an
interrupted copy heals itself on the next run), runs the remote's own `edgeprune validate`, and brings the JSON
report back. It uses the system `ssh`/`scp` clients, so the user's keys, agent and ~/.ssh/config just work, and
it needs nothing beyond the standard library (no torch, no paramiko).

Every failure is one line naming the cause (host unreachable, key refused, host key changed, no edgeprune
there, validator crashed, connection dropped), and every step has a timeout: a remote run never hangs.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgeprune.core.atomic import write_text_atomic
from edgeprune.core.codedigest import version_string
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.validation.quality import DEFAULT_PRECISION, MIN_EVAL_CTX, check_evaluation_options

CONNECT_TIMEOUT_S = 10
# ssh gives up after ServerAliveInterval × ServerAliveCountMax seconds of silence from the server, so a dropped
# connection (device unplugged, Wi-Fi gone) ends the run in a minute instead of hanging until the overall timeout.
SERVER_ALIVE_INTERVAL_S = 15
SERVER_ALIVE_COUNT_MAX = 4
QUICK_STEP_S = 120  # the version check and the report fetch: a connection plus a trivial command
DEFAULT_TIMEOUT_S = 7200.0  # the whole remote run: copy, hash and validate a large model on a slow board
INSTALL_HINT = "install it there with pip install 'edgeprune[device]'"
REPORT_NAME = "report.json"
GIVEN_PROFILE_DIR = "given-profile"  # --profile's file, under its own name (a profile is named by its file's stem)
UPDATED_PROFILE_PREFIX = "updated-"  # where the remote writes --update-profile, fetched back afterwards

# Run with the remote's python3: hashes the files whose size matches the manifest, creates the directories the
# copy needs, and prints {name: sha256}. A file of the wrong size is not hashed (it must be copied anyway).
_HASH_SCRIPT = """
import hashlib, json, os, sys
root, sizes = sys.argv[1], json.loads(sys.argv[2])
out = {}
for name, size in sizes.items():
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.isfile(path) and os.path.getsize(path) == size:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[name] = h.hexdigest()
print(json.dumps(out))
"""


@dataclass
class RemoteTarget:
    user: str
    host: str
    port: int = 22

    def __str__(self) -> str:
        return f"{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")

    @property
    def login(self) -> str:
        """user@host as ssh and scp take it (an IPv6 address in brackets, as scp needs)."""
        return f"{self.user}@[{self.host}]" if ":" in self.host else f"{self.user}@{self.host}"


_TARGET = re.compile(r"(?P<user>[^@\s]+)@(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^@\s:\[\]]+))(?::(?P<port>\d+))?")


def parse_target(spec: str) -> RemoteTarget:
    """`user@host`, `user@host:port` or `user@[v6 address]:port`."""
    m = _TARGET.fullmatch(spec.strip())
    port = int(m["port"]) if m and m["port"] else 22
    if not m or not 1 <= port <= 65535:
        raise EdgepruneError(f"--remote {spec!r} is not user@host[:port] "
                             "(e.g. pi@raspberrypi.local or pi@10.0.0.7:2222)")
    return RemoteTarget(m["user"], m["v6"] or m["host"], port)


def check_remote_tools() -> None:
    """The local OpenSSH clients must exist before anything is attempted."""
    missing = [tool for tool in ("ssh", "scp") if shutil.which(tool) is None]
    if missing:
        raise EdgepruneError(f"{' and '.join(missing)} not found here: --remote needs the OpenSSH client "
                             "(e.g. apt-get install openssh-client)")


def bundle_id(bundle_dir: Path) -> str:
    """The SHA-256 of manifest.json: it names every file's hash, so equal ids mean equal bundles."""
    return hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()


def _bundle_files(bundle_dir: Path) -> dict[str, dict]:
    """The manifest's files plus manifest.json itself, checked here (present, right size, a safe relative name)
    before anything goes over the wire."""
    try:
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
        files = {name: {"sha256": str(entry["sha256"]), "bytes": int(entry["bytes"])}
                 for name, entry in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EdgepruneError(f"{bundle_dir} is not a validation bundle (manifest.json: {exc}); "
                             "write one with edgeprune export") from None
    for name, entry in files.items():
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise EdgepruneError(f"{bundle_dir}/manifest.json names {name!r}, outside the bundle; export it again")
        path = bundle_dir / name
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise EdgepruneError(f"{path} is missing or not {entry['bytes']} bytes as manifest.json says; "
                                 "export the bundle again")
    files["manifest.json"] = {"sha256": bundle_id(bundle_dir), "bytes": (bundle_dir / "manifest.json").stat().st_size}
    return files


class _Ssh:
    """ssh/scp to one target with the same options, each call bounded by the overall deadline."""

    def __init__(self, target: RemoteTarget, identity: Path | None, known_hosts: Path | None, deadline: float):
        self.target, self.deadline, self.known_hosts = target, deadline, known_hosts
        self.options = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                        "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                        "-o", f"ServerAliveInterval={SERVER_ALIVE_INTERVAL_S}",
                        "-o", f"ServerAliveCountMax={SERVER_ALIVE_COUNT_MAX}"]
        if known_hosts is not None:
            self.options += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
        if identity is not None:
            self.options += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]

    def _limit(self, what: str, step_s: float | None = None) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.timeout_error(what)
        return left if step_s is None else min(left, step_s)

    def timeout_error(self, what: str) -> EdgepruneError:
        return EdgepruneError(f"{what} on {self.target} did not finish in time: the connection dropped or the "
                              "device is too slow (raise --remote-timeout)")

    def _ssh_argv(self, command: str) -> list[str]:
        return ["ssh", "-p", str(self.target.port), *self.options, self.target.login, command]

    def run(self, command: str, what: str, *, step_s: float | None = None) -> subprocess.CompletedProcess:
        """Run a shell command line there; ssh's own failures (exit 255) become one-line errors."""
        try:
            done = subprocess.run(self._ssh_argv(command), capture_output=True, text=True, errors="replace",
                                  stdin=subprocess.DEVNULL, timeout=self._limit(what, step_s))
        except subprocess.TimeoutExpired:
            raise self.timeout_error(what) from None
        if done.returncode == 255:
            raise self.connection_error(done.stderr, what)
        return done

    def copy(self, local: list[Path], remote_dir: str) -> None:
        argv = ["scp", "-q", "-P", str(self.target.port), *self.options, *map(str, local),
                f"{self.target.login}:{remote_dir}/"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                                  stdin=subprocess.DEVNULL, timeout=self._limit("the copy"))
        except subprocess.TimeoutExpired:
            raise self.timeout_error("the copy") from None
        if done.returncode != 0:
            raise self.connection_error(done.stderr, "the copy")

    def stream(self, command: str, what: str, progress: Callable[[str], None]) -> tuple[int, list[str]]:
        """Run a long command, relaying its output lines as progress; returns its exit code and last two lines.
        A timer kills ssh at the deadline, which ends the read loop."""
        proc = subprocess.Popen(self._ssh_argv(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        expired = threading.Event()
        timer = threading.Timer(self._limit(what), lambda: (expired.set(), proc.kill()))
        timer.start()
        tail: list[str] = []
        try:
            for line in proc.stdout:
                if line.strip():
                    tail = [*tail[-1:], line.strip()]
                    progress(f"remote: {line.strip()}")
            code = proc.wait()
        finally:
            timer.cancel()
            proc.kill()
            proc.wait()
        if expired.is_set():
            raise self.timeout_error(what)
        if code == 255:
            raise self.connection_error("\n".join(tail), what)
        return code, tail

    def connection_error(self, stderr: str, what: str) -> EdgepruneError:
        """One line for what ssh said on stderr (it prints a page for a changed host key)."""
        t, last = self.target, _last_line(stderr)
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
            file = f" -f {self.known_hosts}" if self.known_hosts else ""
            name = t.host if t.port == 22 else f"[{t.host}]:{t.port}"
            return EdgepruneError(f"the host key of {t.host} differs from the one in known_hosts (a reinstalled "
                                  f"device, or someone in between): check it, then ssh-keygen{file} -R '{name}'")
        if "Host key verification failed" in stderr:
            return EdgepruneError(f"{t.host}'s host key is not in known_hosts: connect once with "
                                  f"ssh -p {t.port} {t.login} to check and accept it")
        if "Permission denied" in stderr:
            return EdgepruneError(f"{t} refused the key ({last}): add your public key to its "
                                  "~/.ssh/authorized_keys, or name the right one with --identity")
        if re.search(r"Connection refused|Connection timed out|No route to host|Could not resolve|"
                     r"Network is unreachable|Name or service not known", stderr):
            return EdgepruneError(f"cannot reach {t} ({last}): check the address, the port and that sshd runs "
                                  "there")
        return EdgepruneError(f"the connection to {t} dropped during {what} ({last})")


def _last_line(text: str) -> str:
    return next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "no message")


def version_mismatch(target: RemoteTarget, version_output: str) -> str | None:
    """A line saying that the remote's `edgeprune --version` differs from this one's (None when they agree): the
    version string carries a digest of the code, so another release or an edited checkout there is noticed."""
    line = _last_line(version_output)
    found = re.search(r"version\s+(\S+)", line)
    remote, local = (found[1] if found else line), version_string()
    if remote == local:
        return None
    return (f"warning: {target} runs edgeprune {remote}, this machine {local}: the remote validates with other code "
            "(flags, scoring, budgets may differ); install the same version there for comparable reports")


def _remote_hashes(ssh: _Ssh, remote_dir: str, files: dict[str, dict]) -> dict[str, str]:
    sizes = {name: entry["bytes"] for name, entry in files.items()}
    q = shlex.quote
    done = ssh.run(f"python3 -c {q(_HASH_SCRIPT)} {q(remote_dir)} {q(json.dumps(sizes))}", "the hash check")
    try:
        if done.returncode == 0:
            return json.loads(_last_line(done.stdout))
    except ValueError:
        pass
    raise EdgepruneError(f"cannot check the bundle's files on {ssh.target} with python3: {_last_line(done.stderr)}")


def _sync(ssh: _Ssh, bundle_dir: Path, files: dict[str, dict], remote_dir: str,
          progress: Callable[[str], None]) -> None:
    """Copy what the remote lacks or holds in another version, then check the copies' hashes there. A file's
    "local" entry names it here when it is not in the bundle (the --profile given)."""
    there = _remote_hashes(ssh, remote_dir, files)
    missing = [name for name, entry in files.items() if there.get(name) != entry["sha256"]]
    size_mb = sum(files[name]["bytes"] for name in missing) / 1e6
    progress(f"{len(missing)} of {len(files)} files to copy ({size_mb:.1f} MB), "
             f"{len(files) - len(missing)} already there")
    by_dir: dict[str, list[Path]] = {}
    for name in missing:
        parent = str(PurePosixPath(name).parent)
        by_dir.setdefault(remote_dir if parent == "." else f"{remote_dir}/{parent}", []).append(
            files[name].get("local", bundle_dir / name))
    for directory, paths in by_dir.items():
        ssh.copy(paths, directory)
    if missing:
        copied = _remote_hashes(ssh, remote_dir, {name: files[name] for name in missing})
        bad = [name for name in missing if copied.get(name) != files[name]["sha256"]]
        if bad:
            raise EdgepruneError(f"{bad[0]} differs from manifest.json after the copy to {ssh.target}: the local "
                                 "bundle is damaged (check it with edgeprune validate here) or the copy failed")


def _validator_error(target: RemoteTarget, code: int, tail: list[str]) -> EdgepruneError:
    """A remote validator that gave no verdict (0 pass / 1 budget missed), as one line with its last words."""
    last = tail[-1] if tail else "no output"
    if code == 2:
        return EdgepruneError(f"the validator on {target} refused the run (exit 2): {last}")
    if code == 3:
        return EdgepruneError(f"the validator on {target} hit an internal error (exit 3; its log is on the "
                              f"remote): {last}")
    if code - 128 in signal.valid_signals():
        if len(tail) == 2 and signal.strsignal(code - 128) in tail[-1]:
            last = tail[0]  # the last line is sh's own "Segmentation fault"; the one before is the validator's
        return EdgepruneError(f"the validator on {target} crashed (killed by {signal.Signals(code - 128).name}): "
                              f"{last}")
    return EdgepruneError(f"the validator on {target} failed (exit {code}): {last}")


def validate_remote(bundle_dir: Path, target: RemoteTarget, *, identity: Path | None = None,
                    known_hosts: Path | None = None, remote_command: str = "edgeprune",
                    remote_dir: str | None = None, threads: int | None = None,
                    timeout_s: float = DEFAULT_TIMEOUT_S, profile: Path | None = None,
                    eval_chunks: int | None = None, precision: float | None = DEFAULT_PRECISION,
                    update_profile: Path | None = None,
                    progress: Callable[[str], None] = lambda message: None) -> tuple[dict, int]:
    """Validate bundle_dir on target; returns (the remote's JSON report, its exit code: 0 pass, 1 budget missed).

    remote_command is a shell command line on the remote (e.g. a venv's bin/edgeprune). remote_dir defaults to
    ~/.cache/edgeprune/bundles/<bundle id>, so a second run of the same bundle copies nothing; a path starting
    with ~/ is taken relative to the remote home, where ssh and scp start. What the remote validator understands
    is forwarded: `profile` (a profile file here, copied beside the bundle, replacing the bundle's own),
    `eval_chunks` (the bundle's first chunks), `precision` (None: --eval-fixed) and `update_profile` (the profile
    with the efficiencies measured there, written to this local path).
    """
    bundle_dir = Path(bundle_dir)
    files = _bundle_files(bundle_dir)  # a bad bundle is bad input: say so before connecting
    if profile is not None:
        profile = Path(profile)
        files[f"{GIVEN_PROFILE_DIR}/{profile.name}"] = {"sha256": hashlib.sha256(profile.read_bytes()).hexdigest(),
                                                        "bytes": profile.stat().st_size, "local": profile}
    if remote_dir is None:
        remote_dir = f".cache/edgeprune/bundles/{files['manifest.json']['sha256']}"
    elif remote_dir.startswith("~/"):
        remote_dir = remote_dir[2:]
    ssh = _Ssh(target, identity, known_hosts, time.monotonic() + timeout_s)
    q = shlex.quote

    progress(f"connecting to {target}")
    version = ssh.run(f"{remote_command} --version", "the version check", step_s=QUICK_STEP_S)
    if version.returncode in (126, 127):  # the shell's "not executable" / "not found"
        raise EdgepruneError(f"the remote has no edgeprune ({_last_line(version.stderr)}): {INSTALL_HINT}")
    if version.returncode != 0:
        raise EdgepruneError(f"edgeprune on {target} does not start ({_last_line(version.stderr)}): {INSTALL_HINT}")
    shown = remote_dir if remote_dir.startswith("/") else f"~/{remote_dir}"
    progress(f"{target} has {_last_line(version.stdout)}; the bundle goes to {shown}")
    mismatch = version_mismatch(target, version.stdout)
    if mismatch:
        progress(mismatch)

    _sync(ssh, bundle_dir, files, remote_dir, progress)

    report = f"{remote_dir}/{REPORT_NAME}"
    progress(f"running the validator on {target}")
    # sh, whatever the login shell, and "; exit $?" keeping it the validator's parent: a crash then reads as
    # 128+signal, and ssh's 255 means only that the connection failed.
    flags = [] if threads is None else ["--threads", str(int(threads))]
    if profile is not None:
        flags += ["--profile", f"{remote_dir}/{GIVEN_PROFILE_DIR}/{profile.name}"]
    if eval_chunks is not None:
        flags += ["--eval-chunks", str(int(eval_chunks))]
    flags += ["--eval-fixed"] if precision is None else ["--eval-precision", repr(float(precision))]
    updated = None if update_profile is None else f"{remote_dir}/{UPDATED_PROFILE_PREFIX}{Path(update_profile).name}"
    if updated is not None:
        flags += ["--update-profile", updated]
    script = (f"rm -f {q(report)}{'' if updated is None else ' ' + q(updated)}; {remote_command} validate "
              f"{q(remote_dir)} --json {q(report)}{''.join(' ' + q(f) for f in flags)}; exit $?")
    code, tail = ssh.stream(f"sh -c {q(script)}", "the remote run", progress)
    if code not in (0, 1):
        raise _validator_error(target, code, tail)

    progress("fetching the report")
    fetched = ssh.run(f"cat {q(report)}", "fetching the report", step_s=QUICK_STEP_S)
    try:
        document = json.loads(fetched.stdout)
    except ValueError:
        raise EdgepruneError(f"the validator on {target} exited {code} but left no readable report at "
                             f"{shown}/{REPORT_NAME} ({_last_line(fetched.stderr)})") from None
    if updated is not None:
        progress("fetching the updated profile")
        profile_text = ssh.run(f"cat {q(updated)}", "fetching the updated profile", step_s=QUICK_STEP_S)
        if profile_text.returncode != 0 or not profile_text.stdout.strip():
            raise EdgepruneError(f"the validator on {target} wrote no updated profile at {updated} "
                                 f"({_last_line(profile_text.stderr)})")
        write_text_atomic(Path(update_profile), profile_text.stdout)
    return document, code


def validate_bundle_remote(bundle_dir: Path, remote: str, *, profile: str | None = None,
                           eval_chunks: int | None = None, precision: float | None = DEFAULT_PRECISION,
                           update_profile: Path | None = None, **options) -> tuple[RemoteTarget, dict, int]:
    """`validate BUNDLE --remote USER@HOST[:PORT]`: what validate_remote takes (`options`), checked here before
    connecting: the target, the profile (a name or path here), the chunks the bundle holds and the updated
    profile's destination. Returns the target, the remote's report and its exit code."""
    from edgeprune.device.bundle import chunks_to_score
    from edgeprune.device.profile_update import check_update_destination
    from edgeprune.device.profiles import load_profile

    target = parse_target(remote)
    profile_path = load_profile(profile).path if profile else None
    check_evaluation_options(MIN_EVAL_CTX, eval_chunks, precision)
    chunks_to_score(bundle_dir, eval_chunks)
    if update_profile is not None:
        check_update_destination(update_profile)
    check_remote_tools()
    document, code = validate_remote(bundle_dir, target, profile=profile_path, eval_chunks=eval_chunks,
                                     precision=precision, update_profile=update_profile, **options)
    return target, document, code
