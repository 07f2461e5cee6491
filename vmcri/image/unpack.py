"""Unpack one OCI layer tar into a directory in overlayfs form.

`.wh.NAME` becomes a whiteout (char device 0:0 named NAME) and `.wh..wh..opq` the
`trusted.overlay.opaque=y` xattr, so a stack of these dirs works directly as
overlay lowerdirs. The diff_id (sha256 of the uncompressed tar) is checked while
streaming. Layers are hostile input: no member may write outside the target,
nothing is ever written through a symlink, and nothing outside the layer being built
is ever removed.

Whiteouts are refused unless well formed: a regular file named `.wh.NAME` whose NAME is
a real entry name (not empty, `.`, `..`, nor itself a whiteout name), or `.wh..wh..opq`
as a regular file. A whiteout name as a directory on the way to another entry and other
`.wh..wh.` names (AUFS metadata) are refused too.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import zlib

import zstandard

from vmcri.errors import VmcriError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_XATTR_PREFIX = "SCHILY.xattr."
_COPY_CHUNK = 1 << 20


class LayerError(VmcriError):
    """A layer that cannot be unpacked safely or does not match its diff_id."""
    pass


class _HashingReader(io.RawIOBase):
    """Pass-through reader that hashes what the tar reader consumes."""

    def __init__(self, raw):
        self.raw, self.sha = raw, hashlib.sha256()
        self.count = 0

    def readable(self):
        return True

    def readinto(self, buf):
        data = self.raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.sha.update(data)
        self.count += n
        return n

    def drain(self) -> None:
        """Hash the tail after the tar end marker too: diff_id covers the whole stream."""
        while True:
            data = self.raw.read(_COPY_CHUNK)
            if not data:
                return
            self.sha.update(data)
            self.count += len(data)


def _decompressed(f, peek: bytes):
    if peek[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if peek == b"\x28\xb5\x2f\xfd":
        # every frame: zstd:chunked and parallel encoders write many
        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    return f


def _safe_relpath(name: str) -> str | None:
    """Archive name -> normalised relative path, '' for the root; None if it escapes."""
    parts = []
    for comp in name.replace("\\", "/").split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            return None
        parts.append(comp)
    return "/".join(parts)


def _ensure_parents(root: str, rel: str) -> str:
    """Create missing parents of `rel` as dirs, refusing any symlink on the way."""
    cur = root
    for comp in rel.split("/")[:-1]:
        cur = os.path.join(cur, comp)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise LayerError(f"layer entry {rel!r}: parent {comp!r} is not a directory")
    return os.path.join(root, rel)


def _lookup(root: str, rel: str) -> str | None:
    """`rel` inside an unpacked lower layer, following no symlinks; None when absent
    or hidden there (whiteout, non-dir parent)."""
    cur = root
    parts = rel.split("/")
    for i, comp in enumerate(parts):
        cur = os.path.join(cur, comp)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return None
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            return None
        if last and not stat.S_ISREG(st.st_mode):
            return None
    return cur


def _inside(root: str, path: str) -> str:
    """`path` if it lies strictly below `root` (lexically); else LayerError. The last
    guard before anything is removed: the callers' names are already checked."""
    norm, top = os.path.normpath(path), os.path.normpath(root)
    if not norm.startswith(top + os.sep):
        raise LayerError(f"refusing to remove {path!r}: not inside the layer {root!r}")
    return norm


def _remove_existing(root: str, path: str, keep_dir: bool) -> None:
    path = _inside(root, path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if keep_dir:
            return
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _apply_meta(path: str, m: tarfile.TarInfo, is_link: bool) -> None:
    os.chown(path, m.uid, m.gid, follow_symlinks=False)
    for key, value in m.pax_headers.items():
        if key.startswith(_XATTR_PREFIX):
            name = key[len(_XATTR_PREFIX):]
            if name.startswith("trusted.overlay."):
                continue  # only whiteout markers may set overlay metadata
            raw = value.encode("utf-8", "surrogateescape")
            try:
                os.setxattr(path, name, raw, follow_symlinks=False)
            except OSError:
                pass  # e.g. user.* on a symlink; not worth failing the pull
    if not is_link:
        os.chmod(path, stat.S_IMODE(m.mode))
    os.utime(path, ns=(int(m.mtime * 1e9),) * 2, follow_symlinks=False)


def _check_blob(blob: _HashingReader, digest: str) -> None:
    got = "sha256:" + blob.sha.hexdigest()
    if got != digest:
        raise LayerError(f"blob {digest}: content hashes to {got}; nothing stored")


def unpack_layer(blob_path: str, dest: str, diff_id: str, lowers: list[str] = (),
                 blob_digest: str | None = None) -> int:
    """Unpack `blob_path` (tar, tar+gzip, tar+zstd) into the empty dir `dest`; `lowers` are the
    unpacked layers below it, top first (only hard links into them need those).
    With `blob_digest`, the compressed bytes are verified in the same pass.
    Returns the tar's uncompressed size; raises LayerError on a bad layer or digest."""
    dir_times: list[tuple[str, int]] = []
    with open(blob_path, "rb") as f:
        peek = f.read(4)
        f.seek(0)
        blob = _HashingReader(f)
        reader = _HashingReader(_decompressed(io.BufferedReader(blob, _COPY_CHUNK), peek))
        buffered = io.BufferedReader(reader, _COPY_CHUNK)
        try:
            with tarfile.open(fileobj=buffered, mode="r|", errorlevel=2) as tar:
                for m in tar:
                    _extract_member(tar, m, dest, dir_times, lowers)
            reader.drain()
            blob.drain()
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError, zlib.error,
                zstandard.ZstdError) as e:
            if blob_digest is not None:  # a bad digest explains a corrupt archive best
                blob.drain()
                _check_blob(blob, blob_digest)
            if isinstance(e, LayerError):
                raise
            raise LayerError(f"layer {diff_id}: corrupt archive: {e}") from e
    if blob_digest is not None:
        _check_blob(blob, blob_digest)
    got = "sha256:" + reader.sha.hexdigest()
    if got != diff_id:
        raise LayerError(f"layer diff_id mismatch: config says {diff_id}, content is {got}")
    for path, mtime in reversed(dir_times):
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
    return reader.count


def _check_whiteout_names(m: tarfile.TarInfo, rel: str, base: str) -> None:
    """LayerError for a whiteout that is malformed or out of place (see the module doc)."""
    if any(c.startswith(WHITEOUT_PREFIX) for c in rel.split("/")[:-1]):
        raise LayerError(f"layer entry {m.name!r}: a whiteout name is used as a directory")
    if not base.startswith(WHITEOUT_PREFIX):
        return
    if not m.isreg():
        raise LayerError(f"layer entry {m.name!r}: a whiteout must be a regular file")
    if base == OPAQUE_MARKER:
        return
    target = base[len(WHITEOUT_PREFIX):]
    if base.startswith(WHITEOUT_PREFIX * 2):
        raise LayerError(f"layer entry {m.name!r}: unsupported whiteout metadata "
                         f"(only {OPAQUE_MARKER} is known)")
    if target in ("", ".", ".."):
        raise LayerError(f"layer entry {m.name!r}: whiteout of {target!r} names no entry")


def _extract_member(tar: tarfile.TarFile, m: tarfile.TarInfo, dest: str,
                    dir_times: list, lowers: list[str]) -> None:
    rel = _safe_relpath(m.name)
    if rel is None:
        raise LayerError(f"layer entry {m.name!r} escapes the layer root")
    base = rel.rsplit("/", 1)[-1]
    if rel == "":
        if m.isdir():
            _apply_meta(dest, m, False)
            dir_times.append((dest, int(m.mtime * 1e9)))
        return
    _check_whiteout_names(m, rel, base)
    if base == OPAQUE_MARKER:
        parent = _ensure_parents(dest, rel).rsplit("/", 1)[0]
        os.setxattr(parent, OPAQUE_XATTR, b"y")
        return
    if base.startswith(WHITEOUT_PREFIX):
        target_rel = rel[: len(rel) - len(base)] + base[len(WHITEOUT_PREFIX):]
        path = _ensure_parents(dest, target_rel)
        _remove_existing(dest, path, keep_dir=False)
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        return
    path = _ensure_parents(dest, rel)
    if m.isdir():
        _remove_existing(dest, path, keep_dir=True)
        if not os.path.lexists(path):
            os.mkdir(path, 0o700)
        _apply_meta(path, m, False)
        dir_times.append((path, int(m.mtime * 1e9)))
        return
    _remove_existing(dest, path, keep_dir=False)
    if m.isreg():
        src = tar.extractfile(m)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)
        _apply_meta(path, m, False)
    elif m.issym():
        os.symlink(m.linkname, path)
        _apply_meta(path, m, True)
    elif m.islnk():
        target = _safe_relpath(m.linkname)
        if not target:
            raise LayerError(f"layer entry {m.name!r}: hard link target {m.linkname!r} escapes")
        target_path = os.path.join(dest, target)
        _ensure_parents(dest, target)
        if os.path.lexists(target_path):
            os.link(target_path, path, follow_symlinks=False)
            return
        # A link to a file of a lower layer: this layer gets its own copy of it.
        lower = next((p for p in (_lookup(d, target) for d in lowers) if p), None)
        if lower is None:
            raise LayerError(f"layer entry {m.name!r}: hard link target {m.linkname!r} is missing")
        shutil.copy2(lower, path, follow_symlinks=False)
        st = os.lstat(lower)
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    elif m.ischr() or m.isblk() or m.isfifo():
        kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
        dev = os.makedev(m.devmajor, m.devminor) if kind != stat.S_IFIFO else 0
        os.mknod(path, 0o600 | kind, dev)
        _apply_meta(path, m, False)
    else:
        raise LayerError(f"layer entry {m.name!r}: unsupported tar type {m.type!r}")
