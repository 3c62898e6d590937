"""The processes a benchmark run drives, and what the kernel says about them.

Every server and every worker under test runs in a process of its own, so
that the CPU time and memory read from ``/proc`` belong to one program:

* :class:`Sink` and :class:`FakeCouchProcess` are helpers steered over a
  pipe, one command a line and one JSON answer a line;
* :class:`Daemon` is a worker under test (``notifier run`` or the naive
  worker), with its log in a file, its CPU time from ``/proc/<pid>/stat``
  while it runs and from ``wait4`` when it exits, and its peak RSS from
  ``/proc/<pid>/status``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

BENCHMARKS = Path(__file__).resolve().parent
_TICKS = os.sysconf("SC_CLK_TCK")


class LineProcess:
    """A helper process that answers one JSON line per command line."""

    def __init__(self, script: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCHMARKS / script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.hello = self._read()

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.proc.args[-1]} exited (status {self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.ask("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)


class Sink(LineProcess):
    """benchmarks/smtp_sink.py: aiosmtpd, accepting and counting."""

    def __init__(self) -> None:
        super().__init__("smtp_sink.py")
        self.host: str = self.hello["host"]
        self.port: int = self.hello["port"]

    def reset(self) -> None:
        self.ask("reset")

    def wait(self, count: int, timeout: float) -> dict[str, Any]:
        return self.ask(f"wait {count} {timeout}")

    def accepted(self) -> list[tuple[str, float]]:
        return [(rcpt, t) for rcpt, t in self.ask("times")["accepted"]]


class FakeCouchProcess(LineProcess):
    """benchmarks/fake_couch_server.py: notifier's fake CouchDB on a socket."""

    def __init__(self) -> None:
        super().__init__("fake_couch_server.py")
        self.url: str = self.hello["url"]

    def seed(self, database: str, count: int) -> None:
        self.ask(f"seed {database} {count}")

    def settled(self, database: str) -> int:
        settled: int = self.ask(f"settled {database}")["settled"]
        return settled

    def drop(self, database: str) -> None:
        self.ask(f"drop {database}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a running process (10 ms resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses; the fields after it do not.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def memory_mb(pid: int) -> dict[str, float]:
    """``VmHWM`` (peak resident set) and ``VmRSS`` of a running process, in MiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            found[key] = int(value.split()[0]) / 1024
    return {"peak_rss_mb": found["VmHWM"], "rss_mb": found["VmRSS"]}


@dataclass
class Exit:
    status: int
    cpu_seconds: float
    log: str
    stdout: str


class Daemon:
    """A worker under test, started now, logging to ``log_path``."""

    def __init__(self, argv: list[str], log_path: Path, *, ready: str) -> None:
        self.argv = argv
        self.log_path = log_path
        self.out_path = log_path.with_suffix(".out")
        self._ready = re.compile(ready)
        self._log: IO[bytes] = log_path.open("wb")
        self._out: IO[bytes] = self.out_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=self._log)
        self.pid = self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait for the ready line in the log; return the monotonic time it was seen."""
        deadline = time.monotonic() + timeout
        while not self._ready.search(self.log_text()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited early:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.argv[0]} not ready in {timeout:g} s:\n{self.tail()}")
            time.sleep(0.01)
        return time.monotonic()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, float]:
        return memory_mb(self.pid)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> Exit:
        """SIGTERM, then reap it with ``wait4`` for its own final CPU time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        cpu = float("nan")
        while self.proc.returncode is None:
            try:
                pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by an earlier poll()
                break
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                cpu = usage.ru_utime + usage.ru_stime
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                deadline += 10
            time.sleep(0.01)
        self._log.close()
        self._out.close()
        return Exit(
            status=self.proc.returncode if self.proc.returncode is not None else -1,
            cpu_seconds=cpu,
            log=self.log_text(),
            stdout=self.out_path.read_text(errors="replace"),
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self._out.close()


_FINAL = {
    "sent": re.compile(r"stopped: sent (\d+)"),
    # Absent from the line before claims existed.
    "claims_lost": re.compile(r"claims lost (\d+)"),
    "claim_waits": re.compile(r"waited for (\d+)"),
    "takeovers": re.compile(r"taken over (\d+)"),
    "couch_requests": re.compile(r"couch_requests=(\d+)"),
    "checkpoint_writes": re.compile(r"checkpoint_writes=(\d+)"),
    "checkpoint": re.compile(r"checkpoint=(\S+)\s*$", re.MULTILINE),
}


def notifier_counters(log: str) -> dict[str, Any]:
    """The counters of notifier's final ``worker … stopped: …`` log line."""
    lines = [line for line in log.splitlines() if "stopped: sent" in line]
    if not lines:
        raise RuntimeError(f"no final 'stopped' line in notifier's log:\n{log[-3000:]}")
    found: dict[str, Any] = {}
    for key, pattern in _FINAL.items():
        match = pattern.search(lines[-1])
        if match:
            value = match.group(1)
            found[key] = int(value) if value.isdigit() and key != "checkpoint" else value
    return found


def naive_counters(stdout: str) -> dict[str, Any]:
    """The JSON line the naive worker prints when it stops."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"the naive worker printed no counters:\n{stdout[-3000:]}")
    counters: dict[str, Any] = json.loads(lines[-1])
    return counters
