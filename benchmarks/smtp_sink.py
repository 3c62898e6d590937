"""An SMTP sink in a process of its own, for the benchmark.

The benchmark measures notifier's CPU time per email. An aiosmtpd server in
the same process as the driver, or as notifier, would mix its CPU time into
those figures, so the sink runs here, alone, and is steered over stdin/stdout
with one command a line and one JSON answer a line:

``reset``
    forget what was received.
``wait N TIMEOUT``
    answer once N messages were accepted (or TIMEOUT seconds passed).
``stats``
    answer at once.
``times``
    the acceptance time of every message, by recipient.
``quota R``
    from now on answer DATA with Amazon SES's "454 Throttling failure" when
    R messages were already accepted in the last second (0: no quota).
``quit``
    stop.

Answers carry ``count`` (messages accepted), ``throttled`` (454s sent),
``connections`` (sessions
opened), ``first_connection``, ``first`` and ``last`` (``time.monotonic()``
of the first connection, the first acceptance and the acceptance of the Nth
message). CLOCK_MONOTONIC is one clock for every process on the machine, so
the driver can compare these times with its own.

It accepts everything, never parses the content and keeps only a recipient
and a time per message.

    python benchmarks/smtp_sink.py   # prints {"host": ..., "port": ...}, then reads commands
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"
# Given to aiosmtpd so that it does not call socket.getfqdn(), which can
# stall for seconds on a host without DNS.
SERVER_NAME = "bench-sink.localhost"


class _State:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.accepted: list[tuple[str, float]] = []
        self.connections = 0
        self.first_connection: float | None = None
        self.quota = 0.0
        self.throttled = 0

    def summary(self, n: int | None = None) -> dict[str, Any]:
        with self.lock:
            count = len(self.accepted)
            nth = min(count, n) if n else count
            return {
                "count": count,
                "throttled": self.throttled,
                "connections": self.connections,
                "first_connection": self.first_connection,
                "first": self.accepted[0][1] if count else None,
                "last": self.accepted[nth - 1][1] if nth else None,
            }


class _Handler:
    def __init__(self, state: _State) -> None:
        self.state = state

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.monotonic()
        rcpt = envelope.rcpt_tos[0] if envelope.rcpt_tos else ""
        with self.state.lock:
            if self.state.quota and _in_last_second(self.state.accepted, now) >= self.state.quota:
                self.state.throttled += 1
                return "454 Throttling failure: Maximum sending rate exceeded."
            self.state.accepted.append((rcpt, now))
            self.state.lock.notify_all()
        return "250 OK"


def _in_last_second(accepted: list[tuple[str, float]], now: float) -> int:
    """How many acceptances fall in (now - 1 s, now]; the list is in time order."""
    count = 0
    for _, at in reversed(accepted):
        if at <= now - 1.0:
            break
        count += 1
    return count


class _CountingSMTP(SMTP):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        state: _State = self.event_handler.state
        with state.lock:
            state.connections += 1
            if state.first_connection is None:
                state.first_connection = time.monotonic()
        super().connection_made(transport)


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _CountingSMTP(self.handler, **self.SMTP_kwargs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> None:
    state = _State()
    controller = _Controller(
        _Handler(state), hostname=HOST, port=_free_port(), server_hostname=SERVER_NAME
    )
    controller.start()
    print(json.dumps({"host": HOST, "port": controller.port}), flush=True)
    try:
        for line in sys.stdin:
            command, *args = line.split()
            if command == "reset":
                with state.lock:
                    state.accepted.clear()
                    state.connections = 0
                    state.first_connection = None
                    state.throttled = 0
                answer = state.summary()
            elif command == "wait":
                wanted, timeout = int(args[0]), float(args[1])
                with state.lock:
                    state.lock.wait_for(
                        lambda wanted=wanted: len(state.accepted) >= wanted, timeout=timeout
                    )
                answer = state.summary(wanted)
            elif command == "stats":
                answer = state.summary()
            elif command == "times":
                with state.lock:
                    answer = {"accepted": list(state.accepted)}
            elif command == "quota":
                with state.lock:
                    state.quota = float(args[0])
                answer = state.summary()
            elif command == "quit":
                break
            else:
                answer = {"error": f"unknown command {command!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
