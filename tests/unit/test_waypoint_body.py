"""Request bodies (`waypoint.http1.Body`): taken whole without waiting, or read as they come."""

from __future__ import annotations

import asyncio

from waypoint.http1 import Body


def test_a_request_without_a_body_is_complete_at_once() -> None:
    b = Body(0)
    b.finish()
    assert b.complete() == b""
    assert b.buffered == b""


def test_a_body_that_arrived_with_its_head_is_taken_whole_and_stays_replayable() -> None:
    consumed: list[int] = []
    b = Body(10, on_consumed=consumed.append)
    b.feed(b"hello")
    b.feed(b"world")
    b.finish()
    assert b.complete() == b"helloworld"
    assert consumed == [10]  # flow control credited for everything taken
    assert b.complete() == b"helloworld"  # asking again: same bytes, nothing re-credited
    assert consumed == [10]


async def test_after_complete_chunks_and_read_all_give_the_same_bytes() -> None:
    b = Body(6)
    b.feed(b"abc")
    b.feed(b"def")
    b.finish()
    assert b.complete() == b"abcdef"
    assert await b.read_all(1 << 20) == b"abcdef"
    assert [c async for c in b.chunks()] == [b"abcdef"]


def test_a_body_still_arriving_or_broken_is_not_complete() -> None:
    b = Body(None)
    b.feed(b"part")
    assert b.complete() is None  # no end yet: the caller reads on (read_all / chunks)
    broken = Body(10)
    broken.feed(b"12345")
    broken.fail(ConnectionError("client went away"))
    assert broken.complete() is None


async def test_read_all_still_waits_for_a_body_that_ends_later() -> None:
    b = Body(4)
    b.feed(b"ab")
    task = asyncio.create_task(b.read_all(1 << 20))
    await asyncio.sleep(0)
    assert not task.done()
    b.feed(b"cd")
    b.finish()
    assert await task == b"abcd"
    assert b.complete() == b"abcd"


async def test_read_all_over_the_limit_keeps_every_byte_for_chunks() -> None:
    b = Body(None)
    for part in (b"x" * 6, b"y" * 6):
        b.feed(part)
    b.finish()
    assert await b.read_all(8) is None
    assert b"".join([c async for c in b.chunks()]) == b"x" * 6 + b"y" * 6
