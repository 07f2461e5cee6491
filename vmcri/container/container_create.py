"""CreateContainer: reserve the row, build the rootfs and OCI bundle on the host,
then `crun create` inside the guest. Every step has its undo on an ExitStack.
A host sandbox's bundle is built by vmcri.hostpod.containers (crun create on the host)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import time

from cri_api.v1 import api_pb2 as pb

from vmcri.container import imagevol, ocispec, rootfs
from vmcri.container.model import CREATED, CREATING, ContainerRecord
from vmcri.container.validate import validate_container_config, validate_vm_mounts
from vmcri.errors import AlreadyExists, Unavailable
from vmcri.hostpod import pods as hostpods
from vmcri.sandbox import hostfs
from vmcri.sandbox.model import now_ns

log = logging.getLogger(__name__)
GUEST_ETC = "/run/vmcri/etc"  # where the agent keeps the pod's hosts/resolv.conf/hostname
GUEST_SHM = "/dev/shm"


def log_path_for(sandbox_config: pb.PodSandboxConfig, config: pb.ContainerConfig) -> str:
    if not config.log_path or not sandbox_config.log_directory:
        return ""
    return os.path.join(sandbox_config.log_directory, config.log_path)


def create_container(svc, sandbox_id: str, config: pb.ContainerConfig,
                     sandbox_config: pb.PodSandboxConfig) -> str:
    peek = svc.sandboxes.find(sandbox_id) if sandbox_id else None
    if hostpods.is_host(peek):  # the bundle differs (host paths and namespaces); nothing else
        from vmcri.hostpod.containers import create_host_container
        sandbox = svc.ready_sandbox(sandbox_id)
        sent = sandbox_config if sandbox_config.ByteSize() else \
            pb.PodSandboxConfig.FromString(sandbox.config)
        return create_host_container(svc, sandbox, config, sent, log_path_for(sent, config))
    validate_container_config(config)
    validate_vm_mounts(config.mounts)
    sandbox = svc.ready_sandbox(sandbox_id)
    stored_config = pb.PodSandboxConfig.FromString(sandbox.config)
    # The kubelet resends the pod config; the stored one is what the VM was built from.
    sandbox_config = stored_config if not sandbox_config.ByteSize() else sandbox_config
    image = svc.images.resolve(config.image.image)
    volumes = imagevol.resolve_images(svc.images, config)
    container_id = secrets.token_hex(32)
    md = config.metadata
    # the row names the image volumes' images before they are mounted: RemoveImage
    # refuses them from here on (imagevol.image_ids)
    rec = ContainerRecord(
        id=container_id, sandbox_id=sandbox.id, name=md.name, attempt=md.attempt,
        state=CREATING, created_ns=now_ns(), image=config.image.image, image_id=image.id,
        config=config.SerializeToString(), log_path=log_path_for(sandbox_config, config),
        labels=dict(config.labels), annotations=dict(config.annotations),
        mounts=imagevol.volume_rows(volumes))
    try:
        svc.table.insert(rec)
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"container name {md.name} (attempt {md.attempt}) is already "
                            f"reserved in pod sandbox {sandbox.id[:12]}")
    dirs = svc.dirs(rec)
    lap = _Laps()
    with contextlib.ExitStack() as undo:
        undo.callback(svc.table.delete, container_id)
        rootfs.mount_rootfs(dirs, svc.images.layer_dirs(image), for_guest=True)
        undo.callback(rootfs.release, dirs)
        lap("overlay")

        prepared, mount_rows = _prepare_mounts(svc, dirs, config, volumes)
        paths = ocispec.GuestPaths(
            hosts=f"{GUEST_ETC}/hosts", resolv_conf=f"{GUEST_ETC}/resolv.conf",
            hostname=f"{GUEST_ETC}/hostname", shm=GUEST_SHM, host_mount_to_guest={},
            prepared=prepared)
        spec = ocispec.build_spec(
            container_id, config, sandbox_config, image.raw_config.get("config") or {},
            rootfs_path=dirs.guest_rootfs, guest_paths=paths, sandbox_id=sandbox.id,
            read_image_file=lambda p: hostfs.read_in_root(dirs.rootfs, p))
        lap("mounts_and_spec")
        rootfs.write_bundle_file(dirs, "config.json", json.dumps(spec).encode())
        if rec.log_path:
            os.makedirs(os.path.dirname(rec.log_path), exist_ok=True)
            open(rec.log_path, "a").close()

        from vmcri.channel import AgentError
        agent = svc.sandboxes.agent(sandbox)
        lap("bundle_write")
        try:
            created = agent.call("container_create", id=container_id, bundle=dirs.guest_bundle,
                                 tty=bool(config.tty), stdin=bool(config.stdin),
                                 stdin_once=bool(config.stdin_once))
        except AgentError as e:
            raise Unavailable(f"crun create in the pod VM failed: {e}") from e
        lap("agent_create")
        log.info("CreateContainer %s phases (s): %s; in the guest: %s", container_id[:12],
                 lap, _fmt((created or {}).get("phases") or {}))
        undo.callback(_guest_delete, agent, container_id)
        svc.table.update(container_id, state=CREATED,
                         stop_signal=spec["annotations"].get(ocispec.ANN_STOP_SIGNAL, "SIGTERM"),
                         mounts=mount_rows)
        undo.pop_all()
    svc.emit(container_id, "CREATED")
    return container_id


class _Laps:
    """Seconds per named step of one CreateContainer, for the log (bench P3 reads it)."""

    def __init__(self):
        self.last, self.steps = time.monotonic(), {}

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.steps[name], self.last = now - self.last, now

    def __str__(self) -> str:
        return _fmt(self.steps)


def _fmt(steps: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in steps.items())


def _prepare_mounts(svc, dirs, config: pb.ContainerConfig, volumes: dict):
    """Every CRI mount made visible under the share: hostPaths bound, image volumes
    mounted. Returns ocispec's prepared mounts and the row's record of them."""
    prepared: dict[int, ocispec.PreparedMount] = {}
    rows = []
    for i, m in enumerate(config.mounts):
        if i in volumes:
            imagevol.mount_volume(dirs, i, svc.images.layer_dirs(volumes[i]), m.image_sub_path)
            prepared[i] = ocispec.PreparedMount(dirs.guest_mount(i), readonly=True)
            rows.append({"index": i, "image_id": volumes[i].id, "guest": dirs.guest_mount(i)})
            continue
        guest, subs = rootfs.bind_host_path(dirs, i, m.host_path, m.readonly,
                                            m.recursive_read_only)
        prepared[i] = ocispec.PreparedMount(
            guest, rootfs.guest_readonly(m.readonly, m.recursive_read_only),
            submounts=tuple((rel, src, m.recursive_read_only) for rel, src in subs))
        rows.append({"index": i, "host": m.host_path, "guest": guest})
    return prepared, rows


def _guest_delete(agent, container_id: str) -> None:
    try:
        agent.call("container_delete", id=container_id)
    except Exception:
        log.warning("could not delete container %s in the guest", container_id[:12], exc_info=True)
