"""StopContainer, RemoveContainer, and what a sandbox's stop/remove/death does to
its containers. Idempotent throughout: gone things are skipped."""
from __future__ import annotations

import logging
import time

from vmcri.container import rootfs
from vmcri.container.model import CREATED, CREATING, EXITED, RUNNING
from vmcri.errors import NotFound, Unavailable
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
    cancelled. Returns only when the container is confirmed exited (the guest says so)
    or its VM is confirmed gone; otherwise raises Unavailable, which the kubelet retries."""
    try:
        rec = svc.get(container_id)
    except NotFound:
        return  # already gone: stopping it again is success
    if rec.state in (EXITED, CREATING):
        return
    sb = svc.sandboxes.find(rec.sandbox_id)
    if vm_confirmed_gone(svc, sb):
        mark_exited(svc, rec, exit_code=137, reason="VMGone", message="the pod VM is not running")
        return
    if sb.state != "READY":
        raise Unavailable(f"container {rec.id[:12]}: its pod VM is {sb.state} but still "
                          f"running, so the container cannot be confirmed stopped")
    from vmcri.channel import AgentError
    agent = svc.sandboxes.agent(sb)
    if rec.state == CREATED:
        # never started: its init waits in crun create and never runs the command
        _signal(agent, rec.id, "KILL")
        mark_exited(svc, rec, exit_code=0, reason="Stopped", message="stopped before start")
        return
    kill_error = None
    try:
        if timeout > 0:
            agent.call("container_kill", id=rec.id, signal=_stop_signal(rec))
            if _wait_exited(svc, rec.id, _within(timeout, deadline, KILL_RESERVE_S)):
                return
        agent.call("container_kill", id=rec.id, signal="KILL")
    except AgentError as e:
        kill_error = e
        log.info("kill %s: %s", rec.id[:12], e)
    if _wait_exited(svc, rec.id, _within(10, deadline, 0.5)):
        return
    _confirm_stopped(svc, sb, rec, agent, kill_error)


def vm_confirmed_gone(svc, sb) -> bool:
    """True when the sandbox row or its domain is gone, or the domain is shut off;
    False when it runs; raises Unavailable when libvirt cannot tell. A host sandbox has
    no domain: its HostAgent's engine says whether any of its containers still runs."""
    if sb is None:
        return True
    from vmcri.hostpod import pods as hostpods
    if hostpods.is_host(sb):
        return hostpods.containers_gone(svc.sandboxes, sb)
    import libvirt
    try:
        dom = svc.sandboxes.hv.lookup(sb.domain)
        return dom is None or dom.isActive() != 1
    except libvirt.libvirtError as e:
        raise Unavailable(f"pod VM {sb.domain}: libvirt cannot tell whether it runs: {e}") from e


def _signal(agent, container_id: str, sig: str) -> None:
    from vmcri.channel import AgentError
    try:
        agent.call("container_kill", id=container_id, signal=sig)
    except AgentError as e:
        log.info("kill %s: %s", container_id[:12], e)


def _confirm_stopped(svc, sb, rec, agent, kill_error) -> None:
    """The pump has not seen the exit: ask the guest, and say OK only on its word."""
    from vmcri.channel import AgentError
    try:
        state = agent.call("container_state", id=rec.id)
    except AgentError as e:
        if e.kind == "NotFound":  # the guest has no such container: nothing runs
            mark_exited(svc, rec, exit_code=137, reason="Unknown",
                        message="the pod VM no longer knows the container")
            return
        if vm_confirmed_gone(svc, sb):
            mark_exited(svc, rec, exit_code=137, reason="VMGone", message="the pod VM is gone")
            return
        raise Unavailable(f"container {rec.id[:12]}: cannot confirm it stopped: {e}") from e
    status = state.get("status") if isinstance(state, dict) else None
    code = state.get("exit_code") if isinstance(state, dict) else None
    if status == "stopped":
        ok_code = isinstance(code, int) and not isinstance(code, bool) and 0 <= code <= 255
        mark_exited(svc, rec, exit_code=code if ok_code else 137)
        return
    why = f" (kill failed: {kill_error})" if kill_error else ""
    raise Unavailable(f"container {rec.id[:12]} is still {status!r} in the pod VM after "
                      f"SIGKILL{why}; retry StopContainer")


def remove_container(svc, container_id: str) -> None:
    """Stops it if needed, deletes it in the guest (unless the VM is gone) and then its
    host dirs. Any part that cannot be confirmed raises, and the row stays for a retry."""
    try:
        rec = svc.get(container_id)
    except NotFound:
        return
    if rec.state in (RUNNING, CREATED):
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
        _guest_delete(svc, rec)
    try:
        rootfs.release(svc.dirs(rec))
    except OSError as e:
        raise Unavailable(f"container {rec.id[:12]}: its host dirs could not be released: {e}") from e


def _guest_delete(svc, rec) -> None:
    sb = svc.sandboxes.find(rec.sandbox_id)
    if vm_confirmed_gone(svc, sb):
        return  # the guest's state went with the VM
    from vmcri.channel import AgentError
    try:
        svc.sandboxes.agent(sb).call("container_delete", id=rec.id)
    except AgentError as e:
        if e.kind == "NotFound":
            return
        if vm_confirmed_gone(svc, sb):
            return
        raise Unavailable(f"container {rec.id[:12]}: deleting it in the pod VM failed: {e}") from e


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
        try:
            _release(svc, rec, guest=False)  # the VM is already gone
        except Unavailable:
            log.warning("container %s: dirs kept", rec.id[:12], exc_info=True)
        svc.emit(rec.id, "DELETED")
        svc.table.delete(rec.id)
