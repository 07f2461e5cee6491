"""What the streaming server needs from the runtime. The integrator implements it over
the real sandboxes/containers; tests use a local-subprocess fake."""
from __future__ import annotations

from typing import Protocol

from vmcri.channel import ProcessStream


class SocketLike(Protocol):
    def send(self, data: bytes) -> int: ...
    def recv(self, n: int) -> bytes: ...
    def shutdown(self, how: int) -> None: ...
    def close(self) -> None: ...


class StreamingBackend(Protocol):
    def check_container(self, container_id: str) -> None:
        """Raise vmcri.errors.NotFound / FailedPrecondition if it cannot be exec'd/attached."""

    def check_sandbox(self, sandbox_id: str) -> None:
        """Raise vmcri.errors.NotFound / FailedPrecondition if it cannot be port-forwarded."""

    def exec(self, container_id: str, cmd: list[str], tty: bool, stdin: bool) -> ProcessStream:
        """Start `cmd` in the container. Called on a streaming thread; may block."""

    def attach(self, container_id: str, stdin: bool, tty: bool) -> ProcessStream:
        """Attach to the container's main process."""

    def port_forward(self, sandbox_id: str, port: int) -> SocketLike:
        """A connection to 127.0.0.1:port inside the sandbox (paramiko direct-tcpip Channel)."""
