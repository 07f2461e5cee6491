"""A container's output history: a bounded ring with absolute byte offsets per stream.

Sending does not consume the ring. A reader (the host's log pump) says how far it has
written each stream (`{"stdout": N, "stderr": M}`) and gets everything after that, in the
order the container produced it. So output in flight when the host connection drops is
neither lost (it is still in the ring) nor re-sent (the host's offsets skip it). What the
ring no longer holds (the oldest bytes beyond `limit`) is reported as dropped.
"""
from __future__ import annotations

import collections

STREAM_NAMES = {1: "stdout", 2: "stderr"}
MERGE_BYTES = 4096  # small writes are merged so the ring stays a short list


class OutputRing:
    """Not thread-safe: the caller holds its own lock."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: collections.deque[list] = collections.deque()  # [stream, start, bytes]
        self.size = 0
        self.end = {1: 0, 2: 0}     # bytes produced so far, per stream
        self.first = {1: 0, 2: 0}   # oldest offset still held, per stream

    def put(self, stream: int, data: bytes) -> None:
        last = self.items[-1] if self.items else None
        if last is not None and last[0] == stream and len(last[2]) + len(data) <= MERGE_BYTES:
            last[2] += data
        else:
            self.items.append([stream, self.end[stream], data])
        self.end[stream] += len(data)
        self.size += len(data)
        while self.size > self.limit and len(self.items) > 1:
            s, start, old = self.items.popleft()
            self.size -= len(old)
            self.first[s] = start + len(old)

    def resume_point(self, offsets: dict | None) -> tuple[dict[int, int], int]:
        """Where a reader asking for `offsets` starts, and how many bytes it missed."""
        start, dropped = {}, 0
        for s, name in STREAM_NAMES.items():
            want = (offsets or {}).get(name, 0)
            want = min(max(want, 0), self.end[s])  # a reader cannot be ahead of the output
            if want < self.first[s]:
                dropped += self.first[s] - want
                want = self.first[s]
            start[s] = want
        return start, dropped

    def pending(self, cursor: dict[int, int]) -> bool:
        return any(self.end[s] > cursor[s] for s in cursor)

    def take(self, cursor: dict[int, int]) -> list[tuple[int, bytes]]:
        """Output after `cursor` (advanced in place), oldest first. Walks from the newest
        item back only as far as the streams that have something new need."""
        need = {s for s in cursor if self.end[s] > cursor[s]}
        out = []
        for s, start, data in reversed(self.items):
            if not need:
                break
            if s not in need:
                continue
            if start + len(data) <= cursor[s]:
                need.discard(s)
                continue
            skip = max(0, cursor[s] - start)
            out.append((s, bytes(data[skip:])))
            if start <= cursor[s]:
                need.discard(s)
        out.reverse()
        cursor.update(self.end)
        return out


class RingReader:
    """One log pump's view of a ring: the queue interface the sender loop uses."""

    def __init__(self, ring: OutputRing, cursor: dict[int, int]):
        self.ring = ring
        self.cursor = dict(cursor)

    @property
    def items(self) -> bool:
        return self.ring.pending(self.cursor)

    def take(self) -> list[tuple[int, bytes]]:
        return self.ring.take(self.cursor)
