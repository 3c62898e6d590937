"""systemd's service notification protocol (``sd_notify``), in a few lines.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, an ``AF_UNIX``
datagram socket (a path, or an abstract name written with a leading ``@``),
and reads newline-separated ``KEY=value`` assignments from it: ``READY=1``,
``STOPPING=1``, ``STATUS=…`` and ``WATCHDOG=1``. With ``WatchdogSec=`` it also
passes ``$WATCHDOG_USEC`` and restarts the service if no ping arrives in time.

Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing, so the daemon
needs no mode switch. A failed send is logged once and never stops the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends state changes to systemd, if it is listening.

    >>> SystemdNotifier(environ={}).notify(READY="1")  # no socket: a no-op
    False
    >>> SystemdNotifier(environ={"WATCHDOG_USEC": "30000000"}).watchdog_interval
    15.0
    """

    def __init__(self, *, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket name is given with "@" and has a NUL byte instead.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._warned = False
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID")
        if usec.isdigit() and int(usec) > 0 and (pid is None or pid == str(os.getpid())):
            # Ping at half the deadline, as sd_watchdog_enabled(3) advises.
            self.watchdog_interval = int(usec) / 1_000_000 / 2

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines; ``True`` if systemd got them."""
        if not self._address:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(payload, self._address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at $NOTIFY_SOCKET: %s", e)
            return False
        return True
