"""VM templates: a booted, idle guest saved once, restored as each new pod VM.

Mechanism (measured, bench/README.md "Templates"): libvirt's own save image. A template
VM boots with the smallest shape (1 vCPU, min_memory_mib, hot-pluggable up to the maxima),
its agent answers, and `virDomainSave` writes its state. A clone rewrites the image's domain
XML in place (saveimage.py: new name, UUID, VM generation id and per-VM paths, all derived
from the clone's id, which has the template id's length) and restores it: ~0.8 s against a
~8 s boot under TCG. The guest then gets its new identity from the agent's `clone_init`
(clock, RNG reseed, 9p share mount) and is grown to the pod's shape by hotplug.

- QEMU refuses to save a guest that has its 9p export mounted, so the template's agent boots
  with `vmcri.template=1` and mounts the share only at clone_init.
- Each domain carries a <genid>: a new one per clone makes the guest kernel reseed its RNG
  at restore (vmgenid), before the agent or anything else draws from it.
- Restores are serialised: the XML region of the one image is rewritten per clone.

A template lives in <root>/templates/<key>/, key = guest image hash + VM shape, written
under a temporary name and renamed into place (never served half-written), reused after a
daemon restart, and rebuilt when the guest image or the shape changes. A failed clone
drops the template, falls back to a cold boot, and schedules a rebuild.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass

import libvirt
from cri_api.v1 import api_pb2 as pb

from vmcri.sandbox import designer, hostfs, saveimage

log = logging.getLogger(__name__)

TEMPLATE_CMDLINE = "vmcri.template=1"
REBUILD_BACKOFF_S = (10, 60, 300)
META = "template.json"
SAVE = "state.save"
XML = "template.xml"  # the saved XML as the template VM left it: every clone starts from it


@dataclass(frozen=True)
class Template:
    key: str
    dir: str
    template_id: str
    host_key: str
    vcpus: int
    memory_mib: int
    uuid: str

    @property
    def save_path(self) -> str:
        return os.path.join(self.dir, SAVE)

    def pristine_xml(self) -> str:
        with open(os.path.join(self.dir, XML)) as f:
            return f.read(saveimage.MAX_XML)


def template_shape(cfg) -> designer.Sizing:
    return designer.Sizing(1, cfg.min_memory_mib, "template")


def template_key(cfg, guest) -> str:
    shape = template_shape(cfg)
    parts = [guest.manifest.get("hash", ""), os.path.realpath(guest.dir), shape.vcpus,
             shape.memory_mib, cfg.max_vcpus, cfg.max_memory_mib, cfg.tcg_tb_cache_mib,
             "9p-multidevs=remap"]  # clones keep the saved XML: one saved before remap is not reused
    if cfg.rootfs_cache != "none":  # a saved guest restores only with the devices it had
        parts.append(f"rootfs_cache={cfg.rootfs_cache}")
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def clone_xml(xml: str, tpl: Template, clone_id: str, clone_uuid: str) -> str:
    """The template's saved XML with the clone's id in every per-VM place: the domain name,
    metadata and paths all derive from the id, so replacing it (longest form first) moves
    them all. The UUID and VM generation id are new."""
    out = xml.replace(tpl.template_id, clone_id)
    for n in (32, 16):
        out = out.replace(tpl.template_id[:n], clone_id[:n])
    out = out.replace(tpl.uuid, clone_uuid)
    out, n = re.subn(r"<genid>[^<]*</genid>", f"<genid>{uuidlib.uuid4()}</genid>", out)
    if n != 1 or tpl.template_id[:16] in out or tpl.uuid in out:
        raise saveimage.SaveImageError("the template XML does not have the expected shape")
    return out


class TemplateStore:
    """One template per (guest image, shape); builds it in the background, clones from it."""

    def __init__(self, svc, enabled: bool):
        self.svc = svc
        self.enabled = enabled
        self.root = os.path.join(svc.cfg.root_dir, "templates")
        self._current: Template | None = None
        self._lock = threading.Lock()       # one restore at a time (one XML region)
        self._state = threading.Lock()
        self._building = False
        self._failures = 0
        self._next_try = 0.0
        self.stats = {"built": 0, "build_failures": 0, "cloned": 0, "clone_failures": 0,
                      "fallbacks": 0, "reused": 0}

    # -- lookup and lifecycle -------------------------------------------------------
    def ready(self) -> Template | None:
        """The template to clone from now, or None (then a build is started if due)."""
        if not self.enabled:
            return None
        with self._state:
            tpl = self._current
            if tpl is None:
                tpl = self._load_existing()
            if tpl is None:
                self._start_build_locked()
            return tpl

    def _key(self) -> tuple[str, object] | None:
        from vmcri import guestimage
        guest = guestimage.locate(self.svc.cfg)
        if guest is None:
            return None
        return template_key(self.svc.cfg, guest), guest

    def _load_existing(self) -> Template | None:
        found = self._key()
        if found is None:
            return None
        key, _ = found
        path = os.path.join(self.root, key)
        try:
            with open(os.path.join(path, META)) as f:
                meta = json.load(f)
            tpl = Template(key=key, dir=path, template_id=meta["template_id"],
                           host_key=meta["host_key"], vcpus=int(meta["vcpus"]),
                           memory_mib=int(meta["memory_mib"]), uuid=meta["uuid"])
            saveimage.read(tpl.save_path)
            tpl.pristine_xml()
        except (OSError, ValueError, KeyError, saveimage.SaveImageError) as e:
            if os.path.exists(path):
                log.warning("VM template %s is unusable (%s); rebuilding it", key, e)
                shutil.rmtree(path, ignore_errors=True)
            return None
        self._current = tpl
        self.stats["reused"] += 1
        return tpl

    def _start_build_locked(self) -> None:
        if self._building or time.monotonic() < self._next_try:
            return
        self._building = True
        threading.Thread(target=self._build_guarded, name="vm-template", daemon=True).start()

    def _build_guarded(self) -> None:
        try:
            tpl = self.build()
        except Exception as e:
            log.warning("building the VM template failed: %s", e)
            with self._state:
                self.stats["build_failures"] += 1
                delay = REBUILD_BACKOFF_S[min(self._failures, len(REBUILD_BACKOFF_S) - 1)]
                self._failures += 1
                self._next_try = time.monotonic() + delay
                self._building = False
            return
        with self._state:
            self._current, self._building, self._failures = tpl, False, 0
            self.stats["built"] += 1
        log.info("VM template %s ready", tpl.key)

    def drop(self, tpl: Template, why: str) -> None:
        """Never clone from `tpl` again; a new one is built in the background."""
        log.warning("dropping VM template %s: %s", tpl.key, why)
        shutil.rmtree(tpl.dir, ignore_errors=True)
        with self._state:
            if self._current == tpl:
                self._current = None
            self._start_build_locked()

    def prune(self) -> None:
        """Remove templates of other guest images or shapes, and half-written ones."""
        found = self._key()
        keep = found[0] if found else None
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.root):
                if name != keep:
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    # -- build ----------------------------------------------------------------------
    def build(self) -> Template:
        svc, cfg = self.svc, self.svc.cfg
        found = self._key()
        if found is None:
            raise RuntimeError("no guest image")
        key, guest = found
        # the image's own files, not through guest/current: a clone must get the disk and
        # kernel its saved state was booted from, even after `current` moves on
        guest = dataclasses.replace(guest, kernel=os.path.realpath(guest.kernel),
                                    initrd=os.path.realpath(guest.initrd),
                                    rootfs=os.path.realpath(guest.rootfs))
        tpl_id = secrets.token_hex(32)
        paths = svc.paths(tpl_id)
        partial = os.path.join(self.root, f".{key}.partial-{tpl_id[:8]}")
        os.makedirs(partial, mode=0o700)
        t0 = time.monotonic()
        with contextlib.ExitStack() as undo:
            undo.callback(shutil.rmtree, partial, True)
            undo.callback(_release, svc, tpl_id)
            hostfs.prepare_vm_dirs(paths, undo)
            spec = designer.design(cfg, sandbox_id=tpl_id,
                                   config=pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata()),
                                   sizing=template_shape(cfg), accel=svc.accel, guest=guest,
                                   paths=paths, role="template", extra_cmdline=TEMPLATE_CMDLINE)
            from vmcri.sandbox.domain import render_domain
            svc.hv.create(render_domain(spec))
            undo.callback(svc.hv.destroy, spec.name)
            client = svc.new_client(tpl_id)
            try:
                client.wait_ready(timeout=cfg.agent_timeout_s)
                client.call("ping")
            finally:
                client.close()
            svc.hv.save(spec.name, os.path.join(partial, SAVE))  # the domain is gone after this
            tpl = Template(key=key, dir=os.path.join(self.root, key), template_id=tpl_id,
                           host_key=client.host_key_fingerprint or "", vcpus=spec.vcpus,
                           memory_mib=spec.memory_mib, uuid=spec.uuid)
            with open(os.path.join(partial, META), "w") as f:
                json.dump({"template_id": tpl_id, "host_key": tpl.host_key, "vcpus": tpl.vcpus,
                           "memory_mib": tpl.memory_mib, "uuid": tpl.uuid, "guest": guest.dir,
                           "build_s": round(time.monotonic() - t0, 2)}, f)
            _, xml = saveimage.read(os.path.join(partial, SAVE))
            with open(os.path.join(partial, XML), "w") as f:
                f.write(xml)
            shutil.rmtree(tpl.dir, ignore_errors=True)
            os.rename(partial, tpl.dir)  # atomic: a template is whole or absent
        log.info("VM template %s built in %.1fs", key, time.monotonic() - t0)
        return tpl

    # -- clone ----------------------------------------------------------------------
    def restore(self, tpl: Template, clone_id: str) -> str:
        """Start a clone of `tpl` as the domain of `clone_id` (its dirs must exist);
        returns the domain name. Raises on any failure, after dropping the template when
        the image itself is at fault."""
        new_uuid = str(uuidlib.uuid4())
        with self._lock:
            try:
                header, _ = saveimage.read(tpl.save_path)
                xml = clone_xml(tpl.pristine_xml(), tpl, clone_id, new_uuid)
                saveimage.rewrite_xml(tpl.save_path, header, xml)
            except (OSError, saveimage.SaveImageError) as e:
                self.stats["clone_failures"] += 1
                self.drop(tpl, str(e))
                raise
            try:
                self.svc.hv.restore(tpl.save_path)
            except libvirt.libvirtError as e:
                self.stats["clone_failures"] += 1
                self.drop(tpl, f"restore failed: {e}")
                raise
        self.stats["cloned"] += 1
        return designer.domain_name(clone_id)

    def snapshot(self) -> dict:
        with self._state:
            tpl = self._current
            return {"enabled": self.enabled, "ready": tpl is not None, "building": self._building,
                    "key": tpl.key if tpl else "", **self.stats}


def _release(svc, vm_id: str) -> None:
    from vmcri.sandbox.sandbox_stop import release_host_files
    release_host_files(svc, vm_id)


def new_identity(client, seed_bytes: int = 64) -> dict:
    """Make a restored clone a new machine: clock, RNG, share. The call's own SSH session
    came up before the reseed, so the caller reconnects afterwards."""
    return client.call("clone_init", time_ns=time.time_ns(), seed=os.urandom(seed_bytes).hex(),
                       machine_id=secrets.token_hex(16))
