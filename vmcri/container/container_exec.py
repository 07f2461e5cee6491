"""ExecSync: `crun exec` in the guest over one SSH channel; output capped like the kubelet's.

The exec'd process is the container's process (user, groups, capabilities,
no_new_privs, env, cwd) with the exec's args, as containerd makes it: the host derives it
(exec_identity.py) and the agent starts it in the container's namespaces itself, or with
`crun exec --process` (config `exec_runner`)."""
from __future__ import annotations

import secrets

from vmcri.agent import protocol
from vmcri.container import ocispec_process
from vmcri.container.exec_identity import container_process
from vmcri.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable

MAX_EXEC_OUTPUT = 16 * 1024 * 1024  # the kubelet's own cap on ExecSync output
DEFAULT_TIMEOUT_S = 3600
KILL_TIMEOUT_S = 10

# On a timeout the host kills the exec (for crun exec, the agent then kills the exec'd
# process, which would be orphaned in the container) and waits for its pid file
# (protocol.exec_pid_file) to go, which the agent removes once the process is dead.
_AWAIT_KILL = 'i=0; while [ -e "$1" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; [ ! -e "$1" ]'


def exec_request(svc, rec, cmd: list[str], tty: bool) -> dict:
    """The container_exec object of the agent protocol for `cmd` in container `rec`."""
    process = ocispec_process.exec_process(container_process(svc, rec), cmd, tty)
    request = {"id": rec.id, "token": secrets.token_hex(8), "process": process}
    if svc.cfg.exec_runner != "native":
        request["runner"] = svc.cfg.exec_runner
    return request


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
    request = exec_request(svc, rec, list(cmd), tty=False)
    try:
        return agent.run(None, timeout=timeout or DEFAULT_TIMEOUT_S, max_output=MAX_EXEC_OUTPUT,
                         container_exec=request)
    except AgentTimeout as e:
        # short: against a wedged guest this wait comes on top of the caller's timeout
        try:
            rc, _, _ = agent.run(["/bin/sh", "-c", _AWAIT_KILL, "sh",
                                  protocol.exec_pid_file(request["token"])], timeout=KILL_TIMEOUT_S)
            outcome = "the process was killed" if rc == 0 else "the process may still run"
        except AgentError as kill_error:
            outcome = f"killing the process failed: {kill_error}"
        raise DeadlineExceeded(f"ExecSync {cmd[0]!r} in {rec.id[:12]}: timed out after {timeout}s; "
                               f"{outcome}") from e
    except AgentError as e:
        if e.kind in ("NotFound", "FailedPrecondition"):
            raise FailedPrecondition(f"ExecSync in {rec.id[:12]}: {e}") from e
        raise Unavailable(f"ExecSync in {rec.id[:12]}: {e}") from e
