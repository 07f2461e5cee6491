"""StartContainer and the log pump: the container's stdout/stderr come back over
the agent connection (an SSH channel per container) and are written as CRI log
lines by the host. When the channel ends with an exit status, the row becomes
EXITED; if the connection drops, the pump re-attaches and the agent replays
what it buffered meanwhile."""
from __future__ import annotations

import logging
import select
import threading
import time

from vmcri.container.logwriter import CriLogWriter
from vmcri.container.model import CREATED, RUNNING
from vmcri.errors import FailedPrecondition, Unavailable
from vmcri.sandbox.model import now_ns

log = logging.getLogger(__name__)


def start_container(svc, container_id: str) -> None:
    rec = svc.get(container_id)
    if rec.state != CREATED:
        raise FailedPrecondition(f"container {rec.id[:12]} is {rec.state}, not CREATED")
    agent = svc.agent_for(rec)
    from vmcri.channel import AgentError
    started = time.monotonic()
    # attach first, so not a byte of early output is missed
    pump = ensure_pump(svc, rec)
    try:
        agent.call("container_start", id=rec.id)
    except AgentError as e:
        pump.stop()
        from vmcri.container.container_stop import mark_exited
        mark_exited(svc, rec, exit_code=128, reason="StartError", message=str(e))
        raise Unavailable(f"crun start in the pod VM failed: {e}") from e
    svc.table.update(rec.id, state=RUNNING, started_ns=now_ns())
    if svc.metrics is not None:
        svc.metrics.observe_container_start(time.monotonic() - started)
    svc.emit(rec.id, "STARTED")


def ensure_pump(svc, rec) -> "LogPump":
    with svc.pumps_lock:
        pump = svc.pumps.get(rec.id)
        if pump is None or not pump.alive():
            pump = LogPump(svc, rec)
            svc.pumps[rec.id] = pump
            pump.start()
        return pump


class LogPump:
    RETRY_S = 0.5

    def __init__(self, svc, rec):
        self.svc = svc
        self.rec = rec
        self.writer = CriLogWriter(rec.log_path) if rec.log_path else None
        self._stop = threading.Event()
        self._attached = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"log-{rec.id[:12]}", daemon=True)
        self._stream = None

    def start(self) -> None:
        self._thread.start()
        self._attached.wait(self.svc.cfg.agent_timeout_s)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def reopen(self) -> None:
        if self.writer is not None:
            self.writer.reopen()

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:
                pass

    def _write(self, stream: str, data: bytes) -> None:
        if self.writer is not None and data:
            self.writer.write(stream, data)

    def _loop(self) -> None:
        from vmcri.channel import AgentError
        status = None
        while not self._stop.is_set():
            sb = self.svc.sandboxes.find(self.rec.sandbox_id)
            if sb is None or sb.state != "READY":
                break
            try:
                agent = self.svc.sandboxes.agent(sb)
                self._stream = agent.attach(self.rec.id)
            except AgentError as e:
                log.debug("log pump %s: attach failed: %s", self.rec.id[:12], e)
                self._attached.set()
                self._stop.wait(self.RETRY_S)
                continue
            self._attached.set()
            status = self._drain(self._stream)
            if status is not None:
                break
            self._stop.wait(self.RETRY_S)  # connection lost: re-attach
        if self.writer is not None:
            self.writer.close()
        if status is not None:
            from vmcri.container.container_stop import mark_exited
            mark_exited(self.svc, self.svc.table.get(self.rec.id) or self.rec, exit_code=status)

    def _drain(self, stream) -> int | None:
        """Copy output until the process exits (its status) or the connection drops (None)."""
        chan = stream.channel
        first, stream._leftover = stream._leftover, b""
        self._write("stdout", first)
        while not self._stop.is_set():
            if chan.recv_stderr_ready():
                self._write("stderr", chan.recv_stderr(65536))
                continue
            if chan.recv_ready():
                self._write("stdout", chan.recv(65536))
                continue
            if chan.exit_status_ready():
                st = chan.exit_status
                return None if st == -1 else st
            transport = chan.transport
            if chan.closed or transport is None or not transport.is_active():
                return None
            # the channel's pipe fd wakes us for stdout, stderr and close alike
            select.select([chan], [], [], 1.0)
        return None
