"""StopContainer, RemoveContainer, and what a sandbox's stop/remove/death does to
its containers. Idempotent throughout: gone things are skipped."""
from __future__ import annotations

import logging
import time

from vmcri.container import rootfs
from vmcri.container.model import CREATED, CREATING, EXITED, RUNNING
from vmcri.errors import NotFound
from vmcri.sandbox.model import now_ns

log = logging.getLogger(__name__)
KILL_RESERVE_S = 3.0  # for SIGKILL, its confirmation and the reply before the caller's deadline


def _stop_signal(rec) -> str:
    return (rec.stop_signal or "SIGTERM").removeprefix("SIG")


def mark_exited(svc, rec, exit_code: int, reason: str = "", message: str = "") -> None:
    fresh = svc.table.get(rec.id)
    if fresh is None or fresh.state == EXITED:
        return
    if not reason:
        reason = "Completed" if exit_code == 0 else "Error"
    svc.table.update(rec.id, state=EXITED, exit_code=exit_code, finished_ns=now_ns(),
                     reason=reason, message=message,
                     started_ns=fresh.started_ns or 0)
    svc.emit(rec.id, "STOPPED")


def _wait_exited(svc, container_id: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = svc.table.get(container_id)
        if rec is None or rec.state == EXITED:
            return True
        time.sleep(0.05)
    return False


def call_deadline(context) -> float | None:
    """The gRPC caller's deadline as a time.monotonic() value, None when it set none."""
    try:
        left = context.time_remaining()
    except Exception:
        return None
    return None if left is None else time.monotonic() + left


def _within(wanted: float, deadline: float | None, reserve: float) -> float:
    """`wanted` seconds, cut so that `reserve` seconds are left before the deadline."""
    if deadline is None:
        return wanted
    return max(0.0, min(wanted, deadline - time.monotonic() - reserve))


def stop_container(svc, container_id: str, timeout: int, deadline: float | None = None) -> None:
    """Stop signal, `timeout` s of grace, SIGKILL; the grace shrinks so SIGKILL comes in
    time to answer before the caller's `deadline` (a monotonic time) rather than be
    cancelled."""
    try:
        rec = svc.get(container_id)
    except NotFound:
        return  # already gone: stopping it again is success
    if rec.state in (EXITED, CREATING):
        return
    sb = svc.sandboxes.find(rec.sandbox_id)
    if sb is None or sb.state != "READY":
        mark_exited(svc, rec, exit_code=137, reason="VMGone", message="the pod VM is not running")
        return
    from vmcri.channel import AgentError
    agent = svc.sandboxes.agent(sb)
    if rec.state == CREATED:
        # never started: nothing to signal; it is simply not going to run
        mark_exited(svc, rec, exit_code=0, reason="Stopped", message="stopped before start")
        return
    try:
        if timeout > 0:
            agent.call("container_kill", id=rec.id, signal=_stop_signal(rec))
            if _wait_exited(svc, rec.id, _within(timeout, deadline, KILL_RESERVE_S)):
                return
        agent.call("container_kill", id=rec.id, signal="KILL")
    except AgentError as e:
        log.info("kill %s: %s", rec.id[:12], e)
    if not _wait_exited(svc, rec.id, _within(10, deadline, 0.5)):
        state = _guest_state(agent, rec.id)
        if state.get("status") == "stopped" or not state:
            mark_exited(svc, rec, exit_code=state.get("exit_code", 137))


def _guest_state(agent, container_id: str) -> dict:
    from vmcri.channel import AgentError
    try:
        return agent.call("container_state", id=container_id)
    except AgentError:
        return {}


def remove_container(svc, container_id: str) -> None:
    try:
        rec = svc.get(container_id)
    except NotFound:
        return
    if rec.state == RUNNING:
        stop_container(svc, rec.id, 0)
    _release(svc, rec, guest=True)
    svc.emit(rec.id, "DELETED")
    svc.table.delete(rec.id)


def _release(svc, rec, guest: bool) -> None:
    with svc.pumps_lock:
        pump = svc.pumps.pop(rec.id, None)
    if pump is not None:
        pump.stop()
    if guest:
        sb = svc.sandboxes.find(rec.sandbox_id)
        if sb is not None and sb.state == "READY":
            from vmcri.channel import AgentError
            try:
                svc.sandboxes.agent(sb).call("container_delete", id=rec.id)
            except AgentError as e:
                log.info("guest delete of %s: %s", rec.id[:12], e)
    rootfs.release(svc.dirs(rec))


def stop_for_sandbox(svc, sandbox) -> None:
    for rec in svc.table.for_sandbox(sandbox.id):
        if rec.state in (RUNNING, CREATED):
            try:
                stop_container(svc, rec.id, 0 if sandbox.state != "READY" else 2)
            except Exception:
                log.exception("stopping %s", rec.id[:12])
            mark_exited(svc, rec, exit_code=137, reason="PodStopped", message="the pod was stopped")
        with svc.pumps_lock:
            pump = svc.pumps.pop(rec.id, None)
        if pump is not None:
            pump.stop()


def remove_for_sandbox(svc, sandbox) -> None:
    for rec in svc.table.for_sandbox(sandbox.id):
        _release(svc, rec, guest=False)  # the VM is already gone
        svc.emit(rec.id, "DELETED")
        svc.table.delete(rec.id)
