"""The naive worker from the design's history, for comparison only.

For every message it sends one email, PUTs the doc, then GETs and PUTs the
checkpoint; it keeps 5 messages in flight. That is about three CouchDB
requests per email, and it is what notifier is measured against. It is not a
reference for correctness: its checkpoint can pass unfinished work.

Choices, each the naive one:

* a new SMTP connection (connect, EHLO, MAIL, RCPT, DATA, QUIT) for every
  email, through ``aiosmtplib.send`` (``--reuse-smtp`` keeps one connection
  per slot instead);
* the checkpoint is the seq of the message that finished last; a 409 on it
  (two messages finishing at once) is ignored, since the next message writes
  it again;
* it follows the same filtered continuous feed as notifier (selector in the
  query string and in the body, docs included).

On SIGTERM it stops reading, finishes what is in flight and prints one JSON
line with its counters (``sent``, ``couch_requests``, ``checkpoint_writes``,
``checkpoint_conflicts``) on stdout.

    python benchmarks/naive_worker.py --couch URL --database DB \
        --checkpoint-database CP --smtp-port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosmtplib
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SELECTOR, SENDER, compose


class NaiveWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.http = httpx.AsyncClient(
            base_url=args.couch,
            trust_env=False,
            timeout=httpx.Timeout(30.0),
            headers={"Accept": "application/json"},
        )
        self.slots = asyncio.Semaphore(args.parallel)
        self.tasks: set[asyncio.Task[None]] = set()
        self.smtp_free: list[aiosmtplib.SMTP] = []
        self.checkpoint_path = f"/{quote(args.checkpoint_database, safe='')}/checkpoint"
        self.sent = 0
        self.requests = 0
        self.checkpoint_writes = 0
        self.checkpoint_conflicts = 0

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self.requests += 1
        return await self.http.request(method, path, **kwargs)

    async def follow(self) -> None:
        db = quote(self.args.database, safe="")
        # Create the checkpoint database (412 if it exists).
        await self.request("PUT", f"/{quote(self.args.checkpoint_database, safe='')}")
        checkpoint = await self.request("GET", self.checkpoint_path)
        since = checkpoint.json()["since"] if checkpoint.status_code == 200 else 0
        params = {
            "feed": "continuous",
            "include_docs": "true",
            "heartbeat": "10000",
            "since": json.dumps(since) if not isinstance(since, str) else since,
            "filter": "_selector",
            "selector": json.dumps(SELECTOR),
        }
        self.requests += 1
        print("ready", file=sys.stderr, flush=True)
        async with self.http.stream(
            "POST",
            f"/{db}/_changes",
            params=params,
            json={"selector": SELECTOR},
            headers={"Accept-Encoding": "identity"},
            timeout=httpx.Timeout(30.0, read=None),
        ) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                row = json.loads(line)
                doc = row.get("doc")
                if doc is None or row.get("deleted"):
                    continue
                await self.slots.acquire()
                task = asyncio.create_task(self.process(doc, row["seq"]))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def process(self, doc: dict[str, Any], seq: Any) -> None:
        try:
            await self.send(doc)
            self.sent += 1
            doc["notifiedRecipient"] = True
            db = quote(self.args.database, safe="")
            put = await self.request("PUT", f"/{db}/{quote(doc['_id'], safe='')}", json=doc)
            put.raise_for_status()
            await self.save_checkpoint(seq)
        finally:
            self.slots.release()

    async def send(self, doc: dict[str, Any]) -> None:
        mail = compose(doc)
        if not self.args.reuse_smtp:
            await aiosmtplib.send(
                mail, hostname=self.args.smtp_host, port=self.args.smtp_port, sender=SENDER
            )
            return
        client = self.smtp_free.pop() if self.smtp_free else None
        if client is None or not client.is_connected:
            client = aiosmtplib.SMTP(hostname=self.args.smtp_host, port=self.args.smtp_port)
            await client.connect()
        await client.send_message(mail, sender=SENDER)
        self.smtp_free.append(client)

    async def save_checkpoint(self, seq: Any) -> None:
        current = await self.request("GET", self.checkpoint_path)
        body: dict[str, Any] = {"since": seq}
        if current.status_code == 200:
            body["_rev"] = current.json()["_rev"]
        put = await self.request("PUT", self.checkpoint_path, json=body)
        if put.status_code == 409:
            self.checkpoint_conflicts += 1
            return
        put.raise_for_status()
        self.checkpoint_writes += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        follower = asyncio.create_task(self.follow())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([follower, stopper], return_when=asyncio.FIRST_COMPLETED)
        follower.cancel()
        stopper.cancel()
        await asyncio.gather(follower, stopper, return_exceptions=True)
        if follower.done() and not follower.cancelled() and follower.exception():
            raise follower.exception()  # type: ignore[misc]
        if self.tasks:
            await asyncio.gather(*self.tasks)
        for client in self.smtp_free:
            await client.quit()
        await self.http.aclose()
        print(
            json.dumps(
                {
                    "sent": self.sent,
                    "couch_requests": self.requests,
                    "checkpoint_writes": self.checkpoint_writes,
                    "checkpoint_conflicts": self.checkpoint_conflicts,
                }
            ),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--couch", required=True, help="CouchDB base URL")
    parser.add_argument("--database", required=True)
    parser.add_argument("--checkpoint-database", required=True)
    parser.add_argument("--smtp-host", default="127.0.0.1")
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--parallel", type=int, default=5)
    parser.add_argument("--reuse-smtp", action="store_true")
    asyncio.run(NaiveWorker(parser.parse_args()).run())


if __name__ == "__main__":
    main()
