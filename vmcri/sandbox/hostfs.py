"""Host-side files and mounts of a sandbox: the shared 9p dir and the etc files."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
MS_BIND, MS_SHARED, MS_REC, MNT_DETACH = 0x1000, 1 << 20, 0x4000, 2


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
    if _libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(),
                   ctypes.c_ulong(flags), data and data.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {src} on {target}: {os.strerror(e)}")


def is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False


def make_shared_dir(path: str) -> None:
    """Bind-mount `path` on itself and mark it shared *before* qemu starts: qemu runs
    in a private mount namespace, and only a shared mount lets container rootfs
    mounts made later reach the guest (HOST-NOTES §4)."""
    os.makedirs(path, mode=0o711, exist_ok=True)
    if not is_mountpoint(path):
        _mount(path, path, None, MS_BIND)
    _mount(None, path, None, MS_SHARED)


def prepare_vm_dirs(paths, undo) -> None:
    """State dir, run dir and the shared 9p dir of one VM (a SandboxPaths), each with
    its undo registered on the ExitStack `undo`."""
    os.makedirs(paths.state_dir, mode=0o700)
    undo.callback(shutil.rmtree, paths.state_dir, ignore_errors=True)
    os.makedirs(paths.run_dir, mode=0o700, exist_ok=True)
    undo.callback(shutil.rmtree, paths.run_dir, ignore_errors=True)
    make_shared_dir(paths.share_dir)
    undo.callback(unmount_tree, paths.share_dir)


def unmount_tree(path: str) -> None:
    """Lazily unmount `path` and everything mounted under it; no error if nothing is."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    prefix = path.rstrip("/") + "/"
    for mp in sorted((p for p in points if p == path or p.startswith(prefix)),
                     key=len, reverse=True):
        if _libc.umount2(mp.encode(), MNT_DETACH) != 0:
            e = ctypes.get_errno()
            if e not in (errno.EINVAL, errno.ENOENT):
                raise OSError(e, f"umount {mp}: {os.strerror(e)}")


def console_tail(path: str, max_bytes: int = 2048) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return "(no console output)"


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
