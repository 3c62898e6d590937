"""notifier's fake CouchDB on a loopback socket, in a process of its own.

Used by the benchmark for the 100,000-message backlog: seeding that many
documents into PouchDB Server through HTTP takes longer than following
them, while here they are written in process. Its own process keeps its CPU
time out of the driver's and notifier's. Steered over stdin/stdout, one
command a line, one JSON answer a line:

``seed DB COUNT``
    create DB and write COUNT message documents into it.
``settled DB``
    how many documents of DB are marked ``notifiedRecipient`` or
    ``notificationFailed``.
``drop DB``
    delete DB.
``quit``
    stop.

    python benchmarks/fake_couch_server.py   # prints {"url": ...}, then reads commands
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import message

from notifier.testing.fake_couch import FakeCouch
from notifier.testing.server import FakeCouchServer


def main() -> None:
    fake = FakeCouch()
    with FakeCouchServer(fake) as server:
        print(json.dumps({"url": server.url}), flush=True)
        for line in sys.stdin:
            command, *args = line.split()
            answer: dict[str, Any]
            if command == "seed":
                db, count = args[0], int(args[1])
                fake.create_database(db)
                for n in range(count):
                    fake.put(db, message(n))
                answer = {"seeded": count}
            elif command == "settled":
                docs = fake.docs(args[0])
                answer = {
                    "settled": sum(
                        1 for d in docs if "notifiedRecipient" in d or "notificationFailed" in d
                    ),
                    "docs": len(docs),
                }
            elif command == "drop":
                fake.delete_database(args[0])
                answer = {"dropped": args[0]}
            elif command == "quit":
                break
            else:
                answer = {"error": f"unknown command {command!r}"}
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
