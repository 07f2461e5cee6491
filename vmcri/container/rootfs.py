"""A container's root filesystem: overlayfs of the image layers plus a per-container
upper dir, mounted inside the sandbox's shared 9p dir so that the guest sees it.
hostPath mounts are bind-mounted into the same share."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from vmcri.errors import InvalidArgument
from vmcri.sandbox import hostfs
from vmcri.sandbox.hostfs import MS_BIND, _mount

GUEST_SHARE = "/run/vmcri/share"  # where the agent mounts the 9p share in the guest
MS_RDONLY, MS_REMOUNT = 1, 32


@dataclass(frozen=True)
class ContainerDirs:
    bundle: str  # <share>/containers/<id>: config.json + rootfs/ + mounts/
    rootfs: str
    mounts: str
    upper: str  # outside the share: the guest must never see overlay internals
    work: str
    guest_bundle: str
    guest_rootfs: str

    @classmethod
    def make(cls, share_dir: str, state_dir: str, container_id: str) -> "ContainerDirs":
        bundle = os.path.join(share_dir, "containers", container_id)
        private = os.path.join(state_dir, "containers", container_id)
        guest_bundle = f"{GUEST_SHARE}/containers/{container_id}"
        return cls(bundle=bundle, rootfs=os.path.join(bundle, "rootfs"),
                   mounts=os.path.join(bundle, "mounts"),
                   upper=os.path.join(private, "upper"), work=os.path.join(private, "work"),
                   guest_bundle=guest_bundle, guest_rootfs=f"{guest_bundle}/rootfs")

    @property
    def private(self) -> str:
        return os.path.dirname(self.upper)

    def guest_mount(self, index: int) -> str:
        return f"{self.guest_bundle}/mounts/{index}"


def mount_rootfs(dirs: ContainerDirs, layer_dirs: list[str]) -> None:
    """layer_dirs bottom -> top, as the image lists them."""
    for d in (dirs.rootfs, dirs.mounts, dirs.upper, dirs.work):
        os.makedirs(d, mode=0o755, exist_ok=True)
    lower = ":".join(reversed(layer_dirs))  # overlayfs wants the top layer first
    if not layer_dirs:
        raise InvalidArgument("image: the image has no layers")
    opts = f"lowerdir={lower},upperdir={dirs.upper},workdir={dirs.work}"
    if len(opts) > 4000:
        raise InvalidArgument(f"image: too many layers ({len(layer_dirs)}) for one overlay mount")
    _mount("overlay", dirs.rootfs, "overlay", 0, opts)


def bind_host_path(dirs: ContainerDirs, index: int, host_path: str, readonly: bool) -> str:
    """Expose a hostPath under the share; returns its guest path."""
    if not os.path.exists(host_path):
        raise InvalidArgument(f"config.mounts[{index}].host_path: {host_path!r} does not exist")
    target = os.path.join(dirs.mounts, str(index))
    if os.path.isdir(host_path):
        os.makedirs(target, exist_ok=True)
    else:
        open(target, "a").close()
    _mount(host_path, target, None, MS_BIND)
    if readonly:
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    return dirs.guest_mount(index)


def release(dirs: ContainerDirs) -> None:
    """Unmount and delete everything of one container; safe to repeat."""
    hostfs.unmount_tree(dirs.bundle)
    shutil.rmtree(dirs.bundle, ignore_errors=True)
    shutil.rmtree(dirs.private, ignore_errors=True)


def writable_layer_usage(dirs: ContainerDirs) -> tuple[int, int]:
    """(bytes, inodes) of the container's upper dir."""
    used = inodes = 0
    for root, subdirs, files in os.walk(dirs.upper):
        inodes += len(subdirs) + len(files)
        for f in files:
            try:
                used += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return used, inodes
