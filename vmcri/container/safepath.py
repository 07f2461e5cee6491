"""Read a file of an image rootfs or layer without following symlinks out of it.

An image is untrusted: /etc/passwd may be a symlink to ../../../../etc/shadow of the host.
The kernel resolves every component inside the root (openat2 RESOLVE_IN_ROOT, in
vmcri.sandbox.hostfs), so a link swapped meanwhile cannot lead out either."""
from __future__ import annotations

from vmcri.sandbox import hostfs


def read_file(root: str, path: str, max_bytes: int = 1 << 20) -> bytes | None:
    """A regular file's first `max_bytes`, or None when there is none inside `root`."""
    return hostfs.read_in_root(root, path, max_bytes)
