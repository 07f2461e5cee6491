"""The kernel's new mount API (open_tree, mount_setattr, move_mount), for binds that must
reach the guest with their flags.

Why not mount(2) + a remount: the share is a shared mount, and what qemu serves is a
peer copy of it (the read-only export, and qemu's own namespace). A mount made under the
share propagates as a copy taken *when it is attached*; a later MS_REMOUNT (read-only,
nosuid, nodev) changes the host's copy only, so the guest's copy stays writable, suid and
dev. Here the tree is cloned detached, its flags set, and only then attached: every copy
gets the flags. AT_RECURSIVE sets them on the submounts too (a hostPath's own mounts)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442  # x86_64 (and generic)
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE, AT_SYMLINK_NOFOLLOW = -100, 0x1000, 0x8000, 0x100
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _call(what: str, nr: int, *args) -> int:
    r = _libc.syscall(ctypes.c_long(nr), *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return r


def clone_tree(path: str, recursive: bool, dirfd: int = AT_FDCWD) -> int:
    """A detached copy of the mount at `path` (with its submounts if `recursive`), as an
    fd; `path` "" with a `dirfd` clones what that fd (an O_PATH one) points at."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    if not path:
        flags |= AT_EMPTY_PATH
    return _call(f"open_tree {path or dirfd}", SYS_OPEN_TREE, ctypes.c_int(dirfd),
                 path.encode(), ctypes.c_uint(flags))


def set_attrs(tree_fd: int, attrs: int, recursive: bool) -> None:
    attr = _MountAttr(attr_set=attrs, attr_clr=0, propagation=0, userns_fd=0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _call("mount_setattr", SYS_MOUNT_SETATTR, ctypes.c_int(tree_fd), b"",
          ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))


def attach(tree_fd: int, target: str) -> None:
    """Attach the detached tree on `target` (a host-made path; its last component is not
    a link: the targets are made O_NOFOLLOW | O_EXCL in host-only dirs)."""
    _call(f"move_mount on {target}", SYS_MOVE_MOUNT, ctypes.c_int(tree_fd), b"",
          ctypes.c_int(AT_FDCWD), target.encode(), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))


def bind_with_flags(tree_fd: int, target: str, readonly: bool, recursive_ro: bool) -> None:
    """nosuid,nodev on the whole tree; read-only on its top only, or on all of it."""
    try:
        set_attrs(tree_fd, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive=True)
        if readonly or recursive_ro:
            set_attrs(tree_fd, MOUNT_ATTR_RDONLY, recursive=recursive_ro)
        attach(tree_fd, target)
    finally:
        os.close(tree_fd)
