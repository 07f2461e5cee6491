"""ContainerStatus and ListContainers: rows -> CRI messages."""
from __future__ import annotations

import json

from cri_api.v1 import api_pb2 as pb

from vmcri.container.model import CREATED, EXITED, RUNNING

_STATE = {CREATED: pb.ContainerState.CONTAINER_CREATED,
          RUNNING: pb.ContainerState.CONTAINER_RUNNING,
          EXITED: pb.ContainerState.CONTAINER_EXITED}


def state_of(rec) -> int:
    return _STATE.get(rec.state, pb.ContainerState.CONTAINER_UNKNOWN)


def _image_names(svc, rec) -> tuple[str, str]:
    """(image, image_ref) as containerd reports them: the image's first tag (else what was
    asked for) and its repo digest `repo@sha256:<manifest>` (else the image id), the one in
    the asked-for repository first."""
    from vmcri.errors import VmcriError
    from vmcri.image import reference
    images = getattr(svc, "images", None)
    image = images.status(rec.image_id) if images is not None else None
    if image is None:  # removed meanwhile, or no image service (unit tests)
        return rec.image, rec.image_id
    try:
        repo = reference.parse(rec.image).name + "@"
    except (VmcriError, ValueError):
        repo = None
    digests = sorted(image.repo_digests, key=lambda d: not (repo and d.startswith(repo)))
    tags = image.repo_tags
    return (tags[0] if tags else rec.image), (digests[0] if digests else rec.image_id)


def _mounts(rec, config: pb.ContainerConfig) -> list[pb.Mount]:
    """The CRI mounts, image volumes naming their image by id (imagevol.status_mount)."""
    from vmcri.container.imagevol import status_mount
    volume_ids = {m.get("index"): m.get("image_id") for m in rec.mounts or []
                  if isinstance(m, dict) and m.get("image_id")}
    return [status_mount(m, volume_ids.get(i)) if m.image.image else m
            for i, m in enumerate(config.mounts)]


_users: dict[str, pb.ContainerUser] = {}


def _user(svc, rec) -> pb.ContainerUser | None:
    """The identity of the container's first process (uid, gid, every supplementary group),
    as CreateContainer built it; derived again from the stored configs and the image's
    layers (exec_identity), once per container. None when that cannot be done."""
    hit = _users.get(rec.id)
    if hit is not None:
        return hit
    from vmcri.container.exec_identity import container_process
    try:
        user = container_process(svc, rec)["user"]
    except Exception:
        return None  # the pod or image is gone, or no services (unit tests)
    out = pb.ContainerUser(linux=pb.LinuxContainerUser(
        uid=user["uid"], gid=user["gid"], supplemental_groups=user.get("additionalGids", [])))
    if len(_users) > 4096:
        _users.clear()
    _users[rec.id] = out
    return out


def to_status(svc, rec) -> pb.ContainerStatus:
    config = pb.ContainerConfig.FromString(rec.config)
    signal = rec.stop_signal if rec.stop_signal in pb.Signal.keys() else "RUNTIME_DEFAULT"
    image, image_ref = _image_names(svc, rec)
    return pb.ContainerStatus(
        id=rec.id, metadata=config.metadata, state=state_of(rec), created_at=rec.created_ns,
        started_at=rec.started_ns, finished_at=rec.finished_ns, exit_code=rec.exit_code,
        image=pb.ImageSpec(image=image, annotations=dict(config.image.annotations),
                           user_specified_image=config.image.user_specified_image or rec.image),
        image_ref=image_ref, image_id=rec.image_id, reason=rec.reason, message=rec.message,
        labels=rec.labels, annotations=rec.annotations, mounts=_mounts(rec, config),
        log_path=rec.log_path, stop_signal=pb.Signal.Value(signal),
        resources=pb.ContainerResources(linux=config.linux.resources), user=_user(svc, rec))


def status(svc, container_id: str, verbose: bool):
    rec = svc.get(container_id)
    info = {}
    if verbose:
        dirs = svc.dirs(rec)
        info["info"] = json.dumps({"sandboxID": rec.sandbox_id, "rootfs": dirs.rootfs,
                                   "guestBundle": dirs.guest_bundle, "mounts": rec.mounts,
                                   "state": rec.state}, sort_keys=True)
    return to_status(svc, rec), info


def statuses_in_sandbox(svc, sandbox_id: str) -> list[pb.ContainerStatus]:
    return [to_status(svc, r) for r in svc.table.for_sandbox(sandbox_id)]


def list_containers(svc, flt: pb.ContainerFilter | None) -> list[pb.Container]:
    out = []
    for rec in svc.table.all():
        if rec.state == "CREATING":
            continue  # not yet a container the kubelet may know about
        if flt is not None:
            if flt.id and not rec.id.startswith(flt.id):
                continue
            if flt.pod_sandbox_id and not rec.sandbox_id.startswith(flt.pod_sandbox_id):
                continue
            if flt.HasField("state") and state_of(rec) != flt.state.state:
                continue
            if any(rec.labels.get(k) != v for k, v in flt.label_selector.items()):
                continue
        config = pb.ContainerConfig.FromString(rec.config)
        out.append(pb.Container(id=rec.id, pod_sandbox_id=rec.sandbox_id, metadata=config.metadata,
                                image=pb.ImageSpec(image=rec.image), image_ref=rec.image_id,
                                image_id=rec.image_id, state=state_of(rec),
                                created_at=rec.created_ns, labels=rec.labels,
                                annotations=rec.annotations))
    return out
