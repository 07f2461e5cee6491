"""StartContainer and the log pump: the container's stdout/stderr come back over
the agent connection (an SSH channel per container) and are written as CRI log
lines by the host. When the channel ends with an exit status, the row becomes
EXITED; if the connection drops, the pump re-attaches and the agent replays
from its output ring.

Exactly once, across reconnects and daemon restarts: the agent's ring keeps absolute
byte offsets per stream, and the pump names the offsets it has written when it attaches.
The pump persists them (`log-offsets.json` in the container's private state dir) right
after each log write, counting only bytes that reached the file (an unfinished line
still in the writer is replayed), together with the log file's inode and size then. A
daemon killed between a log write and the offsets write left entries the offsets do not
cover: the next pump cuts the file back to the recorded size before the replay writes
them again. Output older than the ring (1 MiB per container) when the host comes back is
lost and logged as dropped.
"""
from __future__ import annotations

import json
import logging
import os
import select
import threading
import time

from vmcri.container.logwriter import CriLogWriter
from vmcri.container.model import CREATED, EXITED, RUNNING
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
    # The pump's attach goes out first and runs beside crun start: until a pump has
    # attached, the agent holds the container's output back (outstream.FIRST_ATTACH_WAIT_S),
    # so no early byte is lost, and the two round trips overlap instead of adding up.
    pump = ensure_pump(svc, rec, wait=False)
    try:
        agent.call("container_start", id=rec.id)
        pump.wait_attached(svc.cfg.agent_timeout_s)
    except AgentError as e:
        pump.stop()
        from vmcri.container.container_stop import mark_exited
        mark_exited(svc, rec, exit_code=128, reason="StartError", message=str(e))
        raise Unavailable(f"crun start in the pod VM failed: {e}") from e
    started_ns = now_ns()
    if not svc.table.update_if(rec.id, CREATED, state=RUNNING, started_ns=started_ns):
        # the pump saw it exit before this reply came: it stays EXITED, but it did start
        done = svc.table.get(rec.id)
        if done is not None and done.state == EXITED and not done.started_ns:
            svc.table.update(rec.id, started_ns=min(started_ns, done.finished_ns or started_ns))
    if svc.metrics is not None:
        svc.metrics.observe_container_start(time.monotonic() - started)
    svc.emit(rec.id, "STARTED")


def ensure_pump(svc, rec, wait: bool = True) -> "LogPump":
    """`wait`: until the first attach is answered (StartContainer must not miss output).
    Daemon start does not wait: one silent guest must not hold up serving everyone."""
    with svc.pumps_lock:
        pump = svc.pumps.get(rec.id)
        if pump is None or not pump.alive():
            pump = LogPump(svc, rec)
            svc.pumps[rec.id] = pump
            pump.start(wait)
        return pump


OFFSETS_FILE = "log-offsets.json"
STREAMS = ("stdout", "stderr")


class LogOffsets:
    """Per-stream bytes of a container's output that are in its log file, kept on disk."""

    def __init__(self, path: str):
        self.path = path
        self.received = dict.fromkeys(STREAMS, 0)  # handed to the writer, this daemon's life
        self.saved, self.saved_file = self._load()
        self.received.update(self.saved)

    def _load(self) -> tuple[dict, tuple[int, int] | None]:
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read(4096))
            offsets = {s: int(data[s]) for s in STREAMS if int(data.get(s, 0)) >= 0}
            file = data.get("log_file")
            return offsets, (int(file[0]), int(file[1])) if file else None
        except (OSError, ValueError, TypeError, AttributeError, IndexError):
            return dict.fromkeys(STREAMS, 0), None

    def trim_log(self, log_path: str) -> int:
        """Cut entries written after the last commit (the replay writes them again);
        returns the bytes cut. A rotated or replaced file is left alone."""
        if self.saved_file is None:
            return 0
        inode, size = self.saved_file
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return 0
        try:
            st = os.fstat(fd)
            if st.st_ino != inode or st.st_size <= size:
                return 0
            os.ftruncate(fd, size)
            return st.st_size - size
        finally:
            os.close(fd)

    def resume_at(self, start: dict | None) -> None:
        """The agent said where its replay starts (later than asked if it dropped some)."""
        if start:
            for s in STREAMS:
                if start.get(s, 0) != self.received[s]:
                    self.received[s] = int(start.get(s, 0))

    def commit(self, written: dict, log_file: tuple[int, int] | None = None) -> None:
        if written == self.saved and log_file == self.saved_file:
            return
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({**written, "log_file": log_file}, f)
            os.replace(tmp, self.path)
            self.saved, self.saved_file = dict(written), log_file
        except OSError as e:  # container removed under us, or a full disk: logs still flow
            log.debug("log offsets %s: %s", self.path, e)


INVALID_EXIT_CODE = 255  # what a container whose agent sent a bad exit status is given


class LogPump:
    RETRY_S = 0.5
    MAX_RETRY_S = 10.0

    def __init__(self, svc, rec):
        self.svc = svc
        self.rec = rec
        self.offsets = LogOffsets(os.path.join(svc.dirs(rec).private, OFFSETS_FILE))
        # a host sandbox's conmon writes the log itself: the pump only waits for the exit
        sb = svc.sandboxes.find(rec.sandbox_id)
        own_log = bool(rec.log_path) and not (
            sb is not None and getattr(svc.sandboxes.agent(sb), "writes_logs", False))
        if own_log:
            cut = self.offsets.trim_log(rec.log_path)
            if cut:
                log.info("log pump %s: cut %d bytes written after the last offsets commit; "
                         "they are replayed", rec.id[:12], cut)
        self.writer = CriLogWriter(rec.log_path) if own_log else None
        self._stop = threading.Event()
        self._attached = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"log-{rec.id[:12]}", daemon=True)
        self._stream = None

    def start(self, wait: bool = True) -> None:
        self._thread.start()
        if wait:
            self._attached.wait(self.svc.cfg.agent_timeout_s)

    def wait_attached(self, timeout: float) -> bool:
        return self._attached.wait(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def reopen(self) -> None:
        if self.writer is not None:
            self.writer.reopen()

    def stop(self) -> None:
        self._stop.set()
        self._close_stream()

    def _close_stream(self) -> None:
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:
                pass

    def _write(self, stream: str, data: bytes) -> None:
        if not data:
            return
        off = self.offsets
        off.received[stream] += len(data)
        if self.writer is not None:
            self.writer.write(stream, data)
            off.commit({s: off.received[s] - self.writer.pending_bytes(s) for s in STREAMS},
                       self.writer.position())
        else:
            off.commit(dict(off.received))

    def _loop(self) -> None:
        status, message = None, ""
        failures = 0
        while not self._stop.is_set():
            sb = self.svc.sandboxes.find(self.rec.sandbox_id)
            if sb is None or sb.state != "READY":
                break
            try:
                status, message = self._attach_and_drain(sb)
                failures = 0
            except Exception as e:  # noqa: BLE001 - the pump must outlive any one attach
                failures += 1
                self._log_failure(e, failures)
                self._attached.set()
                self._close_stream()
            if status is not None:
                break
            # connection lost or attach failed: re-attach, backing off while it keeps failing
            delay = self.RETRY_S * 2 ** max(min(failures, 8) - 1, 0)
            self._stop.wait(min(delay, self.MAX_RETRY_S))
        if self.writer is not None:
            self.writer.flush_partial()  # an unfinished line goes out as a P entry: count it as written
            self.offsets.commit(dict(self.offsets.received), self.writer.position())
            self.writer.close()
        if status is not None:
            from vmcri.container.container_stop import mark_exited
            reason = "OOMKilled" if status != 0 and not message and self._oom_killed() else ""
            mark_exited(self.svc, self.svc.table.get(self.rec.id) or self.rec, exit_code=status,
                        reason=reason, message=message)

    def _attach_and_drain(self, sb) -> tuple[int | None, str]:
        """One attach: (exit code, message) once the container exited, (None, "") when the
        connection dropped. AgentError when the attach itself failed."""
        from vmcri.channel import AgentProtocolError
        agent = self.svc.sandboxes.agent(sb)
        self._stream = agent.attach(self.rec.id, offsets=dict(self.offsets.received))
        if self._stream.dropped:
            log.warning("log pump %s: the guest no longer held %d bytes of output",
                        self.rec.id[:12], self._stream.dropped)
        self.offsets.resume_at(self._stream.offsets)
        self._attached.set()
        try:
            return self._drain(self._stream), ""
        except AgentProtocolError as e:
            # the stream ended with an exit status the guest made up: the container is over
            # for us, and says why instead of staying RUNNING
            log.warning("log pump %s: %s; the container is taken as failed", self.rec.id[:12], e)
            return INVALID_EXIT_CODE, f"the pod's agent reported an invalid exit status: {e}"

    def _log_failure(self, e: Exception, failures: int) -> None:
        from vmcri.channel import AgentError, AgentProtocolError
        if isinstance(e, AgentProtocolError):  # the guest broke the protocol: worth a warning
            log.warning("log pump %s: attach failed (%d in a row): %s", self.rec.id[:12],
                        failures, e)
        elif isinstance(e, AgentError):
            log.debug("log pump %s: attach failed: %s", self.rec.id[:12], e)
        else:
            log.exception("log pump %s: unexpected error (%d in a row)", self.rec.id[:12],
                          failures)

    def _oom_killed(self) -> bool:
        """Ask the guest whether the kernel's OOM killer ended the container (its cgroup's
        memory.events); any failure to ask means "not known to be an OOM kill"."""
        from vmcri.channel import AgentError
        sb = self.svc.sandboxes.find(self.rec.sandbox_id)
        if sb is None or sb.state != "READY":
            return False
        try:
            state = self.svc.sandboxes.agent(sb).call("container_state", id=self.rec.id, timeout=10)
        except AgentError:
            return False
        return state.get("oom_killed") is True

    def _drain(self, stream) -> int | None:
        """Copy output until the process exits (its status) or the connection drops (None).
        AgentProtocolError for an exit status outside 0..255."""
        from vmcri.channel import checked_exit_status
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
                return checked_exit_status(chan)
            transport = chan.transport
            if chan.closed or transport is None or not transport.is_active():
                return None
            # the channel's pipe fd wakes us for stdout, stderr and close alike
            select.select([chan], [], [], 1.0)
        return None
