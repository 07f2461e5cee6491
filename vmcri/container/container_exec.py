"""ExecSync: `crun exec` in the guest over one SSH channel; output capped like the kubelet's."""
from __future__ import annotations

import json
import os

from vmcri.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable

MAX_EXEC_OUTPUT = 16 * 1024 * 1024  # the kubelet's own cap on ExecSync output
DEFAULT_TIMEOUT_S = 3600
MAX_SPEC_BYTES = 4 << 20


def crun_exec_argv(container_id: str, cmd: list[str], tty: bool = False, cwd: str = "") -> list[str]:
    return ["crun", "exec", *(["-t"] if tty else []), *(["--cwd", cwd] if cwd else []),
            container_id, *cmd]


def container_cwd(svc, rec) -> str:
    """The container's working dir from its bundle: crun exec starts in "/" otherwise, while
    containerd's exec (and so kubectl exec) starts where the container does."""
    try:
        with open(os.path.join(svc.dirs(rec).bundle, "config.json"), "rb") as f:
            cwd = json.loads(f.read(MAX_SPEC_BYTES)).get("process", {}).get("cwd", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return cwd if isinstance(cwd, str) and cwd.startswith("/") else ""


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
    try:
        return agent.run(crun_exec_argv(rec.id, list(cmd), cwd=container_cwd(svc, rec)), timeout=timeout or DEFAULT_TIMEOUT_S,
                         max_output=MAX_EXEC_OUTPUT)
    except AgentTimeout as e:
        raise DeadlineExceeded(f"ExecSync {cmd[0]!r} in {rec.id[:12]}: timed out after {timeout}s") from e
    except AgentError as e:
        raise Unavailable(f"ExecSync in {rec.id[:12]}: {e}") from e
