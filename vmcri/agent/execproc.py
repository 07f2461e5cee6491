"""Exec in a container with the container's identity: the host sends the OCI process
object (built by its spec builder, never read back from the share); the agent writes it
to a guest-private file and runs `crun exec --process FILE`, which joins the container's
namespaces and cgroup and applies the container's seccomp filter from crun's own state.
"""
from __future__ import annotations

import json
import os
import signal

from . import protocol
from .handlers_container import ContainerEntry
from .handlers_system import AgentCallError


def exec_argv(agent, ce: dict):
    """(argv of crun exec, its end callback) for a validated container_exec."""
    entry = agent.procs.get(ce["id"])
    if not isinstance(entry, ContainerEntry):
        raise AgentCallError("NotFound", f"container_exec.id: no container {ce['id']!r}")
    if entry.status is not None or not entry.started:
        raise AgentCallError("FailedPrecondition",
                             f"container_exec.id: container {ce['id']!r} is not running")
    os.makedirs(protocol.EXEC_DIR, mode=0o700, exist_ok=True)
    process_file = os.path.join(protocol.EXEC_DIR, f"{ce['token']}.json")
    pid_file = protocol.exec_pid_file(ce["token"])
    try:
        fd = os.open(process_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise AgentCallError("AlreadyExists", "container_exec.token: already in use") from None
    with os.fdopen(fd, "w") as f:
        json.dump(ce["process"], f)
    argv = ["crun", "exec", "--process", process_file, "--pid-file", pid_file, entry.id]
    return argv, lambda status: _ended(status, process_file, pid_file)


def _ended(status: int, process_file: str, pid_file: str) -> None:
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
    for path in (process_file, pid_file):
        try:
            os.unlink(path)
        except OSError:
            pass
