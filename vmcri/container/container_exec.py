"""ExecSync: `crun exec` in the guest over one SSH channel; output capped like the kubelet's."""
from __future__ import annotations

import secrets

from cri_api.v1 import api_pb2

from vmcri.container import ocispec
from vmcri.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable, VmcriError

MAX_EXEC_OUTPUT = 16 * 1024 * 1024  # the kubelet's own cap on ExecSync output
DEFAULT_TIMEOUT_S = 3600
KILL_TIMEOUT_S = 10


def crun_exec_argv(container_id: str, cmd: list[str], tty: bool = False, cwd: str = "",
                   pid_file: str = "") -> list[str]:
    return ["crun", "exec", *(["-t"] if tty else []), *(["--cwd", cwd] if cwd else []),
            *(["--pid-file", pid_file] if pid_file else []), container_id, *cmd]


# Killing `crun exec` on a timeout would orphan the exec'd process inside the container's
# PID namespace, so ExecSync records its pid and removes the pid file when it ends.
_TRACKED = 'f=$1; shift; "$@"; rc=$?; rm -f "$f"; exit $rc'
_KILL_TRACKED = 'kill -KILL "$(cat "$1")" 2>/dev/null; rm -f "$1"'


def container_cwd(svc, rec) -> str:
    """Where the container's process starts, from host-side state (the bundle is in the
    guest-writable share): crun exec starts in "/" otherwise, while containerd's exec (and
    so kubectl exec) starts where the container does."""
    config = api_pb2.ContainerConfig.FromString(rec.config)
    if config.working_dir:
        return config.working_dir
    try:
        image = svc.images.resolve(rec.image_id)
        return ocispec.image_working_dir(image.raw_config.get("config") or {})
    except VmcriError:
        return ""


def exec_sync(svc, container_id: str, cmd: list[str], timeout: int):
    if not cmd:
        raise InvalidArgument("cmd: must not be empty")
    if timeout < 0:
        raise InvalidArgument(f"timeout: {timeout} must not be negative")
    rec = svc.get(container_id)
    if rec.state != "RUNNING":
        raise FailedPrecondition(f"container {rec.id[:12]} is not running ({rec.state})")
    from vmcri.channel import AgentError, AgentTimeout
    agent = svc.agent_for(rec)
    pid_file = f"/run/vmcri/exec-{secrets.token_hex(8)}.pid"
    argv = ["/bin/sh", "-c", _TRACKED, "sh", pid_file,
            *crun_exec_argv(rec.id, list(cmd), cwd=container_cwd(svc, rec), pid_file=pid_file)]
    try:
        return agent.run(argv, timeout=timeout or DEFAULT_TIMEOUT_S, max_output=MAX_EXEC_OUTPUT)
    except AgentTimeout as e:
        # short: against a wedged guest this wait comes on top of the caller's timeout
        try:
            agent.run(["/bin/sh", "-c", _KILL_TRACKED, "sh", pid_file], timeout=KILL_TIMEOUT_S)
            outcome = "the process was killed"
        except AgentError as kill_error:
            outcome = f"killing the process failed: {kill_error}"
        raise DeadlineExceeded(f"ExecSync {cmd[0]!r} in {rec.id[:12]}: timed out after {timeout}s; "
                               f"{outcome}") from e
    except AgentError as e:
        raise Unavailable(f"ExecSync in {rec.id[:12]}: {e}") from e
