"""Launch the real servers the test suite runs against.

PouchDB Server (a CouchDB-compatible HTTP server from npm) is pinned in
tests/servers/package.json. Tests never skip when it is missing: they fail
and say how to install it. A CouchDB named by ``COUCHDB_URL`` is used as it
is (see :mod:`notifier.testing.remote`); tests only create, use and delete
databases of their own on it.

A server root URL here may carry credentials (``http://user:pw@host:port``):
httpx authenticates with them, and :func:`couch_settings` splits them off
for a notifier config, which refuses a URL with a password in it.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import quote

import httpx

from notifier.couch import doc_path as doc_path  # re-exported: tests import it from here
from notifier.testing import free_port
from notifier.testing.remote import ServerURL, http_client, unique_database_name

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVERS_DIR = REPO_ROOT / "tests" / "servers"
POUCHDB_BIN = SERVERS_DIR / "node_modules" / ".bin" / "pouchdb-server"
INSTALL_COMMAND = "npm ci --ignore-scripts --no-audit --no-fund --prefix tests/servers"

_LOOPBACK = "127.0.0.1"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class PouchDBServer:
    """A PouchDB Server process with an in-memory store, on loopback.

    The process runs in a scratch directory of its own, because it writes
    config.json and log.txt into its working directory. Its stdout and stderr
    go to `log_path`, where a crash's stack trace ends up.

    PouchDB Server exits as a whole when it meets a filter it cannot evaluate
    (for example `filter=_selector` without a selector): `ensure_alive()`
    restarts it, on the same port when it can. Data does not survive a
    restart.
    """

    def __init__(
        self,
        binary: Path | str = POUCHDB_BIN,
        *,
        port: int | None = None,
        admin: tuple[str, str] | None = None,
        ready_timeout: float = 30.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.binary = Path(binary)
        self.admin = admin
        self.host = _LOOPBACK
        self.port = port or 0
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._scratch: Path | None = None
        self._log_path: Path | None = None
        self._log_file: IO[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def server(self) -> ServerURL:
        """Where it is, with the admin's credentials when it has one."""
        username, password = self.admin or (None, None)
        return ServerURL(base=self.base_url, username=username, password=password)

    @property
    def url(self) -> str:
        """The root URL, with the admin's credentials in it when the server has one."""
        return self.server.url

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise RuntimeError("PouchDB Server was never started")
        return self._log_path

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("PouchDB Server is already running")
        self._check_installed()
        self._scratch = Path(tempfile.mkdtemp(prefix="pouchdb-server-"))
        self._log_path = self._scratch / "server.log"
        try:
            self._launch(self.port or free_port())
        except BaseException:
            # __exit__ does not run when __enter__ raises; the error message
            # already carries the log tail, so nothing is lost.
            self.stop()
            raise

    def stop(self) -> None:
        self._terminate()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def alive(self) -> bool:
        """Whether the process is still running (it may still be starting)."""
        return self._proc is not None and self._proc.poll() is None

    def ping(self, timeout: float = 5.0) -> bool:
        """Whether the server answers `GET /` now and its process is still up.

        A crash on a bad filter happens just after the server has answered
        the request that caused it. The server handles no other request
        before it exits, so a round trip here is enough to tell whether the
        previous request killed it.
        """
        if not self.alive():
            return False
        try:
            with http_client(self.url, timeout=timeout) as client:
                client.get("/").raise_for_status()
        except httpx.HTTPError:
            return False
        return self.alive()

    def ensure_alive(self) -> bool:
        """Restart the server if it has died. Returns True if it was restarted."""
        if self._scratch is None:
            raise RuntimeError("PouchDB Server was never started")
        if self.ping():
            return False
        self._terminate()
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(f"\n--- restarting PouchDB Server (it was on port {self.port}) ---\n")
        self._launch(self.port)
        self.restarts += 1
        return True

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the server's output, for error messages."""
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        text = self._log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(_ANSI.sub("", text).splitlines()[-lines:])

    # -- internals ---------------------------------------------------------

    def _check_installed(self) -> None:
        if not self.binary.exists():
            raise RuntimeError(
                f"PouchDB Server is not installed ({self.binary} is missing). "
                f"Install it from the repository root with: {INSTALL_COMMAND}"
            )
        if shutil.which("node") is None:
            raise RuntimeError(
                "PouchDB Server needs Node.js, and `node` is not on PATH. "
                f"Install Node.js, then run: {INSTALL_COMMAND}"
            )

    def _launch(self, port: int) -> None:
        assert self._scratch is not None
        # The preferred port may have been taken while the server was down
        # (or, for a fresh free_port(), between choosing and binding it).
        ports = [port, free_port(), free_port()]
        for attempt, candidate in enumerate(ports):
            self.port = candidate
            self._spawn()
            try:
                self._wait_ready()
            except _PortInUseError:
                self._terminate()
                if attempt == len(ports) - 1:
                    raise RuntimeError(
                        f"PouchDB Server found no free port (tried {ports}).\n"
                        f"--- log tail ---\n{self.log_tail()}"
                    ) from None
                continue
            except BaseException:
                self._terminate()
                raise
            if self.admin is not None:
                self._create_admin(*self.admin)
            return

    def _create_admin(self, name: str, password: str) -> None:
        # Ends the "admin party": from here on, PouchDB Server refuses
        # anonymous requests to server-wide endpoints, and to databases whose
        # _security names members (see create_database).
        with http_client(self.base_url, timeout=5.0) as client:
            response = client.put(f"/_config/admins/{quote(name, safe='')}", json=password)
        if response.status_code != 200:
            raise RuntimeError(
                f"PouchDB Server on {self.base_url} refused to create admin {name!r}: "
                f"{response.status_code} {response.text}"
            )

    def _spawn(self) -> None:
        assert self._scratch is not None and self._log_path is not None
        # Stale config.json would carry the uuid the readiness check uses to
        # tell our process from whatever else answers on the port.
        (self._scratch / "config.json").unlink(missing_ok=True)
        self._log_file = self._log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                str(self.binary),
                "--in-memory",
                "--port",
                str(self.port),
                "--host",
                self.host,
                "--no-color",
            ],
            cwd=self._scratch,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Its own session, so a Ctrl-C meant for pytest does not kill the
            # server before the fixtures have reported on it.
            start_new_session=True,
        )

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._scratch is not None
        deadline = time.monotonic() + self.ready_timeout
        with http_client(self.base_url, timeout=1.0) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    if "already in use" in self.log_tail(10):
                        raise _PortInUseError
                    raise RuntimeError(
                        f"PouchDB Server exited with status {code} while starting "
                        f"on port {self.port}.\n--- log tail ---\n{self.log_tail()}"
                    )
                try:
                    response = client.get("/")
                except httpx.TransportError:
                    response = None
                # Something else may be listening on this port already (our
                # process then exits soon): only our own uuid counts.
                if response is not None and self._is_ours(response):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PouchDB Server did not answer on {self.base_url} within "
                        f"{self.ready_timeout:g} s.\n--- log tail ---\n{self.log_tail()}"
                    )
                time.sleep(0.05)

    def _is_ours(self, response: httpx.Response) -> bool:
        assert self._scratch is not None
        if response.status_code != 200:
            return False
        try:
            config = json.loads((self._scratch / "config.json").read_text(encoding="utf-8"))
            ours = config["couchdb"]["uuid"]
            theirs = response.json().get("uuid")
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return bool(ours) and ours == theirs

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class _PortInUseError(Exception):
    pass


# -- database helpers --------------------------------------------------------


#: Every name unique_db_name() gave out, in order: the ``couch`` fixture
#: deletes those of its test's run (the checkpoint databases the code under
#: test created), since nothing else on a shared server can have them.
issued_db_names: list[str] = []


def unique_db_name(hint: str = "test") -> str:
    """A fresh, valid CouchDB database name that mentions ``hint`` (and is remembered)."""
    name = unique_database_name(hint)
    issued_db_names.append(name)
    return name


def create_database(
    url: str, name: str, *, admin_only: bool = False, timeout: float = 10.0
) -> None:
    """Create a database; with ``admin_only``, only admins may use it.

    That is CouchDB 3's default for a new database; PouchDB Server needs it
    said in ``_security``, after which an anonymous request gets 401 there.
    """
    with http_client(url, timeout=timeout) as client:
        response = client.put(f"/{quote(name, safe='')}")
        if response.status_code not in (201, 202):
            raise RuntimeError(
                f"creating database {name!r} failed: {response.status_code} {response.text}"
            )
        if admin_only:
            response = client.put(
                f"/{quote(name, safe='')}/_security",
                json={"admins": {"names": [], "roles": []}, "members": {"roles": ["_admin"]}},
            )
            if response.status_code != 200:
                raise RuntimeError(
                    f"making database {name!r} admin-only failed: "
                    f"{response.status_code} {response.text}"
                )


def delete_database(url: str, name: str, *, timeout: float = 10.0) -> None:
    with http_client(url, timeout=timeout) as client:
        response = client.delete(f"/{quote(name, safe='')}")
    if response.status_code not in (200, 202, 404):
        raise RuntimeError(
            f"deleting database {name!r} failed: {response.status_code} {response.text}"
        )


def couch_settings(url: str) -> dict[str, str]:
    """The ``[couch]`` settings that reach the server at ``url`` (credentials and all).

    A config refuses a URL with a password in it, so the credentials become
    ``username`` and a ``password_file`` (a private file, removed at exit).
    """
    server = ServerURL.parse(url)
    settings = {"url": server.base}
    if server.username is not None and server.password is not None:
        settings["username"] = server.username
        settings["password_file"] = str(_password_file(server.password))
    return settings


_password_files: dict[str, Path] = {}


def _password_file(password: str) -> Path:
    path = _password_files.get(password)
    if path is None:
        fd, name = tempfile.mkstemp(prefix="notifier-test-couch-password-")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(password)
        path = _password_files[password] = Path(name)
        atexit.register(path.unlink, missing_ok=True)
    return path


@contextmanager
def scratch_database(url: str, hint: str) -> Iterator[CouchTestDB]:
    """A fresh database on the server at ``url``, deleted afterwards with every
    database named by :func:`unique_db_name` meanwhile or named after it
    (``ckpt_<name>``): the test's own.

    On a server with credentials the database is admin-only, as CouchDB 3
    makes it by default, so a request that forgets them gets 401.
    """
    issued_before = len(issued_db_names)
    name = unique_db_name(hint)
    create_database(url, name, admin_only=ServerURL.parse(url).username is not None)
    db = CouchTestDB(url, name)
    try:
        yield db
    finally:
        db.close()
        # Names the test derived from its database's (a random suffix makes
        # them its own), and the ones it asked unique_db_name for.
        doomed = set(issued_db_names[issued_before:])
        with http_client(url, timeout=10.0) as client:
            listing = client.get("/_all_dbs")
        if listing.status_code == 200:
            doomed.update(n for n in listing.json() if name in n)
        for doomed_name in sorted(doomed):
            delete_database(url, doomed_name)


def is_pouchdb_server(url: str, *, timeout: float = 10.0) -> bool:
    """Whether the server at ``url`` is PouchDB Server (by its welcome), not CouchDB."""
    with http_client(url, timeout=timeout) as client:
        welcome = client.get("/").json()
    return "express-pouchdb" in welcome


class CouchTestDB:
    """One database on a test server, with blocking convenience methods.

    The methods block: from a coroutine that shares its event loop with the
    code under test, prefer an async client.
    """

    def __init__(self, url: str, name: str, *, timeout: float = 10.0) -> None:
        self.url = url
        self.name = name
        self.client = http_client(url, timeout=timeout)

    @property
    def db_url(self) -> str:
        return f"{self.url}/{quote(self.name, safe='')}"

    def close(self) -> None:
        self.client.close()

    def put(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Create or update a doc (PUT with its `_id`, else POST). Returns {ok, id, rev}."""
        if "_id" in doc:
            response = self.client.put(doc_path(self.name, str(doc["_id"])), json=doc)
        else:
            response = self.client.post(f"/{quote(self.name, safe='')}", json=doc)
        return _json(response)

    def get(self, doc_id: str) -> dict[str, Any]:
        return _json(self.client.get(doc_path(self.name, doc_id)))

    def delete(self, doc_id: str, rev: str) -> dict[str, Any]:
        return _json(self.client.delete(doc_path(self.name, doc_id), params={"rev": rev}))

    def all_docs(self) -> list[dict[str, Any]]:
        """Every live doc, design docs excluded, in `_id` order."""
        body = _json(
            self.client.get(
                f"/{quote(self.name, safe='')}/_all_docs", params={"include_docs": "true"}
            )
        )
        return [row["doc"] for row in body["rows"] if not row["id"].startswith("_design/")]

    def bulk(self, docs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST to _bulk_docs. Returns one result per doc (which may be an error row)."""
        response = self.client.post(
            f"/{quote(self.name, safe='')}/_bulk_docs", json={"docs": list(docs)}
        )
        if response.is_error:
            raise CouchError(response)
        rows: list[dict[str, Any]] = response.json()
        return rows


class CouchError(RuntimeError):
    """An error answer from the server; `status` and `body` say which (409: conflict)."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        try:
            self.body: Any = response.json()
        except ValueError:
            self.body = response.text
        super().__init__(
            f"{response.request.method} {response.request.url} -> {self.status} {response.text}"
        )


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.is_error:
        raise CouchError(response)
    body: dict[str, Any] = response.json()
    return body
