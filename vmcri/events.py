"""Container lifecycle events for GetContainerEvents (evented PLEG).

Each subscriber gets its own bounded queue; a subscriber that cannot keep up
is dropped rather than stalling the runtime."""
from __future__ import annotations

import logging
import queue
import threading
import time

log = logging.getLogger(__name__)
QUEUE_SIZE = 1000


class EventBus:
    def __init__(self):
        self._subs: list[queue.Queue] = []
        self._lock = threading.Lock()
        self.build_event = None  # fn(container_id, kind, created_ns) -> message or None

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(QUEUE_SIZE)
        with self._lock:
            self._subs.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._subs:
                self._subs.remove(q)

    def container_event(self, container_id: str, kind: str) -> None:
        with self._lock:
            subs = list(self._subs)
        if not subs or self.build_event is None:
            return
        try:
            msg = self.build_event(container_id, kind, time.time_ns())
        except Exception:
            log.exception("building %s event for %s", kind, container_id[:12])
            return
        if msg is None:
            return
        for q in subs:
            try:
                q.put_nowait(msg)
            except queue.Full:
                log.warning("container event subscriber is not keeping up; dropping it")
                self.unsubscribe(q)
                q.put(None)  # wake its reader so it ends the stream
