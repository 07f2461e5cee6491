"""A container's root filesystem: overlayfs of the image layers plus a per-container
upper dir, mounted inside the sandbox's share dir so that the guest sees it.
hostPath mounts are bind-mounted into the same share.

The share dir itself is host-only (the guest gets a read-only bind of it, see hostfs), so
the paths of the skeleton are the host's own. What the guest can write is inside these
mounts and in the upper dir: the host never walks those by path, only with no-follow fds."""
from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import dataclass

from vmcri.container import mountapi
from vmcri.errors import InvalidArgument
from vmcri.sandbox import hostfs
from vmcri.sandbox.hostfs import MS_NODEV, MS_NOSUID, _mount

GUEST_SHARE = "/run/vmcri/share"  # where the agent mounts the 9p share in the guest
# nodev: qemu (root, 9p passthrough) must never open a device node the guest made;
# nosuid: nor a set-id file it made be honoured on the host through these mounts.
GUEST_WRITABLE_FLAGS = MS_NOSUID | MS_NODEV


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


def mount_rootfs(dirs: ContainerDirs, layer_dirs: list[str], for_guest: bool = False) -> None:
    """layer_dirs bottom -> top, as the image lists them. for_guest: a pod VM's rootfs,
    which qemu serves to the guest: nosuid, nodev (a host sandbox's keeps its set-id files)."""
    for d in (dirs.rootfs, dirs.mounts, dirs.upper, dirs.work):
        os.makedirs(d, mode=0o755, exist_ok=True)
    lower = ":".join(reversed(layer_dirs))  # overlayfs wants the top layer first
    if not layer_dirs:
        raise InvalidArgument("image: the image has no layers")
    opts = f"lowerdir={lower},upperdir={dirs.upper},workdir={dirs.work}"
    if len(opts) > 4000:
        raise InvalidArgument(f"image: too many layers ({len(layer_dirs)}) for one overlay mount")
    _mount("overlay", dirs.rootfs, "overlay", GUEST_WRITABLE_FLAGS if for_guest else 0, opts)


def _make_target(target: str, directory: bool) -> None:
    if directory:
        try:
            os.mkdir(target, 0o755)
        except FileExistsError:
            pass
        st = os.lstat(target)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(f"{target}: not a directory")
        return
    try:
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644))
    except FileExistsError:
        if not stat.S_ISREG(os.lstat(target).st_mode):
            raise OSError(f"{target}: not a regular file") from None


def bind_host_path(dirs: ContainerDirs, index: int, host_path: str, readonly: bool,
                   recursive_ro: bool = False) -> tuple[str, list[tuple[str, str]]]:
    """Expose a hostPath under the share, nosuid,nodev: its top at mounts/N and each mount
    under it at mounts/N.K of its own, which the guest binds back in place. readonly: the
    top only (its submounts keep their own flags, as a plain ro bind on a node);
    recursive_ro: every mount. Returns the top's guest path and (path below the top, guest
    path) of each submount, parents first.

    Not one rbind: a copy of a submount would sit on the host's own directory, which then
    stays a mount point in the host's namespace, so the owner of the hostPath could not
    remove it while the container runs (rmdir: EBUSY), where with runc the copies live in
    the container's namespace. Here every copy sits on a directory of ours."""
    if not os.path.exists(host_path):
        raise InvalidArgument(f"config.mounts[{index}].host_path: {host_path!r} does not exist")
    target = os.path.join(dirs.mounts, str(index))
    _make_target(target, os.path.isdir(host_path))
    real = os.path.realpath(host_path)
    mountapi.bind_with_flags(mountapi.clone_tree(host_path, recursive=False), target,
                             readonly or recursive_ro, False)
    subs = []
    for k, point in enumerate(sorted((p for p in hostfs.mounts_under(real) if p != real),
                                     key=lambda p: (p.count("/"), p))):
        sub_target = os.path.join(dirs.mounts, f"{index}.{k}")
        _make_target(sub_target, os.path.isdir(point))
        mountapi.bind_with_flags(mountapi.clone_tree(point, recursive=False), sub_target,
                                 recursive_ro, False)
        subs.append((os.path.relpath(point, real), f"{dirs.guest_mount(index)}.{k}"))
    return dirs.guest_mount(index), subs


def guest_readonly(readonly: bool, recursive_ro: bool) -> bool:
    """Whether the guest's bind of a hostPath's top is made read-only. Its submounts are
    binds of their own in the guest, so this never covers them."""
    return readonly or recursive_ro


def write_bundle_file(dirs: ContainerDirs, name: str, data: bytes) -> None:
    """config.json and the like: a new file in the host-only bundle dir, never through a link."""
    path = os.path.join(dirs.bundle, name)
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def release(dirs: ContainerDirs) -> None:
    """Unmount and delete everything of one container; safe to repeat. A mount that does
    not go keeps its dirs too (remove_tree refuses), so the error says so."""
    hostfs.unmount_tree(dirs.bundle)
    hostfs.unmount_tree(dirs.private)  # an image volume's staging mount, if a create died
    hostfs.remove_tree(dirs.bundle)
    hostfs.remove_tree(dirs.private)
    _usage_cache.pop(dirs.upper, None)


# -- writable-layer usage --------------------------------------------------------------
# The upper dir holds whatever the guest wrote: walking it on every stats poll would let
# one pod make the daemon's stats calls as slow as it likes. The walk is fd-based (fwalk,
# no symlink followed, one filesystem), stops at USAGE_MAX_ENTRIES or USAGE_MAX_SECONDS
# (the count is then a lower bound), and its result is reused for USAGE_CACHE_S.
USAGE_MAX_ENTRIES = 200_000
USAGE_MAX_SECONDS = 2.0
USAGE_CACHE_S = 10.0
_usage_cache: dict[str, tuple[float, tuple[int, int]]] = {}
_usage_lock = threading.Lock()


def _walk_usage(upper: str, max_entries: int, max_seconds: float) -> tuple[int, int, bool]:
    used = inodes = 0
    deadline = time.monotonic() + max_seconds
    try:
        top_dev = os.lstat(upper).st_dev
    except OSError:
        return 0, 0, True
    for _root, subdirs, files, rootfd in os.fwalk(upper, follow_symlinks=False):
        inodes += len(subdirs) + len(files)
        for name in files:
            try:
                used += os.stat(name, dir_fd=rootfd, follow_symlinks=False).st_blocks * 512
            except OSError:
                pass
        subdirs[:] = [d for d in subdirs if _same_dev(d, rootfd, top_dev)]
        if inodes >= max_entries or time.monotonic() > deadline:
            return used, inodes, False
    return used, inodes, True


def _same_dev(name: str, dirfd: int, dev: int) -> bool:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_dev == dev
    except OSError:
        return False


def writable_layer_usage(dirs: ContainerDirs) -> tuple[int, int]:
    """(bytes, inodes) of the container's upper dir, at most USAGE_CACHE_S old."""
    now = time.monotonic()
    with _usage_lock:
        hit = _usage_cache.get(dirs.upper)
        if hit is not None and now - hit[0] < USAGE_CACHE_S:
            return hit[1]
    used, inodes, complete = _walk_usage(dirs.upper, USAGE_MAX_ENTRIES, USAGE_MAX_SECONDS)
    if not complete:
        hostfs.log.info("writable layer %s: walk stopped at %d entries (a lower bound)",
                        dirs.upper, inodes)
    with _usage_lock:
        if len(_usage_cache) > 4096:
            _usage_cache.clear()
        _usage_cache[dirs.upper] = (time.monotonic(), (used, inodes))
    return used, inodes
