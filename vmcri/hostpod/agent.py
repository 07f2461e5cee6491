"""HostAgent: a host sandbox's side of the container interface the container RPCs use.

The container RPCs (vmcri/container/container_*.py) reach a pod's containers through
`svc.agent_for(rec)`: the operations of vmcri/agent/protocol.py that name a container
(container_start/kill/state/delete/stats/update, run and open_process with a
container_exec, attach, open_port_forward). A VM pod answers them with its guest agent
(vmcri.channel.AgentClient); a host pod with this class, over HostEngine (crun + conmon
on the host). The RPC code is the same for both.

Differences a caller can see:
- `attach` for the log pump (offsets given) streams no output: conmon writes the log
  itself (see conmon.py); the stream only ends with the container's exit status, which
  is what the pump turns into EXITED.
- `run`/`open_process` only run container execs: there is no guest to run a command in,
  and nothing else may run on the host on a pod's behalf.
"""
from __future__ import annotations

import threading

from vmcri.channel import AgentError, AgentTimeout, ProcessStream
from vmcri.errors import DeadlineExceeded, VmcriError
from vmcri.hostpod import cgroups, sandbox, stream

_KINDS = {"NotFound": "NotFound", "FailedPrecondition": "FailedPrecondition",
          "InvalidArgument": "InvalidArgument"}


class _Transport:
    """What the log pump asks of a channel's SSH transport."""

    @staticmethod
    def is_active() -> bool:
        return True


class ExitChannel(stream._Buffered):
    """No data; EOF and the exit status once the container has ended."""
    transport = _Transport()

    def __init__(self, engine, container_id: str):
        super().__init__()
        self._engine = engine
        self._id = container_id
        threading.Thread(target=self._wait, daemon=True, name=f"hostexit-{container_id[:12]}").start()

    def _wait(self):
        final = self._engine.wait(self._id) or {}
        code = final.get("exit_code")
        self._finish(code if isinstance(code, int) and code >= 0 else -1)

    def close(self):
        with self._lock:
            self.closed = True
            self._update_locked()


def _agent_error(e: VmcriError) -> AgentError:
    return AgentError(str(e), _KINDS.get(type(e).__name__, "Failed"))


class HostAgent:
    host_key_fingerprint = None
    writes_logs = True  # conmon writes each container's CRI log; the log pump only waits

    def __init__(self, engine, sandbox_id: str, pod_cgroup: str):
        self.engine = engine
        self.sandbox_id = sandbox_id
        self.pod_cgroup = pod_cgroup

    # -- the agent connection's own surface ------------------------------------------
    def connected(self) -> bool:
        return True

    def close(self) -> None:
        pass

    # -- control calls -----------------------------------------------------------------
    def call(self, method: str, timeout: float | None = None, **params) -> dict:
        handler = getattr(self, "_" + method, None)
        if handler is None or not method.startswith(("container_", "sandbox_")):
            # worded as the guest agent's, so callers with a fallback call fall back
            raise AgentError(f"unknown method {method!r} (a host sandbox)", "Unimplemented")
        try:
            return handler(**params)
        except VmcriError as e:
            raise _agent_error(e) from e
        except (OSError, ValueError, KeyError) as e:
            raise AgentError(f"{method}: {e}") from e

    def _container_start(self, id: str) -> dict:
        self.engine.start(id)
        return {}

    def _container_kill(self, id: str, signal: str = "TERM") -> dict:
        self.engine.kill(id, signal)
        return self.engine.state(id)

    def _container_state(self, id: str) -> dict:
        state = self.engine.state(id)
        if state.get("status") == "unknown":  # neither crun nor conmon's exit file has it
            raise AgentError(f"id: no host container {id!r}", "NotFound")
        return state

    def _container_reopen_log(self, id: str) -> dict:
        self.engine.reopen_log(id)  # conmon reopens the CRI log file it writes
        return {}

    def _container_delete(self, id: str) -> dict:
        self.engine.delete(id)
        return {"deleted": True}

    def _container_stats(self, id: str) -> dict:
        sample = self.engine.stats(id)
        if sample is None:
            raise AgentError(f"id: container {id!r} has no cgroup", "NotFound")
        return sample

    def _container_metrics(self, id: str) -> dict:
        return self._container_stats(id)  # the cgroup basics; the rest reads as absent

    def _container_update(self, id: str, resources: dict) -> dict:
        self.engine.update(id, resources)
        return {}

    def _sandbox_stats(self) -> dict:
        sample = cgroups.sample(self.pod_cgroup) or {}
        return {k: v for k, v in sample.items() if k in ("cpu_usage_usec", "memory")}

    # -- processes ------------------------------------------------------------------
    def _exec_parts(self, argv, container_exec) -> tuple[str, list[str], dict]:
        if argv is not None or not container_exec:
            # nothing runs on the host for a pod outside its containers (and a timed-out
            # exec was killed by HostEngine already)
            raise AgentError("a host sandbox runs only container execs; a timed-out exec "
                             "is killed by the host engine", "Unimplemented")
        process = container_exec["process"]
        return container_exec["id"], list(process.get("args") or []), process

    def run(self, argv, stdin: bytes | None = None, timeout: float | None = None,
            env: dict | None = None, cwd: str = "/", max_output: int | None = None,
            container_exec: dict | None = None) -> tuple[int, bytes, bytes]:
        cid, cmd, process = self._exec_parts(argv, container_exec)
        if stdin:
            raise AgentError("stdin for ExecSync in a host sandbox", "Unimplemented")
        try:
            return self.engine.exec_sync(cid, cmd, timeout=timeout or 3600,
                                         max_output=max_output or 16 << 20, process=process)
        except DeadlineExceeded as e:
            raise AgentTimeout(str(e)) from e
        except VmcriError as e:
            raise _agent_error(e) from e

    def open_process(self, argv, env=None, cwd: str = "/", tty: bool = False,
                     stdin: bool = False, id=None, size=(80, 24), timeout=None,
                     container_exec: dict | None = None) -> ProcessStream:
        cid, cmd, process = self._exec_parts(argv, container_exec)
        try:
            proc = self.engine.open_exec(cid, cmd, tty=tty, stdin=stdin, process=process)
        except VmcriError as e:
            raise _agent_error(e) from e
        if tty and size:
            proc.resize(*size)
        return proc

    def attach(self, id: str, stdin: bool = False, live: bool = False,
               timeout: float | None = None, offsets: dict | None = None) -> ProcessStream:
        if not live:  # the log pump: conmon writes the log, the pump only needs the exit
            return ProcessStream(ExitChannel(self.engine, id), {"offsets": offsets}, b"")
        try:
            return self.engine.attach(id, stdin=stdin)
        except VmcriError as e:
            raise _agent_error(e) from e

    def open_port_forward(self, port: int, host: str = "127.0.0.1", timeout: float | None = None):
        try:
            return self.engine.port_forward(port, timeout=timeout or 10.0)
        except VmcriError as e:
            raise _agent_error(e) from e
        except OSError as e:
            raise AgentError(f"port-forward to {host}:{port} failed: {e}") from e


def for_sandbox(svc, sb) -> HostAgent:
    """The HostAgent of host sandbox `sb` (svc: the SandboxService)."""
    from vmcri.container.rootfs import ContainerDirs
    from vmcri.hostpod.pods import runtime
    from vmcri.hostpod.runner import HostEngine
    paths = svc.paths(sb.id)
    row = sb.resources.get("hostpod") or {}
    engine = HostEngine(runtime(svc.cfg.run_dir),
                        lambda cid: ContainerDirs.make(paths.share_dir, paths.state_dir, cid).bundle,
                        row)
    return HostAgent(engine, sb.id, sandbox.pod_cgroup(row, sb.id))
