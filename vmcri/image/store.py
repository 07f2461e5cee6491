"""Content-addressed image store: blobs, unpacked layers and image rows.

On disk, under cfg.image_store_dir:
  blobs/sha256/<hex>   verified compressed blobs (layers and configs)
  layers/<hex>/        unpacked layer (overlay form), keyed by diff_id
  staging/             per-pull scratch; emptied at start, so a killed pull leaves nothing

Files appear by atomic rename only after verification; the image row is written last,
so an image is visible only when everything it needs is in place. Blobs and layers are
shared between images and garbage-collected by reference from the image rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

from vmcri.errors import VmcriError
from vmcri.store import Store, dumps

SCHEMA = """
CREATE TABLE IF NOT EXISTS image_images (
  id TEXT PRIMARY KEY,               -- sha256:<config digest>
  manifest_digest TEXT NOT NULL,
  manifest TEXT NOT NULL,            -- raw manifest JSON as served
  config TEXT NOT NULL,              -- raw image config JSON as served
  layers TEXT NOT NULL,              -- JSON [{digest, diff_id, size, media_type}], bottom -> top
  size INTEGER NOT NULL,
  created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS image_refs (
  ref TEXT PRIMARY KEY,              -- normalised name:tag or name@digest
  image_id TEXT NOT NULL REFERENCES image_images(id) ON DELETE CASCADE,
  kind TEXT NOT NULL CHECK (kind IN ('tag', 'digest'))
);
CREATE INDEX IF NOT EXISTS image_refs_by_image ON image_refs(image_id);
CREATE TABLE IF NOT EXISTS image_layers (
  diff_id TEXT PRIMARY KEY,
  blob_digest TEXT NOT NULL,
  tar_size INTEGER NOT NULL
);
"""


TMP_PREFIX = ".tmp-"


class DigestMismatch(VmcriError):
    pass


@dataclass
class ImageRow:
    id: str
    manifest_digest: str
    manifest: dict
    config: dict
    layers: list[dict]
    size: int
    created_ns: int
    refs: list[tuple[str, str]]     # (ref, kind)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def hex_of(digest: str) -> str:
    return digest.split(":", 1)[1]


class ImageStore:
    def __init__(self, root: str, db: Store):
        self.root, self.db = root, db
        self.blobs_dir = os.path.join(root, "blobs", "sha256")
        self.layers_dir = os.path.join(root, "layers")
        self.staging_dir = os.path.join(root, "staging")
        for d in (self.blobs_dir, self.layers_dir, self.staging_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        db.ensure_schema(SCHEMA)
        # digests in use by pulls in flight; GC must not remove them
        self._pinned: dict[str, int] = {}
        self._lock = threading.RLock()
        self.generation = 0  # bumped whenever images come or go (usage caches key on it)

    # -- start-up -------------------------------------------------------------
    def recover(self) -> None:
        """Drop leftovers of pulls that died: staging dirs and unreferenced files."""
        for name in os.listdir(self.staging_dir):
            shutil.rmtree(os.path.join(self.staging_dir, name), ignore_errors=True)
        self.gc(drop_partial=True)

    def new_staging(self, prefix: str) -> str:
        return tempfile.mkdtemp(prefix=prefix, dir=self.staging_dir)

    # -- pins -------------------------------------------------------------------
    def pin(self, digests: list[str]) -> None:
        with self._lock:
            for d in digests:
                self._pinned[d] = self._pinned.get(d, 0) + 1

    def unpin(self, digests: list[str]) -> None:
        with self._lock:
            for d in digests:
                n = self._pinned.get(d, 0) - 1
                if n <= 0:
                    self._pinned.pop(d, None)
                else:
                    self._pinned[d] = n

    # -- blobs ------------------------------------------------------------------
    def blob_path(self, digest: str) -> str:
        return os.path.join(self.blobs_dir, hex_of(digest))

    def has_blob(self, digest: str) -> bool:
        return os.path.isfile(self.blob_path(digest))

    def add_blob_file(self, digest: str, src: str, expected_size: int | None = None,
                      verified: bool = False) -> str:
        """Verify `src` against `digest` (unless the caller just did) and move it into
        the store (atomic rename)."""
        dst = self.blob_path(digest)
        if os.path.isfile(dst):
            return dst
        size = os.path.getsize(src)
        if expected_size is not None and size != expected_size:
            raise DigestMismatch(f"blob {digest}: size {size} does not match descriptor size "
                                 f"{expected_size}")
        got = digest if verified else sha256_file(src)
        if got != digest:
            raise DigestMismatch(f"blob {digest}: content hashes to {got}; nothing stored")
        tmp = os.path.join(self.blobs_dir, f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}")
        if os.stat(src).st_nlink > 1:
            shutil.copyfile(src, tmp)  # never move a file someone else also links to
        else:
            os.rename(src, tmp)
        os.chmod(tmp, 0o600)
        os.rename(tmp, dst)
        return dst

    def add_blob_bytes(self, digest: str, data: bytes) -> str:
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != digest:
            raise DigestMismatch(f"blob {digest}: content hashes to {got}; nothing stored")
        dst = self.blob_path(digest)
        if not os.path.isfile(dst):
            fd, tmp = tempfile.mkstemp(dir=self.blobs_dir, prefix=TMP_PREFIX)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.rename(tmp, dst)
        return dst

    # -- layers -----------------------------------------------------------------
    def layer_path(self, diff_id: str) -> str:
        return os.path.join(self.layers_dir, hex_of(diff_id))

    def has_layer(self, diff_id: str) -> bool:
        return self.db.query_one("SELECT 1 FROM image_layers WHERE diff_id=?", (diff_id,)) \
            is not None and os.path.isdir(self.layer_path(diff_id))

    def commit_layer(self, diff_id: str, blob_digest: str, unpacked_dir: str, tar_size: int) -> None:
        dst = self.layer_path(diff_id)
        if os.path.isdir(dst):
            shutil.rmtree(unpacked_dir, ignore_errors=True)
        else:
            os.rename(unpacked_dir, dst)
        self.db.execute("INSERT OR REPLACE INTO image_layers(diff_id, blob_digest, tar_size) "
                        "VALUES (?,?,?)", (diff_id, blob_digest, tar_size))

    # -- images -----------------------------------------------------------------
    def put_image(self, image_id: str, manifest_digest: str, manifest_raw: bytes,
                  config_raw: bytes, layers: list[dict], size: int,
                  refs: list[tuple[str, str]]) -> None:
        """Write the image row and point `refs` at it (moving them off older images)."""
        with self.db.tx() as conn:
            conn.execute(
                "INSERT INTO image_images(id, manifest_digest, manifest, config, layers, size, "
                "created_ns) VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
                "manifest_digest=excluded.manifest_digest, manifest=excluded.manifest",
                (image_id, manifest_digest, manifest_raw.decode(), config_raw.decode(),
                 dumps(layers), size, time.time_ns()))
            for ref, kind in refs:
                conn.execute("INSERT OR REPLACE INTO image_refs(ref, image_id, kind) VALUES (?,?,?)",
                             (ref, image_id, kind))
        self.generation += 1

    def _row(self, r) -> ImageRow:
        refs = [(x["ref"], x["kind"]) for x in self.db.query(
            "SELECT ref, kind FROM image_refs WHERE image_id=? ORDER BY ref", (r["id"],))]
        return ImageRow(r["id"], r["manifest_digest"], json.loads(r["manifest"]),
                        json.loads(r["config"]), json.loads(r["layers"]), r["size"],
                        r["created_ns"], refs)

    def get_image(self, image_id: str) -> ImageRow | None:
        r = self.db.query_one("SELECT * FROM image_images WHERE id=?", (image_id,))
        return self._row(r) if r else None

    def image_id_for_ref(self, ref: str) -> str | None:
        r = self.db.query_one("SELECT image_id FROM image_refs WHERE ref=?", (ref,))
        return r["image_id"] if r else None

    def image_ids_with_prefix(self, hex_prefix: str) -> list[str]:
        return [r["id"] for r in self.db.query(
            "SELECT id FROM image_images WHERE id LIKE ?", (f"sha256:{hex_prefix}%",))]

    def all_images(self) -> list[ImageRow]:
        return [self._row(r) for r in self.db.query("SELECT * FROM image_images ORDER BY id")]

    def delete_image(self, image_id: str) -> bool:
        with self.db.tx() as conn:
            changed = conn.execute("DELETE FROM image_images WHERE id=?", (image_id,)).rowcount
        self.gc()
        self.generation += 1
        return changed > 0

    # -- garbage collection -------------------------------------------------------
    def gc(self, drop_partial: bool = False) -> None:
        """Remove blobs and layers no image row references (and no pull in flight pins).
        `drop_partial` also removes half-written blob files (only safe with no pulls running)."""
        with self._lock:
            keep_blobs, keep_layers = set(), set()
            for r in self.db.query("SELECT id, layers FROM image_images"):
                keep_blobs.add(r["id"])
                for layer in json.loads(r["layers"]):
                    keep_blobs.add(layer["digest"])
                    keep_layers.add(layer["diff_id"])
            pinned = set(self._pinned)
            for name in os.listdir(self.blobs_dir):
                digest = "sha256:" + name
                partial = name.startswith(TMP_PREFIX)
                if (drop_partial and partial) or (not partial and digest not in keep_blobs
                                                  and digest not in pinned):
                    os.unlink(os.path.join(self.blobs_dir, name))
            stale = [r["diff_id"] for r in self.db.query("SELECT diff_id FROM image_layers")
                     if r["diff_id"] not in keep_layers and r["diff_id"] not in pinned]
            for diff_id in stale:
                self.db.execute("DELETE FROM image_layers WHERE diff_id=?", (diff_id,))
            known = {hex_of(r["diff_id"]) for r in self.db.query("SELECT diff_id FROM image_layers")}
            for name in os.listdir(self.layers_dir):
                if name not in known and "sha256:" + name not in pinned:
                    shutil.rmtree(os.path.join(self.layers_dir, name), ignore_errors=True)

    # -- usage --------------------------------------------------------------------
    def usage(self) -> tuple[int, int]:
        """(bytes, inodes) used under the store root, each inode counted once."""
        return tree_usage([self.root])


def tree_usage(roots: list[str]) -> tuple[int, int]:
    """(bytes, inodes) used under `roots` (each counted too), each inode once. Never
    follows a symlink: the trees may hold guest-written files."""
    seen, used, inodes = set(), 0, 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames, ""] if dirpath == root else [*dirnames, *filenames]:
                path = os.path.join(dirpath, name) if name else dirpath
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                used += st.st_blocks * 512
                inodes += 1
    return used, inodes
