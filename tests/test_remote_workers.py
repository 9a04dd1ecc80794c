"""The across-machines recipe of docs/scale.md, run as a user would: an OpenSSH server (key login,
loopback only, started here from Debian's openssh-server), two xdist workers reached with
`--tx ssh=...//python=...` and no deprecated --rsyncdir, and the same composite and item results
as a serial run on SmolLM2.

Skips with the reason when sshd, ssh or xdist is missing; with REFRACT_REQUIRE_SSH=1 (.ci/run)
it fails instead, so CI cannot pass without running it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import plugin_args, read_report

pytestmark = pytest.mark.smollm2


def _unavailable(reason):
    if os.environ.get("REFRACT_REQUIRE_SSH"):
        pytest.fail(f"{reason} (REFRACT_REQUIRE_SSH is set: this test must run here)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def loopback_ssh(tmp_path_factory):
    """(ssh_config path, host alias, sshd log path) of a throwaway sshd on 127.0.0.1 that lets this user in
    with a key made here, and nothing else."""
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None)
    missing = [name for name, path in (("sshd (apt-get install openssh-server)", sshd),
                                       ("ssh (apt-get install openssh-client)", shutil.which("ssh")),
                                       ("ssh-keygen", shutil.which("ssh-keygen"))) if not path]
    if missing:
        _unavailable("remote-worker test needs " + ", ".join(missing))
    if importlib.util.find_spec("xdist") is None:
        _unavailable("remote-worker test needs pytest-xdist (pip install -e '.[test]')")
    home = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / key)], check=True)
    (home / "authorized_keys").write_text((home / "client_key.pub").read_text())
    (home / "authorized_keys").chmod(0o600)
    port = _free_port()
    (home / "sshd_config").write_text(
        "ListenAddress 127.0.0.1\n"
        f"Port {port}\n"
        f"HostKey {home / 'host_key'}\n"
        f"PidFile {home / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {home / 'authorized_keys'}\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\n"
        # The keys live in a temporary folder under the world-writable /tmp, which StrictModes
        # refuses; the server only listens on loopback and only accepts the key made above.
        "StrictModes no\n"
    )
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    check = subprocess.run([sshd, "-t", "-f", str(home / "sshd_config")], capture_output=True, text=True)
    if check.returncode != 0:
        _unavailable(f"sshd refuses its configuration: {check.stderr.strip()}")
    log = open(home / "sshd.log", "w")
    server = subprocess.Popen([sshd, "-D", "-e", "-f", str(home / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    user = os.environ.get("USER") or __import__("getpass").getuser()
    (home / "ssh_config").write_text(
        "Host refract-loopback\n"
        f"  HostName 127.0.0.1\n  Port {port}\n  User {user}\n"
        f"  IdentityFile {home / 'client_key'}\n  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n"
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            probe = subprocess.run(["ssh", "-F", str(home / "ssh_config"), "refract-loopback", "echo", "ok"],
                                   capture_output=True, text=True, timeout=30)
            if probe.stdout.strip() == "ok":
                break
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd on 127.0.0.1:{port} did not let the test key in: {probe.stderr.strip()} "
                            f"(sshd log: {(home / 'sshd.log').read_text()[-500:]})")
            time.sleep(0.3)
        yield home / "ssh_config", "refract-loopback", home / "sshd.log"
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def test_two_ssh_workers_give_the_serial_results(pytester, smollm2, loopback_ssh):
    ssh_config, host, sshd_log = loopback_ssh
    # The workers' interpreter is this one; a checkout under test (PYTHONPATH) is passed on,
    # since ssh starts a clean environment.
    python = sys.executable
    if os.environ.get("PYTHONPATH"):
        python = f"env PYTHONPATH={os.environ['PYTHONPATH']} {python}"
    workdir = pytester.path / "remote-cwd"
    workdir.mkdir()
    base = [
        *plugin_args(), f"--refract-model={smollm2}", "--refract-candidate=ctk=q8_0,ctv=q4_0",
        "--refract-chunks=2", "--refract-n-predict=16", "--refract-threads=1", "--refract-no-cache",
        "-k", "fact-00 or chunk",
    ]
    serial_json, remote_json = pytester.path / "serial.json", pytester.path / "remote.json"
    serial = pytester.runpytest_subprocess(*base, f"--refract-json={serial_json}")
    logins_before = sshd_log.read_text().count("Accepted publickey")
    tx = f"ssh={host}//ssh_config={ssh_config}//python={python}//chdir={workdir}"
    remote = pytester.runpytest_subprocess(*base, f"--refract-json={remote_json}",
                                           "--tx", tx, "--tx", tx, "--dist", "loadgroup")
    out = remote.stdout.str() + remote.stderr.str()
    assert remote.ret == serial.ret, out[-3000:]
    assert "deprecated" not in out.lower(), out[-3000:]
    # Two workers, each logged in over ssh with the key.
    assert "2 workers [" in out, out[-3000:]
    assert sshd_log.read_text().count("Accepted publickey") - logins_before == 2
    a, b = read_report(serial_json), read_report(remote_json)
    assert a["complete"] and b["complete"]
    assert a["composite"] is not None and b["composite"] == a["composite"]
    assert b["band"] == a["band"]
    for axis in ("trajectory", "kld"):
        left, right = a["axes"][axis]["items"], b["axes"][axis]["items"]
        assert [i["id"] for i in left] == [i["id"] for i in right] and len(left) >= 2, axis
        for x, y in zip(left, right):
            assert y["score"] == x["score"], (axis, x["id"])
            for key in ("ref_tokens", "cand_tokens", "mean_kld"):
                assert y.get(key) == x.get(key), (axis, x["id"], key)
        assert b["axes"][axis]["score"] == a["axes"][axis]["score"], axis
