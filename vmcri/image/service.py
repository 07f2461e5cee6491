"""ImageService: pull (mirrors, auth, indexes), list, status, remove, fs info.

Business logic only; vmcri.cri.images maps it to CRI protos. Errors are vmcri.errors.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from vmcri.config import Config
from vmcri.errors import (FailedPrecondition, InvalidArgument, NotFound, Unimplemented,
                          VmcriError)
from vmcri.image import reference
from vmcri.image.store import DigestMismatch, ImageRow, ImageStore
from vmcri.image.transport import Credentials, Endpoint, Session, endpoints_for
from vmcri.image.unpack import unpack_layer
from vmcri.store import Store

log = logging.getLogger("vmcri.image")

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
LAYER_TYPES = ("application/vnd.oci.image.layer.v1.tar",
               "application/vnd.oci.image.layer.v1.tar+gzip",
               "application/vnd.oci.image.layer.v1.tar+zstd",
               "application/vnd.docker.image.rootfs.diff.tar.gzip",
               "application/vnd.docker.image.rootfs.diff.tar")
PLATFORM = ("linux", "amd64")
MAX_LAYERS = 256
USAGE_CACHE_S = 5.0


@dataclass
class ImageConfig:
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    stop_signal: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    exposed_ports: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    @classmethod
    def from_oci(cls, config: dict) -> "ImageConfig":
        c = config.get("config") or {}
        return cls(entrypoint=list(c.get("Entrypoint") or []), cmd=list(c.get("Cmd") or []),
                   env=list(c.get("Env") or []), working_dir=c.get("WorkingDir") or "",
                   user=c.get("User") or "", stop_signal=c.get("StopSignal") or "",
                   labels=dict(c.get("Labels") or {}),
                   exposed_ports=sorted(c.get("ExposedPorts") or {}),
                   volumes=sorted(c.get("Volumes") or {}))


@dataclass
class Image:
    id: str
    repo_tags: list[str]
    repo_digests: list[str]
    size: int
    uid: int | None
    username: str
    config: ImageConfig
    layers: list[str]               # diff_ids, bottom -> top
    manifest_digest: str = ""
    pinned: bool = False
    raw_config: dict = field(default_factory=dict, repr=False)

    @property
    def chain_id(self) -> str:
        return chain_ids(self.layers)[-1] if self.layers else ""


def chain_ids(diff_ids: list[str]) -> list[str]:
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def user_of(user: str) -> tuple[int | None, str]:
    """Image config User -> (uid, username) as CRI wants: a numeric user gives uid only."""
    name = user.split(":", 1)[0]
    if not name:
        return None, ""
    return (int(name), "") if name.isdigit() else (None, name)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise VmcriError(f"{what}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise VmcriError(f"{what}: expected a JSON object")
    return doc


def _descriptor(d, what: str) -> dict:
    if not isinstance(d, dict) or not isinstance(d.get("digest"), str):
        raise VmcriError(f"{what}: descriptor without a digest")
    reference.validate_digest(d["digest"], what)
    if not isinstance(d.get("size", 0), int) or d.get("size", 0) < 0:
        raise VmcriError(f"{what}: bad size")
    return d


class ImageService:
    def __init__(self, cfg: Config, store: Store, skopeo: str = "skopeo"):
        self.cfg, self.skopeo = cfg, skopeo
        self.store = ImageStore(cfg.image_store_dir, store)
        self.store.recover()
        self._inflight: dict[tuple, Future] = {}
        self._inflight_lock = threading.Lock()
        self._layer_locks: dict[str, threading.Lock] = {}
        self.pulls_done = 0          # pulls that really ran (not joined); for tests/metrics
        self.last_phases: dict[str, float] = {}   # seconds per phase of the last pull
        self._usage: tuple[float, int, tuple[int, int]] | None = None
        self._writable_usage: tuple[float, tuple[int, int]] | None = None
        # fn(image_id) -> ids of containers whose rootfs uses it; set by the daemon
        self.users_of = None

    # -- pull ---------------------------------------------------------------------
    def pull(self, ref: str, auth: dict | None = None, sandbox_config=None) -> str:
        """Pull `ref`; returns the image id (sha256:<config digest>)."""
        r = reference.parse(ref)
        creds = Credentials.from_auth(auth)
        key = (str(r), creds.fingerprint() if creds else "")
        with self._inflight_lock:
            fut = self._inflight.get(key)
            owner = fut is None
            if owner:
                fut = self._inflight[key] = Future()
        if not owner:
            return fut.result()
        try:
            image_id = self._pull(r, creds)
            fut.set_result(image_id)
            return image_id
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self._inflight_lock:
                self._inflight.pop(key, None)

    def _pull(self, r: reference.Reference, creds: Credentials | None) -> str:
        started = time.monotonic()
        eps = endpoints_for(self.cfg, r)
        allowed = [ep.host for ep in eps if ep.credentials]  # never a mirror not opted in
        session = Session(creds, allowed, self.store.staging_dir,
                          skopeo=self.skopeo, timeout=self.cfg.pull_timeout_s)
        failures: list[tuple[Endpoint, VmcriError]] = []
        try:
            for ep in eps:
                try:
                    image_id = self._pull_from(session, ep, r)
                    self.pulls_done += 1
                    log.info("pulled %s from %s as %s in %.2fs", r, ep, image_id,
                             time.monotonic() - started)
                    return image_id
                except (InvalidArgument, Unimplemented):
                    raise
                except VmcriError as e:
                    log.info("pull %s from %s failed: %s", r, ep, e)
                    failures.append((ep, e))
        finally:
            session.close()
        if len(failures) == 1:
            raise failures[0][1]
        last = failures[-1][1]
        raise type(last)(f"pull {r}: every endpoint failed: " +
                         "; ".join(f"[{ep}] {e}" for ep, e in failures))

    def _fetch_manifest(self, session: Session, ep: Endpoint, r: reference.Reference,
                        digest: str | None) -> tuple[bytes, str]:
        raw = session.manifest(ep, r, "@" + digest if digest else ":" + r.tag)
        got = _sha256(raw)
        if digest and got != digest:
            raise DigestMismatch(f"manifest {r.name}@{digest}: registry {ep} served content "
                                 f"hashing to {got}")
        return raw, got

    def _pull_from(self, session: Session, ep: Endpoint, r: reference.Reference) -> str:
        t0 = time.monotonic()
        top_raw, top_digest = self._fetch_manifest(session, ep, r, r.digest)
        doc = _json(top_raw, f"manifest of {r}")
        media = doc.get("mediaType", "")
        if media in INDEX_TYPES or (not media and "manifests" in doc):
            chosen = self._pick_platform(doc, r)
            m_raw, m_digest = self._fetch_manifest(session, ep, r, chosen)
            manifest = _json(m_raw, f"manifest {r.name}@{chosen}")
        else:
            m_raw, m_digest, manifest = top_raw, top_digest, doc
        m_media = manifest.get("mediaType", "")
        if m_media and m_media not in MANIFEST_TYPES:
            raise Unimplemented(f"image {r}: manifest media type {m_media!r} is not supported "
                                "(Docker schema 2 and OCI are)")
        config_desc = _descriptor(manifest.get("config"), f"image {r}: config")
        layer_descs = manifest.get("layers")
        if not isinstance(layer_descs, list) or len(layer_descs) > MAX_LAYERS:
            raise VmcriError(f"image {r}: manifest has no valid layers list")
        for i, d in enumerate(layer_descs):
            _descriptor(d, f"image {r}: layer {i}")
            if d.get("mediaType", LAYER_TYPES[1]) not in LAYER_TYPES:
                raise Unimplemented(f"image {r}: layer {i} media type {d.get('mediaType')!r} "
                                    "is not supported")
        image_id = config_desc["digest"]
        t1 = time.monotonic()
        pins = [image_id, *(d["digest"] for d in layer_descs)]
        self.store.pin(pins)
        staging = self.store.new_staging("pull-")
        failed = True
        try:
            config_raw, staged = self._fetch_blobs(session, ep, r, m_digest, config_desc,
                                                   layer_descs, staging)
            t2 = time.monotonic()
            config = _json(config_raw, f"image config {image_id}")
            diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
            if len(diff_ids) != len(layer_descs):
                raise VmcriError(f"image {r}: config lists {len(diff_ids)} diff_ids for "
                                 f"{len(layer_descs)} layers")
            self.store.pin(diff_ids)
            try:
                layers = []
                for i, (desc, diff_id) in enumerate(zip(layer_descs, diff_ids)):
                    reference.validate_digest(diff_id, f"image {r}: diff_id")
                    lowers = [self.store.layer_path(d) for d in reversed(diff_ids[:i])]
                    self._ensure_layer(desc, diff_id, lowers, staged.get(desc["digest"]))
                    layers.append({"digest": desc["digest"], "diff_id": diff_id,
                                   "size": desc.get("size", 0),
                                   "media_type": desc.get("mediaType", "")})
                size = len(config_raw) + sum(layer["size"] for layer in layers)
                refs = [(f"{r.name}@{top_digest}", "digest")]
                if r.tag and not r.digest:
                    refs.append((r.tagged, "tag"))
                self.store.put_image(image_id, m_digest, m_raw, config_raw, layers, size, refs)
                self.last_phases = {"manifest": t1 - t0, "blobs": t2 - t1,
                                    "unpack": time.monotonic() - t2}
                log.info("pull %s phases: %s", r, ", ".join(
                    f"{k} {v:.3f}s" for k, v in self.last_phases.items()))
            finally:
                self.store.unpin(diff_ids)
            failed = False
        finally:
            self.store.unpin(pins)
            shutil.rmtree(staging, ignore_errors=True)
            if failed:
                self.store.gc()  # blobs/layers verified before the failure belong to no image
        return image_id

    def _pick_platform(self, index: dict, r: reference.Reference) -> str:
        seen = []
        for d in index.get("manifests") or []:
            p = (d or {}).get("platform") or {}
            seen.append(f"{p.get('os')}/{p.get('architecture')}")
            if (p.get("os"), p.get("architecture")) == PLATFORM:
                return _descriptor(d, f"image {r}: index entry")["digest"]
        raise NotFound(f"image {r}: the index has no {'/'.join(PLATFORM)} image "
                       f"(it has: {', '.join(seen) or 'nothing'})")

    def _fetch_blobs(self, session: Session, ep: Endpoint, r: reference.Reference,
                     m_digest: str, config_desc: dict, layer_descs: list[dict],
                     staging: str) -> tuple[bytes, dict[str, str]]:
        """Fetch the layer blobs the store lacks into staging; returns the verified config
        bytes and {digest: staged path} of the (not yet verified) layer blobs."""
        config_digest = config_desc["digest"]
        staged: dict[str, str] = {}
        missing = [d for d in layer_descs if not self.store.has_blob(d["digest"])]
        if missing:
            shared = os.path.join(staging, "blobs")
            os.makedirs(os.path.join(shared, "sha256"))
            # Blobs we hold are offered to skopeo as hard links, so it skips fetching them.
            for digest in {d["digest"] for d in [config_desc, *layer_descs]}:
                if self.store.has_blob(digest):
                    os.link(self.store.blob_path(digest),
                            os.path.join(shared, "sha256", digest.split(":")[1]))
            session.copy_blobs(ep, r, m_digest, shared, os.path.join(staging, "layout"))
            for d in missing:
                src = os.path.join(shared, "sha256", d["digest"].split(":")[1])
                if not os.path.isfile(src):
                    raise VmcriError(f"image {r}: skopeo did not deliver layer {d['digest']}")
                if d.get("size") is not None and os.path.getsize(src) != d["size"]:
                    raise DigestMismatch(f"blob {d['digest']}: size {os.path.getsize(src)} does "
                                         f"not match descriptor size {d['size']}; nothing stored")
                staged[d["digest"]] = src
            fetched_config = os.path.join(shared, "sha256", config_digest.split(":")[1])
            if not self.store.has_blob(config_digest) and os.path.isfile(fetched_config):
                self.store.add_blob_file(config_digest, fetched_config, config_desc.get("size"))
        if self.store.has_blob(config_digest):
            with open(self.store.blob_path(config_digest), "rb") as f:
                return f.read(), staged
        # Docker schema 2 sources reach the OCI layout converted, so the original config
        # (whose digest is the image id) is fetched as served.
        raw = session.config(ep, r, m_digest)
        self.store.add_blob_bytes(config_digest, raw)
        return raw, staged

    def _ensure_layer(self, desc: dict, diff_id: str, lowers: list[str],
                      staged: str | None) -> None:
        """Unpack the layer unless present. A freshly `staged` blob is verified while it
        is unpacked (one read) and enters the store only if both digests match."""
        digest = desc["digest"]
        with self._inflight_lock:
            lock = self._layer_locks.setdefault(diff_id, threading.Lock())
        with lock:
            if staged and self.store.has_blob(digest):
                staged = None  # another pull stored it meanwhile
            if self.store.has_layer(diff_id):
                if staged:
                    self.store.add_blob_file(digest, staged, desc.get("size"))
                return
            work = self.store.new_staging("layer-")
            try:
                dest = os.path.join(work, "fs")
                os.mkdir(dest, 0o755)
                src = staged or self.store.blob_path(digest)
                tar_size = unpack_layer(src, dest, diff_id, lowers,
                                        blob_digest=digest if staged else None)
                if staged:
                    self.store.add_blob_file(digest, staged, desc.get("size"), verified=True)
                self.store.commit_layer(diff_id, digest, dest, tar_size)
            finally:
                shutil.rmtree(work, ignore_errors=True)

    # -- queries --------------------------------------------------------------------
    def _to_image(self, row: ImageRow) -> Image:
        cfg = ImageConfig.from_oci(row.config)
        uid, username = user_of(cfg.user)
        return Image(id=row.id,
                     repo_tags=[ref for ref, kind in row.refs if kind == "tag"],
                     repo_digests=[ref for ref, kind in row.refs if kind == "digest"],
                     size=row.size, uid=uid, username=username, config=cfg,
                     layers=[layer["diff_id"] for layer in row.layers],
                     manifest_digest=row.manifest_digest, raw_config=row.config)

    def _find_id(self, ref: str) -> str | None:
        if reference.is_image_id(ref):
            image_id = ref if ref.startswith("sha256:") else "sha256:" + ref
            return image_id if self.store.get_image(image_id) else None
        r = reference.parse(ref)
        if r.digest:
            found = self.store.image_id_for_ref(f"{r.name}@{r.digest}")
            if found:
                return found
            for row in self.store.all_images():
                if row.manifest_digest == r.digest and any(
                        x.startswith(r.name + "@") or x.startswith(r.name + ":") for x, _ in row.refs):
                    return row.id
            return None
        found = self.store.image_id_for_ref(r.tagged)
        if found is None and len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref):
            matches = self.store.image_ids_with_prefix(ref)
            found = matches[0] if len(matches) == 1 else None
        return found

    def resolve(self, ref: str) -> Image:
        """The image `ref` names (id, tag or digest reference); NotFound otherwise."""
        image_id = self._find_id(ref)
        row = self.store.get_image(image_id) if image_id else None
        if row is None:
            raise NotFound(f"image {ref!r} not found")
        return self._to_image(row)

    def status(self, ref: str) -> Image | None:
        try:
            return self.resolve(ref)
        except NotFound:
            return None

    def list(self, filter_ref: str | None = None) -> list[Image]:
        if filter_ref:
            image = self.status(filter_ref)
            return [image] if image else []
        return [self._to_image(row) for row in self.store.all_images()]

    def verbose_info(self, image: Image) -> dict[str, str]:
        info = {"id": image.id, "manifestDigest": image.manifest_digest,
                "imageSpec": image.raw_config, "layers": image.layers,
                "chainID": image.chain_id, "layerDirs": self.layer_dirs(image)}
        return {"info": json.dumps(info, sort_keys=True)}

    def layer_dirs(self, image: Image) -> list[str]:
        """Unpacked layer dirs, bottom -> top (overlay lowerdir wants them reversed)."""
        dirs = [self.store.layer_path(d) for d in image.layers]
        for d in dirs:
            if not os.path.isdir(d):
                raise FailedPrecondition(f"image {image.id}: layer dir {d} is missing")
        return dirs

    def remove(self, ref: str) -> None:
        """Remove the image `ref` names with all its tags; unknown images are fine."""
        image_id = self._find_id(ref)
        if image_id is None:
            return
        users = self.users_of(image_id) if self.users_of is not None else []
        if users:
            # Its layers are the lower dirs of live overlay mounts (CRI-O refuses too).
            raise FailedPrecondition(f"image {image_id} is in use by container(s) "
                                     f"{', '.join(u[:12] for u in users[:5])}")
        self.store.delete_image(image_id)
        log.info("removed image %s (asked as %s)", image_id, ref)

    def fs_info(self) -> dict:
        """Bytes and inodes under the image store. The walk is cached for USAGE_CACHE_S
        unless an image was added or removed since (the kubelet polls this)."""
        now = time.monotonic()
        key = self.store.generation
        if self._usage is None or self._usage[1] != key or now - self._usage[0] > USAGE_CACHE_S:
            self._usage = (now, key, self.store.usage())
        used, inodes = self._usage[2]
        return {"mountpoint": self.cfg.image_store_dir, "used_bytes": used,
                "inodes_used": inodes, "timestamp_ns": time.time_ns()}

    def writable_fs_info(self) -> dict:
        """Bytes and inodes of the containers' writable layers (their overlay upper dirs,
        in each sandbox's host-only state dir), as containerd 1.7+ and CRI-O report
        ImageFsInfo.container_filesystems. Cached like fs_info."""
        from vmcri.image.store import tree_usage
        now = time.monotonic()
        if self._writable_usage is None or now - self._writable_usage[0] > USAGE_CACHE_S:
            uppers = glob.glob(os.path.join(glob.escape(self.cfg.sandboxes_dir),
                                            "*", "containers", "*", "upper"))
            self._writable_usage = (now, tree_usage(sorted(uppers)))
        used, inodes = self._writable_usage[1]
        return {"mountpoint": self.cfg.sandboxes_dir, "used_bytes": used,
                "inodes_used": inodes, "timestamp_ns": time.time_ns()}
