"""The demo's own container image: Debian's busybox-static in one layer, served by a
throwaway docker-registry on 127.0.0.1.

`vmcri image build` already keeps busybox-static's .deb in its download cache, so the demo
needs no network once the guest image exists. vmcri pulls from loopback registries over
plain HTTP without any config, which is why the registry listens on 127.0.0.1 only.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from vmcri.guestimage import builder, debs

PACKAGE = "busybox-static"
REPO = "vmcri-demo/busybox"
TAG = "1.0"
MTIME = 1_700_000_000  # fixed, so the same busybox gives the same image digest
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
REGISTRY_START_S = 30.0


class DemoImageError(RuntimeError):
    """The demo image could not be built or served; the message says which step failed."""


def deb_cache_dirs(cfg) -> list[str]:
    """Where `vmcri image build` keeps .debs: next to the image the daemon boots, then under root_dir."""
    dirs = [os.path.join(os.path.dirname(os.path.realpath(cfg.guest_dir)), "debs"),
            os.path.join(builder.guest_root(cfg), "debs")]
    return list(dict.fromkeys(dirs))


def busybox_deb(cfg, log=print) -> str:
    for d in deb_cache_dirs(cfg):
        if os.path.isdir(d):
            found = sorted(f for f in os.listdir(d) if f.startswith(PACKAGE + "_") and f.endswith(".deb"))
            if found:
                return os.path.join(d, found[-1])
    cache = deb_cache_dirs(cfg)[-1]
    log(f"{PACKAGE} is not in the guest image's .deb cache; fetching it with apt-get download")
    resolved = debs.resolve([PACKAGE], log)
    return debs.download(list(resolved.values()), cache, log)[PACKAGE]


def _tar_info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = kind, mode, MTIME
    return ti


def rootfs_layer(busybox_binary: str) -> bytes:
    """An uncompressed tar: /bin/busybox, a symlink per applet, passwd/group, empty mount points."""
    applets = subprocess.run([busybox_binary, "--list"], capture_output=True, text=True, check=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "etc", "root", "tmp", "proc", "sys", "dev", "run", "var", "var/tmp"):
            tar.addfile(_tar_info(d, tarfile.DIRTYPE, 0o1777 if d.endswith("tmp") else 0o755))
        with open(busybox_binary, "rb") as f:
            data = f.read()
        ti = _tar_info("bin/busybox", tarfile.REGTYPE, 0o755)
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
        for name in sorted(set(applets.stdout.split())):
            if name != "busybox" and "/" not in name:
                link = _tar_info(f"bin/{name}", tarfile.SYMTYPE, 0o777)
                link.linkname = "busybox"
                tar.addfile(link)
        for path, text in (("etc/passwd", PASSWD), ("etc/group", GROUP)):
            ti = _tar_info(path, tarfile.REGTYPE, 0o644)
            ti.size = len(text)
            tar.addfile(ti, io.BytesIO(text.encode()))
    return buf.getvalue()


def _blob(layout: str, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest[7:]), "wb") as f:
        f.write(data)
    return {"digest": digest, "size": len(data)}


def write_layout(layout: str, layer_tar: bytes) -> str:
    """A one-image OCI layout tagged TAG; returns the manifest digest."""
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    layer = _blob(layout, gzip.compress(layer_tar, compresslevel=6, mtime=0))
    config = {"architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
              "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
              "rootfs": {"type": "layers",
                         "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
              "history": [{"created_by": "vmcri demo: Debian busybox-static"}]}
    cfg_desc = _blob(layout, json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg_desc},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}]}
    m_desc = _blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": manifest["mediaType"], **m_desc,
         "annotations": {"org.opencontainers.image.ref.name": TAG}}]}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
    return m_desc["digest"]


@dataclass
class ThrowawayRegistry:
    """A docker-registry process with its storage in a temp dir; `stop()` removes both."""
    address: str
    workdir: str
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(os.path.join(self.workdir, "registry.log"), errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry() -> ThrowawayRegistry:
    if shutil.which("docker-registry") is None:
        raise DemoImageError("docker-registry is not installed (Debian package docker-registry); "
                             "install it or pass --image with an image vmcri can pull")
    workdir = tempfile.mkdtemp(prefix="vmcri-demo-registry-")
    address = f"127.0.0.1:{_free_loopback_port()}"
    config = os.path.join(workdir, "config.yml")
    with open(config, "w") as f:
        f.write("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                f"    rootdirectory: {workdir}/storage\nhttp:\n  addr: {address}\n")
    with open(os.path.join(workdir, "registry.log"), "wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", config], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
    reg = ThrowawayRegistry(address, workdir, proc)
    deadline = time.monotonic() + REGISTRY_START_S
    while True:
        try:
            urllib.request.urlopen(f"http://{address}/v2/", timeout=1).close()
            return reg
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = reg.log_tail()
                reg.stop()
                raise DemoImageError(f"docker-registry did not start on {address}: {tail}")
            time.sleep(0.05)


def push(layout: str, dest: str) -> None:
    r = subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{layout}:{TAG}", f"docker://{dest}"], capture_output=True, text=True,
                       env={**os.environ, "CONTAINERS_REGISTRIES_CONF": "/dev/null"})
    if r.returncode != 0:
        raise DemoImageError(f"skopeo copy to {dest} failed: {r.stderr.strip()[-800:]}")


def serve_busybox(cfg, log=print) -> tuple[ThrowawayRegistry, str]:
    """Build the busybox image, start a registry and push it; returns (registry, image ref).
    The caller stops the registry."""
    deb = busybox_deb(cfg, log)
    with tempfile.TemporaryDirectory(prefix="vmcri-demo-image-") as work:
        debs.extract(deb, os.path.join(work, "deb"))
        layer = rootfs_layer(os.path.join(work, "deb", "bin", "busybox"))
        layout = os.path.join(work, "layout")
        write_layout(layout, layer)
        reg = start_registry()
        ref = f"{reg.address}/{REPO}:{TAG}"
        try:
            push(layout, ref)
        except BaseException:
            reg.stop()
            raise
    log(f"demo image {ref} (one layer, {len(layer) >> 10} KiB, from {os.path.basename(deb)})")
    return reg, ref
