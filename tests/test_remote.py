"""`validate --remote`: against a real OpenSSH server on 127.0.0.1 that the test starts, with its own host key
and user key. A stand-in `edgeprune` script plays the remote validator where the test is about the transport
(copy, errors, timeouts); the end-to-end test runs the real validator on a real bundle."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeprune.core.errors import EdgepruneError
from edgeprune.device.remote import RemoteTarget, bundle_id, check_remote_tools, parse_target, validate_remote
from edgeprune.device.validation.quality import DEFAULT_PRECISION

SSHD = Path("/usr/sbin/sshd")
EDGEPRUNE = Path(sys.executable).parent / "edgeprune"  # the venv's own, so the test does not depend on PATH


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgeprune-test", "-f", str(path)],
                   check=True)
    return path


def _known_hosts(path: Path, port: int, host_pub: Path) -> Path:
    key_type, key = host_pub.read_text().split()[:2]
    path.write_text(f"[127.0.0.1]:{port} {key_type} {key}\n")
    return path


@dataclass
class Sshd:
    process: subprocess.Popen
    target: RemoteTarget
    identity: Path
    known_hosts: Path
    work: Path

    def connection_pids(self) -> list[int]:
        """sshd's per-connection children: killing one drops that connection."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                pids.append(int(stat.parent.name))
        return pids

    def remote(self, bundle: Path, **kwargs):
        kwargs = {"identity": self.identity, "known_hosts": self.known_hosts, "timeout_s": 60, **kwargs}
        return validate_remote(bundle, self.target, **kwargs)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> Sshd:
    """A real sshd -D on 127.0.0.1 and a free port, root login with a key generated here, stopped at teardown."""
    if not SSHD.exists():
        pytest.skip("no /usr/sbin/sshd: apt-get install -y openssh-server")
    if os.geteuid() != 0:
        pytest.skip("sshd must run as root to log a user in")
    work = tmp_path_factory.mktemp("sshd")
    host_key, user_key = _keygen(work / "host_ed25519"), _keygen(work / "user_ed25519")
    shutil.copy(work / "user_ed25519.pub", work / "authorized_keys")
    port = _free_port()
    config = work / "sshd_config"
    config.write_text(f"""ListenAddress 127.0.0.1
Port {port}
HostKey {host_key}
AuthorizedKeysFile {work / 'authorized_keys'}
PidFile {work / 'sshd.pid'}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
Subsystem sftp /usr/lib/openssh/sftp-server
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    with open(work / "sshd.log", "wb") as log:
        process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"sshd did not start: {(work / 'sshd.log').read_text()}")
            time.sleep(0.05)
    server = Sshd(process, RemoteTarget("root", "127.0.0.1", port), user_key,
                  _known_hosts(work / "known_hosts", port, work / "host_ed25519.pub"), work)
    yield server
    for pid in server.connection_pids():
        os.kill(pid, signal.SIGKILL)
    process.terminate()
    process.wait(timeout=10)


def _fake_edgeprune(path: Path, validate_body: str) -> str:
    """A stand-in for the remote's edgeprune: answers --version, and runs validate_body for
    `validate DIR --json REPORT [...]` with $dir and $report set."""
    path.write_text("#!/bin/sh\n"
                    'if [ "$1" = --version ]; then echo "edgeprune, version 0.0-fake"; exit 0; fi\n'
                    'dir=$2; report=$4\n' + validate_body + "\n")
    path.chmod(0o755)
    return str(path)


def _reporting_edgeprune(path: Path, exit_code: int = 0) -> str:
    return _fake_edgeprune(path, f"""printf '{{"argv": "%s", "pass": {str(exit_code == 0).lower()}}}' "$*" > "$report"
echo "fake validator ran"
exit {exit_code}""")


def _bundle(directory: Path, contents: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, data in contents.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (directory / "manifest.json").write_text(json.dumps({"schema": 1, "files": files}))
    return directory


@pytest.fixture
def fake_bundle(tmp_path) -> Path:
    return _bundle(tmp_path / "bundle", {"model.gguf": os.urandom(300_000), "tokens.bin": b"\x01\x02" * 500,
                                         "profile/device.toml": b"[device]\nthreads = 4\n"})


def _copied(lines: list[str]) -> int:
    """How many files the run copied, from its progress line "N of M files to copy"."""
    return int(next(line for line in lines if "files to copy" in line).split()[0])


def _error(call, limit_s: float) -> str:
    """The EdgepruneError's message, checked to be one line and to come within limit_s."""
    start = time.monotonic()
    with pytest.raises(EdgepruneError) as info:
        call()
    assert time.monotonic() - start < limit_s
    message = str(info.value)
    assert "\n" not in message
    return message


def test_parse_target():
    assert parse_target("pi@raspberrypi.local") == RemoteTarget("pi", "raspberrypi.local", 22)
    assert parse_target("root@127.0.0.1:2222") == RemoteTarget("root", "127.0.0.1", 2222)
    assert parse_target("me@[::1]:2200") == RemoteTarget("me", "::1", 2200)
    for bad in ("raspberrypi.local", "pi@", "pi@host:port", "pi@host:0", "pi@host:70000", "a b@host"):
        with pytest.raises(EdgepruneError, match="is not user@host"):
            parse_target(bad)


def test_missing_ssh_client_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EdgepruneError, match=r"^ssh and scp not found here.*openssh-client"):
        check_remote_tools()


def test_bad_bundle_fails_before_connecting(fake_bundle, tmp_path):
    nowhere = RemoteTarget("root", "127.0.0.1", _free_port())
    message = _error(lambda: validate_remote(tmp_path, nowhere), 5)
    assert message.startswith(f"{tmp_path} is not a validation bundle (manifest.json:")
    (fake_bundle / "tokens.bin").write_bytes(b"short")
    message = _error(lambda: validate_remote(fake_bundle, nowhere), 5)
    assert message == f"{fake_bundle / 'tokens.bin'} is missing or not 1000 bytes as manifest.json says; " \
                      "export the bundle again"


def test_report_and_verdict_come_back(sshd, fake_bundle, tmp_path):
    """Exit 1 (a budget missed) is a verdict, not an error; the default remote dir is named by the bundle id."""
    lines = []
    remote_dir = Path(pwd.getpwnam(sshd.target.user).pw_dir) / ".cache/edgeprune/bundles" / bundle_id(fake_bundle)
    try:
        report, code = sshd.remote(fake_bundle, remote_command=_reporting_edgeprune(tmp_path / "ep", 1),
                                   threads=3, progress=lines.append)
        assert code == 1 and report["pass"] is False
        assert report["argv"] == (f"validate .cache/edgeprune/bundles/{bundle_id(fake_bundle)} --json "
                                  f".cache/edgeprune/bundles/{bundle_id(fake_bundle)}/report.json --threads 3 "
                                  f"--eval-precision {DEFAULT_PRECISION}")
        assert (remote_dir / "profile/device.toml").read_bytes() == (fake_bundle / "profile/device.toml").read_bytes()
        assert "remote: fake validator ran" in lines and lines[-1] == "fetching the report"
    finally:
        shutil.rmtree(remote_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the bundles folder too, if this test made it and nothing else is there
            remote_dir.parent.rmdir()


def test_copies_only_what_the_remote_lacks(sshd, fake_bundle, tmp_path):
    command, remote_dir = _reporting_edgeprune(tmp_path / "ep"), tmp_path / "remote"

    def copied() -> int:
        lines = []
        assert sshd.remote(fake_bundle, remote_command=command, remote_dir=str(remote_dir),
                           progress=lines.append)[1] == 0
        return _copied(lines)

    assert copied() == 4  # three files and manifest.json
    for name in ("model.gguf", "tokens.bin", "profile/device.toml", "manifest.json"):
        assert (remote_dir / name).read_bytes() == (fake_bundle / name).read_bytes()
    assert copied() == 0
    damaged = bytearray((remote_dir / "model.gguf").read_bytes())
    damaged[1000] ^= 0xFF  # same size, other content: only the hash tells
    (remote_dir / "model.gguf").write_bytes(damaged)
    assert copied() == 1
    _bundle(fake_bundle, {"tokens.bin": b"\x03" * 10})  # a new export of one file rewrites the manifest too
    assert copied() == 2
    assert (remote_dir / "tokens.bin").read_bytes() == b"\x03" * 10


def test_unreachable_host(sshd, fake_bundle):
    closed = RemoteTarget("root", "127.0.0.1", _free_port())
    message = _error(lambda: validate_remote(fake_bundle, closed, identity=sshd.identity,
                                             known_hosts=sshd.known_hosts, remote_command=str(EDGEPRUNE)), 15)
    assert message.startswith(f"cannot reach {closed}") and "Connection refused" in message


def test_refused_key(sshd, fake_bundle, tmp_path):
    other = _keygen(tmp_path / "other_key")
    message = _error(lambda: sshd.remote(fake_bundle, identity=other, remote_command=str(EDGEPRUNE)), 15)
    assert "refused the key" in message and "Permission denied (publickey)" in message


def test_host_key_mismatch(sshd, fake_bundle, tmp_path):
    impostor = _known_hosts(tmp_path / "known_hosts", sshd.target.port, _keygen(tmp_path / "k").with_suffix(".pub"))
    message = _error(lambda: sshd.remote(fake_bundle, known_hosts=impostor, remote_command=str(EDGEPRUNE)), 15)
    assert "host key of 127.0.0.1 differs from the one in known_hosts" in message
    assert f"ssh-keygen -f {impostor} -R '[127.0.0.1]:{sshd.target.port}'" in message


def test_unknown_host_key(sshd, fake_bundle, tmp_path):
    (tmp_path / "empty").write_text("")
    message = _error(lambda: sshd.remote(fake_bundle, known_hosts=tmp_path / "empty",
                                         remote_command=str(EDGEPRUNE)), 15)
    assert "host key is not in known_hosts" in message


def test_remote_without_edgeprune(sshd, fake_bundle):
    message = _error(lambda: sshd.remote(fake_bundle, remote_command="/nonexistent/edgeprune"), 15)
    assert message.startswith("the remote has no edgeprune") and "pip install 'edgeprune[device]'" in message


@pytest.mark.parametrize("body, words", [
    ('echo "internal error: see /tmp/edgeprune-x.log" >&2; exit 3',
     "hit an internal error (exit 3; its log is on the remote): internal error: see /tmp/edgeprune-x.log"),
    ('echo "Segmentation fault ahead" >&2; kill -SEGV $$', "crashed (killed by SIGSEGV): Segmentation fault ahead"),
])
def test_crashing_validator(sshd, fake_bundle, tmp_path, body, words):
    command = _fake_edgeprune(tmp_path / "ep", body)
    message = _error(lambda: sshd.remote(fake_bundle, remote_command=command, remote_dir=str(tmp_path / "r")), 20)
    assert message == f"the validator on {sshd.target} {words}"


def _sleeping_edgeprune(tmp_path: Path) -> str:
    """A validator that starts (writes its pid) and never finishes."""
    return _fake_edgeprune(tmp_path / "ep", f'echo $$ > {tmp_path / "pid"}; exec sleep 120')


def _stop_sleeper(tmp_path: Path) -> None:
    pid = tmp_path / "pid"
    if pid.exists():
        os.kill(int(pid.read_text()), signal.SIGKILL)


def test_dropped_connection_mid_run(sshd, fake_bundle, tmp_path):
    """The connection dies while the validator runs (sshd's side of it killed): an error at once, no hang."""
    command = _sleeping_edgeprune(tmp_path)

    def drop_when_running():
        deadline = time.monotonic() + 20
        while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in sshd.connection_pids():
            os.kill(pid, signal.SIGKILL)

    dropper = threading.Thread(target=drop_when_running)
    dropper.start()
    try:
        message = _error(lambda: sshd.remote(fake_bundle, remote_command=command, remote_dir=str(tmp_path / "r")),
                         25)
    finally:
        dropper.join()
        _stop_sleeper(tmp_path)
    assert message.startswith(f"the connection to {sshd.target} dropped during the remote run")


def test_overall_timeout(sshd, fake_bundle, tmp_path):
    """A run that outlives timeout_s (a silent link, a stuck device) ends with one line, on time."""
    command = _sleeping_edgeprune(tmp_path)
    try:
        message = _error(lambda: sshd.remote(fake_bundle, remote_command=command, remote_dir=str(tmp_path / "r"),
                                             timeout_s=5), 10)
    finally:
        _stop_sleeper(tmp_path)
    assert message.startswith(f"the remote run on {sshd.target} did not finish in time")


def _comparable(document: dict) -> dict:
    """What two validations of one bundle on one machine must agree on: everything but the speeds (and the
    speed checks and verdict that follow them), peak RSS, and the paths the bundle was run from."""
    validation = document["validation"]
    drop = {"reference_gguf"}
    return {
        "sections": {k: v for k, v in document.items() if k != "validation"},
        "perplexity": validation["perplexity"],
        "divergence": {k: v for k, v in validation["divergence"].items() if k not in drop},
        "memory": {k: v for k, v in validation["memory"].items() if k != "peak_rss_bytes"},
        "size_checks": [c for c in validation["checks"] if c["name"] in ("memory", "file_size")],
        "runtime": (validation["on_device"], validation["machine"]["threads"], validation["machine"]["cores"]),
    }


def test_remote_report_equals_local(sshd, smollm2_bundle, tmp_path):
    """End to end with the real validator on a real bundle (`smollm2_bundle`, from conftest.py)."""
    local_json = tmp_path / "local.json"
    local = subprocess.run([str(EDGEPRUNE), "validate", str(smollm2_bundle), "--json", str(local_json),
                            "--threads", "1"], capture_output=True, text=True, timeout=900)
    local_verdict = json.loads(local_json.read_text())["validation"]["passed"]
    assert local.returncode == (0 if local_verdict else 1), local.stderr
    report, code = sshd.remote(smollm2_bundle, remote_command=str(EDGEPRUNE), remote_dir=str(tmp_path / "remote"),
                               threads=1, timeout_s=900)
    assert code == (0 if report["validation"]["passed"] else 1)  # each run's exit follows its own (speed) verdict
    assert _comparable(report) == _comparable(json.loads(local_json.read_text()))
