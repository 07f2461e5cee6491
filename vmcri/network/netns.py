"""Named network namespaces bind-mounted under vmcri's own run dir.

`ip netns` keeps its mounts in /var/run/netns, where another program's add/delete can make
our removal fail with "busy" (HOST-NOTES §8), so vmcri keeps them in `cfg.netns_dir`.

A namespace is made by a short-lived thread: unshare(CLONE_NEWNET) only changes the calling
thread, so the daemon's other threads stay in the host namespace and no fork of a threaded
process is needed. The bind mount of the thread's ns file keeps the namespace alive after the
thread exits.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import threading

from vmcri import errors

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 2

# Sandbox ids (64 hex) and test names; no path separators, no dot-only names.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def _oserror(what: str, path: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", path)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise errors.InvalidArgument(
            f"netns name: {name!r} must be 1-128 characters of [A-Za-z0-9_.-]")
    return name


def path_for(netns_dir: str, name: str) -> str:
    return os.path.join(netns_dir, check_name(name))


def _is_mountpoint(path: str) -> bool:
    """From mountinfo: os.path.ismount misses a dir bind-mounted onto itself."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f.read().decode("utf-8", "replace").splitlines():
            fields = line.split(" ")
            if len(fields) > 4 and _unescape(fields[4]) == path:
                return True
    return False


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _ensure_shared_dir(netns_dir: str) -> None:
    """Make the dir a shared mount, as iproute2 does for /var/run/netns.

    Mount namespaces cloned later (libvirt's qemu gets its own) then see our unmounts too, so a
    copy of the bind mount there cannot keep a deleted pod's namespace alive.
    """
    os.makedirs(netns_dir, mode=0o755, exist_ok=True)
    d = os.path.realpath(netns_dir).encode()
    if _libc.mount(b"none", d, None, MS_SHARED | MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
        raise _oserror("make netns dir shared", netns_dir)
    if _libc.mount(d, d, b"none", MS_BIND | MS_REC, None) != 0:
        raise _oserror("bind-mount netns dir", netns_dir)
    if _libc.mount(b"none", d, None, MS_SHARED | MS_REC, None) != 0:
        raise _oserror("make netns dir shared", netns_dir)


def _unshare_and_bind(path: str, result: list) -> None:
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise _oserror("unshare(CLONE_NEWNET)", path)
        src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        if _libc.mount(src, path.encode(), b"none", MS_BIND, None) != 0:
            raise _oserror("bind-mount netns", path)
        result.append(None)
    except BaseException as e:  # handed to the caller's thread
        result.append(e)


def create(netns_dir: str, name: str) -> str:
    """Create the namespace `name` and return its path. Fails if it already exists."""
    path = path_for(netns_dir, name)
    _ensure_shared_dir(netns_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
    except FileExistsError:
        raise errors.AlreadyExists(f"network namespace {path} already exists") from None
    os.close(fd)
    result: list = []
    t = threading.Thread(target=_unshare_and_bind, args=(path, result),
                         name=f"netns-create-{name[:12]}", daemon=True)
    t.start()
    t.join()
    if result and result[0] is None:
        return path
    _remove_path(path)
    err = result[0] if result else RuntimeError("netns thread died")
    raise errors.VmcriError(f"creating network namespace {path}: {err}") from err


def _remove_path(path: str) -> None:
    # Unmount every stacked mount (a half-done earlier create may have left two).
    for _ in range(8):
        if _libc.umount2(path.encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):  # not a mount point / gone
                break
            raise _oserror("unmount netns", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def delete(netns_dir: str, name: str) -> None:
    """Remove the namespace; a no-op when it, or its mount, is already gone."""
    _remove_path(path_for(netns_dir, name))


def delete_path(path: str) -> None:
    """Like delete() for a path handed back earlier by create()."""
    _remove_path(path)


def exists(path: str) -> bool:
    """True when `path` is a live namespace (a mounted nsfs file), not a left-over file."""
    return os.path.exists(path) and _is_mountpoint(path)


def list_names(netns_dir: str) -> list[str]:
    """Names under the dir, including half-gone ones (an unmounted file) for reconcile."""
    try:
        names = os.listdir(netns_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if _NAME_RE.match(n))


class InNetns:
    """Context manager: run the calling thread inside the namespace at `path`.

    Child processes started meanwhile inherit it. Only for short, synchronous work.
    """

    def __init__(self, path: str):
        self.path = path
        self._saved = -1

    def __enter__(self):
        self._saved = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise _oserror("setns", self.path)
        except BaseException:
            os.close(self._saved)
            raise
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc):
        try:
            if _libc.setns(self._saved, CLONE_NEWNET) != 0:
                raise _oserror("setns back", self.path)
        finally:
            os.close(self._saved)


def release_dir(netns_dir: str) -> None:
    """Undo the dir's self bind mount once no namespace is left in it (tests, shutdown)."""
    if list_names(netns_dir):
        return
    d = os.path.realpath(netns_dir)
    if _is_mountpoint(d) and _libc.umount2(d.encode(), MNT_DETACH) != 0:
        raise _oserror("unmount netns dir", netns_dir)
