"""Where notifier's CPU time goes at load: a py-spy profile of one benchmark run.

Runs notifier (max_parallel 50) over N messages on PouchDB Server and the
benchmark's SMTP sink, exactly as benchmarks/bench.py does, with py-spy
attached once the worker is ready. Only samples that hold the GIL are kept,
so the shares are shares of CPU time, not of waiting. Prints CPU time by
package and the heaviest functions, self and inclusive; keeps the raw
collapsed stacks (for flamegraph tools) where --raw says.

py-spy is not a dependency of the project: ``.venv/bin/pip install py-spy``.

    .venv/bin/python benchmarks/profile_notifier.py [--messages 5000]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import Bench
from procs import Daemon

_FILE = re.compile(r"\((.*)\)$")


def attach_py_spy(raw: Path, rate: int) -> Callable[[Daemon], Callable[[], None]]:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is missing: .venv/bin/pip install py-spy")

    def attach(daemon: Daemon) -> Callable[[], None]:
        argv = [spy, "record", "--pid", str(daemon.pid), "--rate", str(rate), "--gil"]
        argv += ["--nolineno", "--format", "raw", "--output", str(raw)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy needs a moment to attach
        if proc.poll() is not None:
            assert proc.stderr is not None
            raise SystemExit(f"py-spy failed: {proc.stderr.read().decode()}")

        def detach() -> None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)

        return detach

    return attach


def summarise(raw: Path, top: int) -> str:
    self_pkg: collections.Counter[str] = collections.Counter()
    self_fn: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        self_fn[frames[-1]] += n
        match = _FILE.search(frames[-1])
        where = match.group(1) if match else "?"
        self_pkg[where.split("/")[0] if "/" in where else where] += n
        for frame in set(frames):
            if "notifier/" in frame or "aiosmtplib/" in frame or "marker" in frame:
                inclusive[frame] += n
    if not total:
        return "no samples"

    def block(title: str, counter: collections.Counter[str]) -> list[str]:
        return [title, *(f"  {c / total:6.1%}  {k}" for k, c in counter.most_common(top))]

    lines = [f"{total} samples holding the GIL"]
    lines += block("CPU by package (self time):", self_pkg)
    lines += block("heaviest functions (self time):", self_fn)
    lines += block("notifier and aiosmtplib functions (inclusive):", inclusive)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--max-parallel", type=int, default=50)
    parser.add_argument("--rate", type=int, default=200, help="samples a second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="notifier-profile-") as tmp:
        raw = args.raw or Path(tmp) / "stacks.txt"
        with Bench(argparse.Namespace(messages=args.messages), Path(tmp)) as bench:
            run = bench.worker_run(
                "notifier", args.max_parallel, attach=attach_py_spy(raw, args.rate)
            )
        print(
            f"notifier, max_parallel {args.max_parallel}, {args.messages} messages: "
            f"{run['emails_per_second']:.0f} emails/s, "
            f"{run['cpu_seconds_per_1000']:.2f} CPU s per 1,000 emails (with py-spy attached)"
        )
        print(summarise(raw, args.top))


if __name__ == "__main__":
    main()
