"""The streaming server's backend over real pods: exec and attach become SSH
channels to the guest agent (exec with the container's process identity, as ExecSync), port-forward a direct-tcpip channel dialled inside
the guest (the pod IP lives in the VM, not in a host netns)."""
from __future__ import annotations

from vmcri.container.container_exec import exec_request
from vmcri.errors import FailedPrecondition, Unavailable


class RuntimeStreamingBackend:
    def __init__(self, containers, sandboxes):
        self.containers = containers
        self.sandboxes = sandboxes

    def _running(self, container_id: str):
        rec = self.containers.get(container_id)
        if rec.state != "RUNNING":
            raise FailedPrecondition(f"container {rec.id[:12]} is not running ({rec.state})")
        return rec

    def check_container(self, container_id: str) -> None:
        self._running(container_id)

    def check_sandbox(self, sandbox_id: str) -> None:
        sb = self.sandboxes.refresh(self.sandboxes.get(sandbox_id))
        if sb.state != "READY":
            raise FailedPrecondition(f"pod sandbox {sb.id[:12]} is not ready")

    def exec(self, container_id: str, cmd: list[str], tty: bool, stdin: bool):
        from vmcri.channel import AgentError
        rec = self._running(container_id)
        try:
            return self.containers.agent_for(rec).open_process(
                None, tty=tty, stdin=stdin,
                container_exec=exec_request(self.containers, rec, cmd, tty))
        except AgentError as e:
            raise Unavailable(f"exec in {rec.id[:12]}: {e}") from e

    def attach(self, container_id: str, stdin: bool, tty: bool):
        from vmcri.channel import AgentError
        rec = self._running(container_id)
        try:
            return self.containers.agent_for(rec).attach(rec.id, stdin=stdin, live=True)
        except AgentError as e:
            raise Unavailable(f"attach to {rec.id[:12]}: {e}") from e

    def port_forward(self, sandbox_id: str, port: int):
        from vmcri.channel import AgentError
        sb = self.sandboxes.get(sandbox_id)
        try:
            return self.sandboxes.agent(sb).open_port_forward(port)
        except AgentError as e:
            raise Unavailable(f"port-forward to {sb.id[:12]}:{port}: {e}") from e
