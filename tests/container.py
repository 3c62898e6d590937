"""A real systemd, booted as PID 1 of a systemd-nspawn container, for the unit tests.

The root file system is Debian bookworm from Debian's registry, built by
mmdebstrap with systemd, dbus and Python, and with a virtual environment at
/opt/notifier (where the shipped unit looks for the command) holding
notifier's dependencies and an editable install of /src. Building it takes
about a minute, so it is cached under /var/cache/notifier-test, keyed by
this recipe and pyproject.toml, outside any git tree. Each boot mounts it
as an overlay on a tmpfs (--volatile=overlay), so a test never changes the
cache, and binds the working tree read-only at /src: the daemon under test
is the code being tested.

The container shares the host's network, so the daemon inside reaches the
test servers on 127.0.0.1. systemctl and journalctl run inside it through
nsenter into its PID 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CACHE = Path("/var/cache/notifier-test")
SUITE = "bookworm"
PACKAGES = "systemd,dbus,python3,python3-venv,ca-certificates"
# The host's CA bundle: pip inside the build reaches PyPI through the same
# network as the host, which may present certificates only it trusts.
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
#: Bumped when the recipe below changes in a way the key cannot see.
RECIPE_VERSION = "1"


def _missing_tools() -> list[str]:
    needed = {"mmdebstrap": "mmdebstrap", "systemd-nspawn": "systemd-container"}
    needed["nsenter"] = "util-linux"
    return [package for tool, package in needed.items() if shutil.which(tool) is None]


def require_host() -> None:
    """Fail, saying exactly what is missing, when this host cannot boot the container."""
    if os.geteuid() != 0:
        raise AssertionError(
            "the systemd tests boot a container with systemd-nspawn, which needs root; "
            "run ./scripts/test as root"
        )
    missing = _missing_tools()
    if missing:
        raise AssertionError(
            f"missing Debian packages {', '.join(missing)}: ./scripts/test installs them "
            f"(apt-get install {' '.join(missing)})"
        )


def _key(repo: Path) -> str:
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION, SUITE, PACKAGES, (repo / "pyproject.toml").read_text()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def rootfs(repo: Path, log: Path) -> Path:
    """The cached root file system for this recipe, built if it is missing."""
    key = _key(repo)
    target = CACHE / f"rootfs-{key}"
    with _locked():
        if (target / ".complete").exists():
            return target
        for stale in CACHE.glob("rootfs-*"):
            shutil.rmtree(stale, ignore_errors=True)
        building = CACHE / f"building-{key}"
        shutil.rmtree(building, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "src"
            src.mkdir()
            for name in ("pyproject.toml", "README.md"):
                shutil.copy(repo / name, src / name)
            shutil.copytree(repo / "notifier", src / "notifier")
            pip = (
                'chroot "$1" env -i PATH=/usr/bin:/bin PIP_CERT=/tmp/host-ca.crt '
                "PIP_DISABLE_PIP_VERSION_CHECK=1 /opt/notifier/bin/pip install -q -e /src"
            )
            command = [
                "mmdebstrap",
                "--variant=apt",
                f"--include={PACKAGES}",
                '--customize-hook=mkdir -p "$1/src"',
                f"--customize-hook=copy-in {src}/pyproject.toml {src}/README.md "
                f"{src}/notifier /src",
                f'--customize-hook=cp {HOST_CA} "$1/tmp/host-ca.crt"',
                '--customize-hook=chroot "$1" python3 -m venv /opt/notifier',
                f"--customize-hook={pip}",
                '--customize-hook=rm -f "$1/tmp/host-ca.crt"',
                SUITE,
                str(building),
            ]
            with log.open("ab") as out:
                done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            raise AssertionError(
                f"mmdebstrap failed ({done.returncode}); its output is in {log}:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        (building / ".complete").touch()
        building.rename(target)
    return target


class Container:
    """A booted container: ``run`` a command in it, ``systemctl``, ``journal``, ``write``."""

    def __init__(self, root: Path, repo: Path, log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    "--volatile=overlay",
                    f"--bind-ro={repo}:/src",
                    "--directory",
                    str(root),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            self.pid1 = self._find_pid1()
            self._wait_for_boot()
        except BaseException:
            self.close()  # a container that did not boot must not outlive the test
            raise

    def _wait_for_boot(self, timeout: float = 120.0) -> None:
        # systemctl fails until PID 1 listens on its private socket.
        deadline = time.monotonic() + timeout
        while True:
            state = self.run("systemctl", "is-system-running", "--wait", check=False)
            if state.stdout.strip() in ("running", "degraded"):
                return
            if time.monotonic() > deadline or self.nspawn.poll() is not None:
                raise AssertionError(
                    f"the container did not boot: {state.stdout}{state.stderr}\n{self.console()}"
                )
            time.sleep(0.2)

    def _find_pid1(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited:\n{self.console()}")
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
            time.sleep(0.1)
        raise AssertionError(f"no systemd in the container after {timeout:g}s:\n{self.console()}")

    def console(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def run(
        self, *command: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["nsenter", "--target", str(self.pid1), "--all", *command],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check, timeout=120)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "--property=" + ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run("install", "-D", "-m", mode, "/dev/stdin", path, input=text)

    def close(self) -> None:
        if self.nspawn.poll() is None:
            # systemd-nspawn asks the container's systemd to shut down.
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
