"""Read a file of an image rootfs without following symlinks out of it.

An image is untrusted: /etc/passwd may be a symlink to ../../../../etc/shadow of
the host. Every component is resolved relative to the rootfs, like openat2's
RESOLVE_IN_ROOT."""
from __future__ import annotations

import os
import stat

MAX_LINKS = 40


def resolve_in_root(root: str, path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        try:
            st = os.lstat(candidate)
        except OSError:
            done.append(part)
            done.extend(p for p in parts if p not in ("", "."))
            return os.path.join(root, *done)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise OSError(f"{path}: too many levels of symbolic links")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(part)
    return os.path.join(root, *done)


def read_file(root: str, path: str, max_bytes: int = 1 << 20) -> bytes | None:
    real = resolve_in_root(root, path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, max_bytes)
    finally:
        os.close(fd)
