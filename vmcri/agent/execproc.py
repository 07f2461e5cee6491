"""Exec in a container with the container's identity. The host sends the OCI process object
(built by its spec builder, never read back from the share). The agent starts it itself
(nsexec.py): it joins the container's cgroup and namespaces and loads the container's
seccomp filter, compiled once per container. Where that path does not apply (nsexec.plan,
a tty), or the host asks for it (`runner: crun`), the agent writes the process to a guest-private
file and runs `crun exec --process FILE`, which does the same from crun's own state.

Either way the exec'd process's pid is in protocol.exec_pid_file(token) while it runs: on an
ExecSync timeout the host waits for that file to go, which tells it the process is dead.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import dataclass

from . import nsexec, protocol
from .handlers_container import ContainerEntry
from .handlers_system import AgentCallError

_compile_lock = threading.Lock()


@dataclass
class Launch:
    """How to start one exec: `spawner(stdio, tty) -> pid` for the native path (never a
    tty), or `argv` (crun exec) for the process table's own spawn; `on_end(status)` cleans up."""
    argv: list[str]
    spawner: object
    on_end: object


def _running_entry(agent, cid: str) -> ContainerEntry:
    entry = agent.procs.get(cid)
    if not isinstance(entry, ContainerEntry):
        raise AgentCallError("NotFound", f"container_exec.id: no container {cid!r}")
    if entry.status is not None or not entry.started:
        raise AgentCallError("FailedPrecondition",
                             f"container_exec.id: container {cid!r} is not running")
    return entry


def exec_info(entry: ContainerEntry) -> nsexec.ContainerExecInfo:
    """The container's exec info, its seccomp profile compiled at the first call."""
    with _compile_lock:
        if entry.exec_info is None:
            entry.exec_info = nsexec.exec_info(entry.exec_spec or {}, entry.cgroup)
        return entry.exec_info


def prepare(agent, ce: dict) -> Launch:
    """The Launch of a validated container_exec."""
    entry = _running_entry(agent, ce["id"])
    os.makedirs(protocol.EXEC_DIR, mode=0o700, exist_ok=True)
    pid_file = protocol.exec_pid_file(ce["token"])
    plan = None
    # a tty exec goes to crun, which makes the pty inside the container (its own devpts, so
    # `tty` names it); the native path would hand it the agent's, which the container cannot see
    if ce.get("runner", "native") == "native" and not ce["process"].get("terminal"):
        plan = nsexec.plan(ce["process"], exec_info(entry))
    if plan is None:
        return _crun_launch(entry, ce, pid_file)

    def spawner(stdio, tty):
        pid = nsexec.spawn(plan, entry.pid, entry.cgroup, stdio, agent.reaper)
        fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(str(pid))
        return pid
    if os.path.lexists(pid_file):
        raise AgentCallError("AlreadyExists", "container_exec.token: already in use")
    return Launch(plan.argv, spawner, lambda status: _unlink(pid_file))


def _crun_launch(entry: ContainerEntry, ce: dict, pid_file: str) -> Launch:
    process_file = os.path.join(protocol.EXEC_DIR, f"{ce['token']}.json")
    try:
        fd = os.open(process_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise AgentCallError("AlreadyExists", "container_exec.token: already in use") from None
    with os.fdopen(fd, "w") as f:
        json.dump(ce["process"], f)
    argv = ["crun", "exec", "--process", process_file, "--pid-file", pid_file, entry.id]
    return Launch(argv, None, lambda status: _crun_ended(status, process_file, pid_file))


def _unlink(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


def _crun_ended(status: int, process_file: str, pid_file: str) -> None:
    """crun exec is gone. Killed (the host's ExecSync timeout), it leaves the exec'd process
    orphaned in the container: that process is killed too. The pid file goes last, so its
    absence tells the host the kill is done."""
    if os.WIFSIGNALED(status):
        try:
            with open(pid_file) as f:
                pid = int(f.read(32).strip())
            if pid > 1:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
    _unlink(process_file, pid_file)
