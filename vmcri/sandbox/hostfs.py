"""Host-side files and mounts of a sandbox: the shared 9p dir and the etc files.

The guest is hostile and has root, and qemu (root, 9p passthrough) does what it asks. So
the tree the host writes (`share_dir`: containers/<id>/, config.json, mounts/N) is never
exported itself: the guest gets `guest_export`, a read-only, nosuid, nodev bind of it.
The rootfs overlays and hostPath binds the host mounts under `share_dir` reach the guest
through mount propagation and keep their own flags; nothing else there is writable."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
import subprocess

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
MS_BIND, MS_SHARED, MS_REC, MNT_DETACH = 0x1000, 1 << 20, 0x4000, 2
UMOUNT_NOFOLLOW = 8
EXPORT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV
log = logging.getLogger(__name__)


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
    if _libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(),
                   ctypes.c_ulong(flags), data and data.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {src} on {target}: {os.strerror(e)}")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table() -> list[dict]:
    """/proc/self/mountinfo as dicts: id, parent, point, options (per-mount flags)."""
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            p = line.split()
            rows.append({"id": int(p[0]), "parent": int(p[1]), "point": _unescape(p[4]),
                         "options": p[5].split(",")})
    return rows


def mounts_under(path: str) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    prefix = path.rstrip("/") + "/"
    try:
        points = {m["point"] for m in mount_table()}
    except OSError:
        return []
    return sorted((p for p in points if p == path or p.startswith(prefix)), key=len, reverse=True)


def is_mountpoint(path: str) -> bool:
    try:
        return any(m["point"] == path for m in mount_table())
    except OSError:
        return False


def make_shared_dir(path: str) -> None:
    """Bind-mount `path` on itself and mark it shared *before* qemu starts: qemu runs
    in a private mount namespace (libvirt's), and on this host all mounts are private,
    so only a shared mount lets the rootfs mounts made later reach the guest."""
    os.makedirs(path, mode=0o711, exist_ok=True)
    if not is_mountpoint(path):
        _mount(path, path, None, MS_BIND)
    _mount(None, path, None, MS_SHARED)


def make_guest_export(share_dir: str, export_dir: str) -> None:
    """`export_dir`: a read-only, nosuid, nodev bind of the shared `share_dir`, in the
    same peer group, so that later mounts under `share_dir` show there (and in qemu).
    A read-only bind stops root too: the guest cannot rename, plant or delete anything
    of the skeleton the host writes."""
    os.makedirs(export_dir, mode=0o711, exist_ok=True)
    if not is_mountpoint(export_dir):
        _mount(share_dir, export_dir, None, MS_BIND)
    _mount(None, export_dir, None, MS_BIND | MS_REMOUNT | EXPORT_FLAGS)
    opts = next((m["options"] for m in mount_table() if m["point"] == export_dir), [])
    if not {"ro", "nosuid", "nodev"} <= set(opts):
        raise OSError(errno.EPERM, f"{export_dir}: the guest export is not read-only ({opts})")


def prepare_vm_dirs(paths, undo) -> None:
    """State dir, run dir, the host's share dir and the guest's read-only export of it
    (a SandboxPaths), each with its undo registered on the ExitStack `undo`."""
    os.makedirs(paths.state_dir, mode=0o700)
    undo.callback(remove_tree, paths.state_dir, True)
    os.makedirs(paths.run_dir, mode=0o700, exist_ok=True)
    undo.callback(remove_tree, paths.run_dir, True)
    make_shared_dir(paths.share_dir)
    undo.callback(unmount_tree, paths.share_dir)
    make_guest_export(paths.share_dir, paths.guest_export)
    undo.callback(unmount_tree, paths.guest_export)


def unmount_tree(path: str) -> None:
    """Lazily unmount `path` and everything mounted under it; no error if nothing is.
    The points come from mountinfo and lie in host-only dirs; UMOUNT_NOFOLLOW all the same."""
    for mp in mounts_under(path):
        if _libc.umount2(mp.encode(), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
            e = ctypes.get_errno()
            if e not in (errno.EINVAL, errno.ENOENT):
                raise OSError(e, f"umount {mp}: {os.strerror(e)}")


def remove_tree(path: str, ignore_errors: bool = False) -> None:
    """Delete `path` without following symlinks and without entering any mount: a
    hostPath bind or an overlay still mounted under it is refused, never emptied
    (a bind from the same filesystem has the same st_dev, so mountinfo is the check).
    `rm --one-file-system` walks with fds (fts), so a deep guest-made tree is fine."""
    try:
        left = mounts_under(path)
        if left:
            raise OSError(errno.EBUSY, f"{path}: still has mounts under it: {left[:3]}")
        if not os.path.lexists(path):
            return
        r = subprocess.run(["rm", "-rf", "--one-file-system", "--", path],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise OSError(errno.EIO, f"rm {path}: {r.stderr.strip()[:300]}")
    except (OSError, subprocess.SubprocessError) as e:
        if not ignore_errors:
            raise
        log.warning("left %s in place: %s", path, e)


# -- reading inside a guest-writable tree ------------------------------------------
SYS_OPENAT2 = 437  # x86_64 (and every arch since 5.6 shares the number)
RESOLVE_NO_MAGICLINKS, RESOLVE_IN_ROOT = 0x02, 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=0, resolve=resolve)
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), path.encode(),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"openat2 {path}: {os.strerror(e)}")
    return fd


def read_in_root(root: str, path: str, max_bytes: int = 1 << 20) -> bytes | None:
    """A regular file of the tree `root`, every component resolved by the kernel inside
    it (symlinks and .. never leave it, even if the guest swaps them meanwhile); None if
    there is none. `root` itself must be a host-made path."""
    try:
        rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fd = openat2(rootfd, path.lstrip("/") or ".", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY,
                     RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    except OSError:
        return None
    finally:
        os.close(rootfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, max_bytes)
    finally:
        os.close(fd)


def console_tail(path: str, max_bytes: int = 2048) -> str:
    """The console's last bytes. virtlogd rotates console.log to console.log.0 at its
    max_size, so a short current file is topped up from the newest backup."""
    chunks = []
    want = max_bytes
    for p in (path, path + ".0"):
        try:
            with open(p, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - want))
                data = f.read(want)
        except OSError:
            continue
        chunks.insert(0, data)
        want -= len(data)
        if want <= 0:
            break
    if not chunks:
        return "(no console output)"
    return b"".join(chunks).decode("utf-8", "replace")


def resolv_conf(servers, searches, options) -> str:
    lines = []
    if searches:
        lines.append("search " + " ".join(searches))
    lines += [f"nameserver {s}" for s in servers]
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + ("\n" if lines else "")


def etc_hosts(hostname: str, ips: list[str]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             "fe00::0\tip6-localnet", "fe00::0\tip6-mcastprefix",
             "fe00::1\tip6-allnodes", "fe00::2\tip6-allrouters"]
    lines += [f"{ip}\t{hostname}" for ip in ips]
    if not ips:
        lines.append(f"127.0.1.1\t{hostname}")
    return "\n".join(lines) + "\n"
