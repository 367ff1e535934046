"""The exposure and feedback logs of the serving endpoint: bounded buffers flushed as JSONL shards.

The gateway calls `record` on the request path: an append under a lock, never I/O, never an
exception. A background task calls `flush` off the event loop (`asyncio.to_thread`) every
`flush_s`: it swaps the buffer out and writes one shard, `<uri>/<kind>/part-<writer>-<seq>.jsonl`
(local or s3://, through `digr.platform.storage`), so replicas never write the same file. When
the sink is slow or down the buffer fills to `capacity` and further rows are dropped and
counted (`dropped`, exported as a metric), never silently; rows of a failed write go back into
the buffer as far as it has room (the rest are counted as dropped too).

Exposure row: {"request_id", "user_id", "variant", "model_version", "codebook_version",
"items": [item_id, best first], "fallback", "time"}; feedback row: {"request_id", "item",
"event", "time", "received"}. `jobs/abtest.py` reads both folders.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

from digr.platform import storage

FEEDBACK_EVENTS = ("click", "purchase", "dismiss")


class EventSink:
    def __init__(self, uri: str, kind: str, capacity: int = 10_000,
                 write: Callable[[str, str], None] = storage.write_text) -> None:
        if capacity < 1:
            raise ValueError(f"serve.events_buffer must be >= 1, got {capacity}")
        self.folder = storage.join(uri, kind)
        self.capacity = capacity
        self.write = write
        self.writer = uuid.uuid4().hex[:12]  # this replica's shard names
        self.seq = 0
        self.buffer: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.flush_lock = threading.Lock()  # one flush at a time (the timer and a shutdown flush)
        self.recorded = self.written = self.dropped = self.failed_writes = 0

    def record(self, row: dict[str, Any]) -> bool:
        """Queue one row; False (and counted in `dropped`) when the buffer is full."""
        with self.lock:
            if len(self.buffer) >= self.capacity:
                self.dropped += 1
                return False
            self.buffer.append(row)
            self.recorded += 1
            return True

    def flush(self) -> int:
        """Write what is buffered as one shard; returns the rows written (0 on a failed write)."""
        with self.flush_lock:
            with self.lock:
                rows, self.buffer = self.buffer, []
            if not rows:
                return 0
            path = storage.join(self.folder, f"part-{self.writer}-{self.seq:06d}.jsonl")
            try:
                self.write(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))
            except Exception:  # noqa: BLE001 - the sink's trouble must never reach a request
                with self.lock:
                    room = self.capacity - len(self.buffer)
                    self.buffer[:0] = rows[:room]  # oldest first, ahead of what came in meanwhile
                    self.dropped += max(0, len(rows) - room)
                    self.failed_writes += 1
                return 0
            self.seq += 1
            self.written += len(rows)
            return len(rows)

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {"recorded": self.recorded, "written": self.written, "dropped": self.dropped,
                    "buffered": len(self.buffer), "failed_writes": self.failed_writes}


def parse_feedback(body: Any) -> dict[str, Any]:
    """A POST /feedback body -> the row to log; ValueError names the bad field."""
    if not isinstance(body, dict):
        raise ValueError("body: expected a JSON object")
    for name in ("request_id", "item"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise ValueError(f"{name}: required, a non-empty string")
    if body.get("event") not in FEEDBACK_EVENTS:
        raise ValueError(f"event: must be one of {', '.join(FEEDBACK_EVENTS)}, got {body.get('event')!r}")
    t = body.get("time")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
        raise ValueError(f"time: a number (seconds since the epoch) if given, got {t!r}")
    unknown = set(body) - {"request_id", "item", "event", "time"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown field")
    return {"request_id": body["request_id"], "item": body["item"], "event": body["event"],
            "time": None if t is None else float(t)}
