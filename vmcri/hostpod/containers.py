"""CreateContainer in a host sandbox. Everything after create (start, stop, exec,
streaming, stats, logs) is the shared container RPC code talking to the pod's HostAgent;
create differs because the bundle does: host paths instead of the 9p share, the pod's
pinned namespaces, and hostPaths mounted from where they are."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3

from cri_api.v1 import api_pb2 as pb

from vmcri.container import ocispec, rootfs, safepath
from vmcri.container.model import CREATED, CREATING, ContainerRecord
from vmcri.container.validate import validate_container_config
from vmcri.errors import AlreadyExists, InvalidArgument
from vmcri.hostpod import spec as spec_mod
from vmcri.sandbox.model import now_ns


def create_host_container(svc, sandbox, config: pb.ContainerConfig,
                          sandbox_config: pb.PodSandboxConfig, log_path: str) -> str:
    validate_container_config(spec_mod.without_host_modes(config))
    # the pod's namespaces are the ones it was made with, whatever the kubelet resends
    stored = pb.PodSandboxConfig.FromString(sandbox.config)
    image = svc.images.resolve(config.image.image)
    container_id = secrets.token_hex(32)
    md = config.metadata
    rec = ContainerRecord(
        id=container_id, sandbox_id=sandbox.id, name=md.name, attempt=md.attempt,
        state=CREATING, created_ns=now_ns(), image=config.image.image, image_id=image.id,
        config=config.SerializeToString(), log_path=log_path,
        labels=dict(config.labels), annotations=dict(config.annotations))
    try:
        svc.table.insert(rec)
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"container name {md.name} (attempt {md.attempt}) is already "
                            f"reserved in pod sandbox {sandbox.id[:12]}") from None
    dirs = svc.dirs(rec)
    engine = svc.sandboxes.agent(sandbox).engine
    with contextlib.ExitStack() as undo:
        undo.callback(svc.table.delete, container_id)
        rootfs.mount_rootfs(dirs, svc.images.layer_dirs(image))
        undo.callback(rootfs.release, dirs)
        for i, m in enumerate(config.mounts):
            if m.image.image:
                raise InvalidArgument(f"config.mounts[{i}].image: image volumes are "
                                      f"supported in VM sandboxes only, not host sandboxes")
            if not os.path.exists(m.host_path):
                raise InvalidArgument(f"config.mounts[{i}].host_path: {m.host_path!r} does not exist")
        spec = engine.build_spec(container_id, config, stored, image.raw_config.get("config") or {},
                                 lambda p: safepath.read_file(dirs.rootfs, p), sandbox.id)
        with open(os.path.join(dirs.bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        if rec.log_path:
            os.makedirs(os.path.dirname(rec.log_path), exist_ok=True)
            open(rec.log_path, "a").close()
        engine.create(container_id, log_path=rec.log_path, tty=bool(config.tty),
                      stdin=bool(config.stdin), stdin_once=bool(config.stdin_once))
        undo.callback(engine.delete, container_id)
        svc.table.update(container_id, state=CREATED,
                         stop_signal=spec["annotations"].get(ocispec.ANN_STOP_SIGNAL, "SIGTERM"),
                         mounts=[{"host": m.host_path, "guest": m.host_path} for m in config.mounts])
        undo.pop_all()
    svc.emit(container_id, "CREATED")
    return container_id
