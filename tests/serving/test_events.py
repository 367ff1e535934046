"""The exposure / feedback sinks: bounded, never blocking a request, drops counted, shards readable."""

from __future__ import annotations

import json
import threading

import pytest

from digr.serving.events import EventSink, parse_feedback


def test_rows_are_flushed_as_one_shard_each_and_counted(tmp_path) -> None:
    sink = EventSink(str(tmp_path), "exposures", capacity=10)
    for k in range(3):
        assert sink.record({"request_id": f"r{k}"})
    assert sink.flush() == 3 and sink.flush() == 0  # nothing new: no empty shard
    sink.record({"request_id": "r3"})
    sink.flush()
    shards = sorted((tmp_path / "exposures").glob("part-*.jsonl"))
    assert len(shards) == 2
    rows = [json.loads(line) for p in shards for line in p.read_text().splitlines()]
    assert [r["request_id"] for r in rows] == ["r0", "r1", "r2", "r3"]
    assert sink.counts() == {"recorded": 4, "written": 4, "dropped": 0, "buffered": 0, "failed_writes": 0}


def test_a_full_buffer_drops_and_counts_instead_of_growing(tmp_path) -> None:
    sink = EventSink(str(tmp_path), "exposures", capacity=2)
    assert [sink.record({"n": k}) for k in range(5)] == [True, True, False, False, False]
    assert sink.counts()["dropped"] == 3 and sink.counts()["buffered"] == 2


def test_a_failed_write_keeps_the_rows_for_the_next_flush_as_far_as_there_is_room(tmp_path) -> None:
    calls = []

    def flaky(path: str, text: str) -> None:
        calls.append(text)
        if len(calls) == 1:
            raise OSError("sink down")
        (tmp_path / "ok.jsonl").write_text(text)

    sink = EventSink(str(tmp_path), "feedback", capacity=3, write=flaky)
    sink.record({"n": 0})
    sink.record({"n": 1})
    assert sink.flush() == 0  # the write failed: both rows back in the buffer
    sink.record({"n": 2})
    sink.record({"n": 3})  # the buffer holds 3: this one is dropped
    assert sink.flush() == 3
    assert [json.loads(x)["n"] for x in (tmp_path / "ok.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert sink.counts()["dropped"] == 1 and sink.counts()["failed_writes"] == 1


def test_record_does_not_wait_for_a_slow_write(tmp_path) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(path: str, text: str) -> None:
        started.set()
        release.wait(10)

    sink = EventSink(str(tmp_path), "exposures", capacity=100, write=slow)
    sink.record({"n": 0})
    t = threading.Thread(target=sink.flush)
    t.start()
    assert started.wait(10)
    # The write is stuck; the request path still records at once.
    assert all(sink.record({"n": k}) for k in range(1, 50))
    release.set()
    t.join(10)
    assert sink.counts()["buffered"] == 49


@pytest.mark.parametrize("body, field", [
    ([], "body"),
    ({"item": "x", "event": "click"}, "request_id"),
    ({"request_id": "r", "event": "click"}, "item"),
    ({"request_id": "r", "item": "x", "event": "like"}, "event"),
    ({"request_id": "r", "item": "x", "event": "click", "time": "now"}, "time"),
    ({"request_id": "r", "item": "x", "event": "click", "extra": 1}, "extra"),
])
def test_bad_feedback_names_the_field(body, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        parse_feedback(body)


def test_good_feedback() -> None:
    assert parse_feedback({"request_id": "r", "item": "x", "event": "purchase", "time": 5}) == {
        "request_id": "r", "item": "x", "event": "purchase", "time": 5.0}
