"""Image volumes (a CRI mount with `image` set, the kubelet's OCI VolumeSource): an image's
layers, read-only, at a path of the container, as containerd 2.1 and CRI-O mount them.

On the host: the image's layer dirs as an overlay with lower dirs only (read-only,
nosuid, nodev), staged in the container's host-only dir; its root, or `image_sub_path`
inside it, is cloned and attached at the container's mounts/N in the share, read-only,
and the staging mount goes. The guest sees it by propagation, and crun binds it read-only.

The image is in use while the container exists: its id is in the container's row from
before anything is mounted (`volume_rows`), and RemoveImage refuses an image a row names
(`image_ids`). The mount goes with the container's dirs (rootfs.release)."""
from __future__ import annotations

import errno
import os
import posixpath

from cri_api.v1 import api_pb2 as pb

from vmcri.container import mountapi
from vmcri.errors import InvalidArgument, NotFound
from vmcri.sandbox import hostfs
from vmcri.sandbox.hostfs import MS_NODEV, MS_NOSUID, MS_RDONLY, _mount

# the prefix the kubelet matches (k8s.io/cri-api/pkg/errors ErrImageVolumeMountFailed)
MOUNT_FAILED = "ImageVolumeMountFailed"


def resolve_images(images, config: pb.ContainerConfig) -> dict:
    """Mount index -> the Image each image volume names; it must be pulled already."""
    out = {}
    for i, m in enumerate(config.mounts):
        ref = m.image.image
        if not ref:
            continue
        try:
            out[i] = images.resolve(ref)
        except NotFound:
            raise NotFound(f"{MOUNT_FAILED}: failed to resolve image {ref!r} "
                           f"(config.mounts[{i}].image): not found; pull it first") from None
    return out


def volume_rows(volumes: dict) -> list[dict]:
    """What the container's row keeps of its image volumes (before they are mounted)."""
    return [{"index": i, "image_id": img.id} for i, img in sorted(volumes.items())]


def image_ids(rec) -> set[str]:
    """Every image a container row keeps in use: its own and its image volumes'."""
    ids = {rec.image_id}
    for m in rec.mounts or []:
        if isinstance(m, dict) and m.get("image_id"):
            ids.add(m["image_id"])
    return ids


def check_sub_path(field: str, sub_path: str) -> str:
    """The sub path, relative and normalized; one that names a place outside the image
    (absolute, or `..` above its root) is refused. Links inside are resolved by the
    kernel within the image's root (mount_volume)."""
    if "\x00" in sub_path:
        raise InvalidArgument(f"{field}: must not contain NUL characters")
    if sub_path.startswith("/"):
        raise InvalidArgument(f"{field}: {sub_path!r} must be relative to the image's root")
    clean = posixpath.normpath(sub_path) if sub_path else "."
    if clean == ".." or clean.startswith("../"):
        raise InvalidArgument(f"{field}: {sub_path!r} escapes the image")
    return clean


def _open_sub_path(root: str, sub_path: str, field: str) -> int:
    """An O_PATH fd of the directory `sub_path` of the mounted tree `root`, resolved by the
    kernel inside it (RESOLVE_IN_ROOT: a link to /x means the image's /x)."""
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return hostfs.openat2(rootfd, sub_path, os.O_PATH | os.O_DIRECTORY,
                              hostfs.RESOLVE_IN_ROOT | hostfs.RESOLVE_NO_MAGICLINKS)
    except OSError as e:
        why = {errno.ENOENT: "does not exist in the image",
               errno.ENOTDIR: "is not a directory in the image (only directories can be "
                              "mounted)"}.get(e.errno, f"cannot be opened: {e.strerror}")
        raise InvalidArgument(f"{field}: {sub_path!r} {why}") from None
    finally:
        os.close(rootfd)


def _stage(stage: str, layer_dirs: list[str], field: str) -> None:
    """The image's tree, read-only, at `stage` (a host-only dir). One layer
    is its dir itself (overlayfs wants two lower dirs when it has no upper one)."""
    os.makedirs(stage, mode=0o700, exist_ok=True)
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV
    if len(layer_dirs) == 1:
        tree = mountapi.clone_tree(layer_dirs[0], recursive=False)
        mountapi.bind_with_flags(tree, stage, readonly=True, recursive_ro=True)
    else:
        opts = "lowerdir=" + ":".join(reversed(layer_dirs))  # top layer first
        if len(opts) > 4000:
            raise InvalidArgument(f"{field}: the image has too many layers "
                                  f"({len(layer_dirs)}) for one overlay mount")
        _mount("overlay", stage, "overlay", flags, opts)


def mount_volume(dirs, index: int, layer_dirs: list[str], sub_path: str) -> str:
    """Mount image volume `index` at the container's mounts/N; returns that host path."""
    field = f"config.mounts[{index}].image_sub_path"
    sub = check_sub_path(field, sub_path)
    if not layer_dirs:
        raise InvalidArgument(f"config.mounts[{index}].image: the image has no layers")
    stage = os.path.join(dirs.private, "imagevol", str(index))
    target = os.path.join(dirs.mounts, str(index))
    os.makedirs(dirs.mounts, mode=0o755, exist_ok=True)
    try:
        os.mkdir(target, 0o755)
    except FileExistsError:
        pass
    _stage(stage, layer_dirs, f"config.mounts[{index}].image")
    try:
        subfd = _open_sub_path(stage, sub, field)
        try:
            tree = mountapi.clone_tree("", recursive=False, dirfd=subfd)
        finally:
            os.close(subfd)
        mountapi.bind_with_flags(tree, target, readonly=True, recursive_ro=True)
    finally:
        hostfs.unmount_tree(stage)  # the attached clone keeps the overlay alive
        try:
            os.rmdir(stage)
        except OSError:
            pass  # rootfs.release removes the container's private dir
    return target


def status_mount(mount: pb.Mount, image_id: str | None) -> pb.Mount:
    """The mount as ContainerStatus reports it: the image named by its id (the digest of
    its config, what the kubelet pulled), what was asked kept as user_specified_image."""
    out = pb.Mount()
    out.CopyFrom(mount)
    if image_id:
        asked = mount.image.user_specified_image or mount.image.image
        out.image.image = image_id
        out.image.user_specified_image = asked
        set_image_ref(out.image, image_id)
    return out


IMAGE_REF_FIELD = 20  # ImageSpec.image_ref (KEP-5365), newer than the stubs we ship


def set_image_ref(spec: pb.ImageSpec, image_ref: str) -> None:
    """ImageSpec.image_ref: the digest of a volume's image, as containerStatuses' imageID.
    Our generated stubs predate the field, so it goes in as a field they do not know, which
    protobuf keeps and sends on; a client with the newer proto reads it as image_ref."""
    field = pb.ImageSpec.DESCRIPTOR.fields_by_number.get(IMAGE_REF_FIELD)
    if field is not None:
        setattr(spec, field.name, image_ref)
        return
    data = image_ref.encode()
    spec.MergeFromString(_varint(IMAGE_REF_FIELD << 3 | 2) + _varint(len(data)) + data)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
