"""ExecSync: `crun exec` in the guest over one SSH channel; output capped like the kubelet's."""
from __future__ import annotations

from vmcri.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable

MAX_EXEC_OUTPUT = 16 * 1024 * 1024  # the kubelet's own cap on ExecSync output
DEFAULT_TIMEOUT_S = 3600


def crun_exec_argv(container_id: str, cmd: list[str], tty: bool = False) -> list[str]:
    return ["crun", "exec", *(["-t"] if tty else []), container_id, *cmd]


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
        return agent.run(crun_exec_argv(rec.id, list(cmd)), timeout=timeout or DEFAULT_TIMEOUT_S,
                         max_output=MAX_EXEC_OUTPUT)
    except AgentTimeout as e:
        raise DeadlineExceeded(f"ExecSync {cmd[0]!r} in {rec.id[:12]}: timed out after {timeout}s") from e
    except AgentError as e:
        raise Unavailable(f"ExecSync in {rec.id[:12]}: {e}") from e
