"""ContainerService: what the container RPC modules share (tables, lookups, pumps)."""
from __future__ import annotations

import logging
import threading

from vmcri.container.model import ContainerRecord, ContainerTable
from vmcri.container.rootfs import ContainerDirs
from vmcri.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)


class ContainerService:
    def __init__(self, cfg, store, sandboxes, images, events=None, metrics=None):
        self.cfg = cfg
        self.table = ContainerTable(store)
        self.sandboxes = sandboxes
        self.images = images
        self.events = events
        self.metrics = metrics
        self.pumps: dict[str, object] = {}
        self.pumps_lock = threading.Lock()
        sandboxes.on_stop.append(self._stop_all_in)
        sandboxes.on_remove.append(self._remove_all_in)
        sandboxes.on_vm_gone.append(self._vm_gone)

    # -- lookups ----------------------------------------------------------------
    def get(self, container_id: str) -> ContainerRecord:
        if not container_id:
            raise InvalidArgument("container_id: must not be empty")
        rec = self.table.lookup(container_id)
        if rec is None:
            raise NotFound(f"container {container_id!r} not found")
        return rec

    def dirs(self, rec_or_ids) -> ContainerDirs:
        sandbox_id, container_id = ((rec_or_ids.sandbox_id, rec_or_ids.id)
                                    if isinstance(rec_or_ids, ContainerRecord) else rec_or_ids)
        paths = self.sandboxes.paths(sandbox_id)
        return ContainerDirs.make(paths.share_dir, paths.state_dir, container_id)

    def ready_sandbox(self, sandbox_id: str):
        sb = self.sandboxes.refresh(self.sandboxes.get(sandbox_id))
        if sb.state != "READY":
            raise FailedPrecondition(f"pod sandbox {sb.id[:12]} is not ready ({sb.state}: {sb.reason})")
        return sb

    def agent_for(self, rec: ContainerRecord):
        return self.sandboxes.agent(self.ready_sandbox(rec.sandbox_id))

    def emit(self, rec_id: str, kind: str) -> None:
        if self.events is not None:
            self.events.container_event(rec_id, kind)

    # -- RPC entry points -------------------------------------------------------
    def create(self, sandbox_id, config, sandbox_config) -> str:
        from vmcri.container.container_create import create_container
        return create_container(self, sandbox_id, config, sandbox_config)

    def start(self, container_id: str) -> None:
        from vmcri.container.container_start import start_container
        start_container(self, container_id)

    def stop(self, container_id: str, timeout: int, deadline: float | None = None) -> None:
        from vmcri.container.container_stop import stop_container
        stop_container(self, container_id, timeout, deadline)

    def remove(self, container_id: str) -> None:
        from vmcri.container.container_stop import remove_container
        remove_container(self, container_id)

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int):
        from vmcri.container.container_exec import exec_sync
        return exec_sync(self, container_id, cmd, timeout)

    def update_resources(self, container_id: str, linux) -> None:
        from vmcri.container.container_update import update_resources
        update_resources(self, container_id, linux)

    def reopen_log(self, container_id: str) -> None:
        rec = self.get(container_id)
        if rec.state != "RUNNING":
            raise FailedPrecondition(f"container {rec.id[:12]} is not running")
        with self.pumps_lock:
            pump = self.pumps.get(rec.id)
        if pump is None:
            raise FailedPrecondition(f"container {rec.id[:12]} has no log stream")
        if pump.writer is not None or not rec.log_path:
            pump.reopen()
            return
        from vmcri.channel import AgentError
        try:  # the container's monitor writes its log (a host sandbox's conmon)
            self.agent_for(rec).call("container_reopen_log", id=rec.id)
        except AgentError as e:
            raise FailedPrecondition(f"container {rec.id[:12]}: reopening its log failed: {e}") from e

    # -- sandbox hooks ------------------------------------------------------------
    def _stop_all_in(self, sandbox) -> None:
        from vmcri.container.container_stop import stop_for_sandbox
        stop_for_sandbox(self, sandbox)

    def _remove_all_in(self, sandbox) -> None:
        from vmcri.container.container_stop import remove_for_sandbox
        remove_for_sandbox(self, sandbox)

    def _vm_gone(self, sandbox) -> None:
        from vmcri.container.container_stop import mark_exited
        for rec in self.table.for_sandbox(sandbox.id):
            if rec.state in ("CREATED", "RUNNING", "CREATING"):
                mark_exited(self, rec, exit_code=137, reason="VMGone",
                            message="the pod VM exited unexpectedly")

    def resume(self) -> None:
        """After a daemon restart: re-attach log pumps of running containers."""
        from vmcri.container.container_start import ensure_pump
        for rec in self.table.all():
            if rec.state == "RUNNING":
                sb = self.sandboxes.find(rec.sandbox_id)
                if sb is not None and sb.state == "READY":
                    ensure_pump(self, rec, wait=False)
