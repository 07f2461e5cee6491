"""Real registry fixtures: a local docker-registry and small OCI test images built from
Debian's dynamic busybox, pushed with skopeo.

Fixtures:
  registry            session; a docker-registry on 127.0.0.1 (a `Registry`, which is a
                      host:port str with .storage/.log_path/.pid)
  registry_factory    session; start more registries, e.g. with htpasswd auth
  test_images         session; `TestImages` with refs for single, multi (whiteouts, opaque
                      dir), index (linux/amd64 + linux/arm64) and v2s2 (Docker schema 2)
Helpers (importable): build_layer, write_oci_image, push_layout, busybox_rootfs.
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
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field

import pytest

with warnings.catch_warnings():  # deprecated, but gives bcrypt via libxcrypt, no new dependency
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt

MTIME = 1_700_000_000
CACHE_DIR = os.environ.get("VMCRI_TEST_CACHE", "/var/tmp/vmcri-test-cache")
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "sleep", "id", "env", "true", "false", "ps",
                   "mkdir", "rm", "touch", "wc", "head", "hostname", "ip", "wget", "nc", "stat")
PASSWD = "root:x:0:0:root:/root:/bin/sh\nvmcri:x:1000:1000:vmcri:/home/vmcri:/bin/sh\n" \
         "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nvmcri:x:1000:\nnogroup:x:65534:\n"


def free_port() -> int:
    return free_port_on("127.0.0.1")


def free_port_on(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class Registry(str):
    """host:port of a running registry; also carries where it keeps its files."""
    storage: str
    log_path: str
    pid: int
    proc: subprocess.Popen

    def blob_data_path(self, digest: str) -> str:
        hexd = digest.split(":", 1)[1]
        return os.path.join(self.storage, "docker/registry/v2/blobs/sha256", hexd[:2], hexd, "data")

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def start_registry(workdir: str, users: dict[str, str] | None = None,
                   address: str = "127.0.0.1") -> Registry:
    os.makedirs(workdir, exist_ok=True)
    storage = os.path.join(workdir, "storage")
    os.makedirs(storage, exist_ok=True)
    port = free_port_on(address)
    lines = ["version: 0.1", "log:", "  level: info", "storage:", "  filesystem:",
             f"    rootdirectory: {storage}", "  delete:", "    enabled: true",
             "http:", f"  addr: {address}:{port}"]
    if users:
        htpasswd = os.path.join(workdir, "htpasswd")
        with open(htpasswd, "w") as f:
            for user, pw in users.items():
                f.write(f"{user}:{crypt.crypt(pw, crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
        lines += ["auth:", "  htpasswd:", "    realm: vmcri-test", f"    path: {htpasswd}"]
    config = os.path.join(workdir, "config.yml")
    with open(config, "w") as f:
        f.write("\n".join(lines) + "\n")
    log_path = os.path.join(workdir, "registry.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen(["docker-registry", "serve", config], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    log.close()
    reg = Registry(f"{address}:{port}")
    reg.storage, reg.log_path, reg.pid, reg.proc = storage, log_path, proc.pid, proc
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://{reg}/v2/", timeout=1)
            break
        except urllib.error.HTTPError:
            break  # 401 with auth on: it is serving
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_registry(reg)
                raise RuntimeError(f"docker-registry did not start: {reg.log_text()[-2000:]}")
            time.sleep(0.05)
    return reg


def stop_registry(reg: Registry) -> None:
    if reg.proc.poll() is None:
        os.kill(reg.pid, 9)
    reg.proc.wait()


# -- OCI image building ---------------------------------------------------------------

def _info(name: str, kind: bytes, mode: int, uid=0, gid=0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, gid, MTIME
    return ti


def build_layer(entries: list[tuple]) -> bytes:
    """Uncompressed tar from entries: ("dir", path[, mode]), ("file", path, bytes[, mode]),
    ("symlink", path, target), ("hardlink", path, target), ("whiteout", path),
    ("opaque", dirpath), ("tree", hostdir) — a host dir added recursively at the root."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            kind, path = e[0], e[1]
            if kind == "dir":
                tar.addfile(_info(path, tarfile.DIRTYPE, e[2] if len(e) > 2 else 0o755))
            elif kind == "file":
                data = e[2]
                ti = _info(path, tarfile.REGTYPE, e[3] if len(e) > 3 else 0o644)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            elif kind in ("symlink", "hardlink"):
                ti = _info(path, tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE, 0o777)
                ti.linkname = e[2]
                tar.addfile(ti)
            elif kind == "whiteout":
                head, _, base = path.rpartition("/")
                ti = _info(f"{head}/.wh.{base}" if head else f".wh.{base}", tarfile.REGTYPE, 0o644)
                tar.addfile(ti, io.BytesIO(b""))
            elif kind == "opaque":
                tar.addfile(_info(f"{path}/.wh..wh..opq", tarfile.REGTYPE, 0o644), io.BytesIO(b""))
            elif kind == "tree":
                for dirpath, dirnames, filenames in os.walk(path):
                    dirnames.sort()
                    for name in [*sorted(dirnames), *sorted(filenames)]:
                        full = os.path.join(dirpath, name)
                        ti = tar.gettarinfo(full, os.path.relpath(full, path))
                        ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = MTIME, 0, 0, "", ""
                        if ti.isreg():
                            with open(full, "rb") as f:
                                tar.addfile(ti, f)
                        else:
                            tar.addfile(ti)
            else:
                raise ValueError(kind)
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put_blob(layout: str, data: bytes) -> str:
    d = _digest(data)
    path = os.path.join(layout, "blobs", "sha256", d.split(":")[1])
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)
    return d


def _init_layout(layout: str) -> None:
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)


def write_oci_image(layout: str, layers: list[bytes], config: dict,
                    arch: str = "amd64", diff_ids: list[str] | None = None) -> dict:
    """Add one image (gzip layers) to the OCI layout; returns its manifest descriptor
    plus "config_digest", "diff_ids" and "layer_digests". `diff_ids` overrides what the
    config claims (to make a lying image)."""
    _init_layout(layout)
    descs, actual_diff_ids = [], []
    for tar_bytes in layers:
        gz = gzip.compress(tar_bytes, compresslevel=6, mtime=0)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      "digest": _put_blob(layout, gz), "size": len(gz)})
        actual_diff_ids.append(_digest(tar_bytes))
    claimed = diff_ids
    diff_ids = list(claimed or actual_diff_ids)
    cfg = {"architecture": arch, "os": "linux", "created": "2023-11-14T22:13:20Z",
           "config": config, "rootfs": {"type": "layers", "diff_ids": diff_ids},
           "history": [{"created_by": f"vmcri test layer {i}"} for i in range(len(layers))]}
    cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": _put_blob(layout, cfg_bytes), "size": len(cfg_bytes)},
                "layers": descs}
    m_bytes = json.dumps(manifest, sort_keys=True).encode()
    return {"mediaType": manifest["mediaType"], "digest": _put_blob(layout, m_bytes),
            "size": len(m_bytes), "platform": {"os": "linux", "architecture": arch},
            "config_digest": manifest["config"]["digest"], "diff_ids": diff_ids,
            "layer_digests": [d["digest"] for d in descs]}


def _clean_desc(desc: dict) -> dict:
    return {k: v for k, v in desc.items() if k not in ("config_digest", "diff_ids", "layer_digests")}


def set_layout_index(layout: str, tag: str, manifests: list[dict]) -> str | None:
    """Point `tag` in index.json at one manifest, or at a new image index of several.
    Returns the digest of the image index when one was written."""
    _init_layout(layout)
    idx_digest = None
    if len(manifests) == 1:
        desc = _clean_desc(manifests[0])
        desc.pop("platform", None)
    else:
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [_clean_desc(m) for m in manifests]}
        data = json.dumps(index, sort_keys=True).encode()
        idx_digest = _put_blob(layout, data)
        desc = {"mediaType": index["mediaType"], "digest": idx_digest, "size": len(data)}
    desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    path = os.path.join(layout, "index.json")
    top = {"schemaVersion": 2, "manifests": []}
    if os.path.exists(path):
        with open(path) as f:
            top = json.load(f)
    top["manifests"] = [m for m in top["manifests"]
                        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    top["manifests"].append(desc)
    with open(path, "w") as f:
        json.dump(top, f)
    return idx_digest


def push_layout(layout: str, tag: str, dest: str, all_platforms: bool = False,
                fmt: str | None = None, creds: str | None = None) -> tuple[str, dict]:
    """skopeo copy oci:LAYOUT:TAG docker://DEST; returns the manifest digest and the
    manifest as the registry now serves it."""
    args = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    if all_platforms:
        args.append("--all")
    if fmt:
        args += ["--format", fmt]
    if creds:
        args += ["--dest-creds", creds]
    subprocess.run([*args, f"oci:{layout}:{tag}", f"docker://{dest}"], check=True,
                   capture_output=True, env={**os.environ, "CONTAINERS_REGISTRIES_CONF": "/dev/null"})
    inspect = ["skopeo", "inspect", "--raw", "--tls-verify=false"]
    if creds:
        inspect += ["--creds", creds]
    raw = subprocess.run([*inspect, f"docker://{dest}"], check=True, capture_output=True).stdout
    return _digest(raw), json.loads(raw)


def busybox_rootfs(dest: str) -> str:
    """Debian's dynamic busybox plus the libs ldd names, applet links, passwd/group."""
    os.makedirs(CACHE_DIR, exist_ok=True)
    debs = [f for f in os.listdir(CACHE_DIR) if f.startswith("busybox_") and f.endswith(".deb")]
    if not debs:
        subprocess.run(["apt-get", "download", "busybox"], cwd=CACHE_DIR, check=True,
                       capture_output=True)
        debs = [f for f in os.listdir(CACHE_DIR) if f.startswith("busybox_") and f.endswith(".deb")]
    extract = dest + ".deb"
    subprocess.run(["dpkg", "-x", os.path.join(CACHE_DIR, debs[0]), extract], check=True)
    for d in ("bin", "lib/x86_64-linux-gnu", "lib64", "etc", "tmp", "work", "home/vmcri", "root",
              "proc", "sys", "dev", "run", "var/tmp"):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    os.chmod(os.path.join(dest, "tmp"), 0o1777)
    shutil.copy2(os.path.join(extract, "bin/busybox"), os.path.join(dest, "bin/busybox"))
    shutil.rmtree(extract)
    ldd = subprocess.run(["ldd", os.path.join(dest, "bin/busybox")], check=True,
                         capture_output=True, text=True).stdout
    for line in ldd.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if not path.startswith("/"):
            continue  # linux-vdso
        target = os.path.join(dest, path.lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.realpath(path), target)
        os.chmod(target, 0o755)
    listed = subprocess.run([os.path.join(dest, "bin/busybox"), "--list"], capture_output=True,
                            text=True, env={"LD_LIBRARY_PATH": os.path.join(dest, "lib/x86_64-linux-gnu")})
    applets = set(listed.stdout.split()) if listed.returncode == 0 else set()
    for applet in sorted(applets | set(BUSYBOX_APPLETS)):
        if "/" not in applet and applet != "busybox":
            os.symlink("busybox", os.path.join(dest, "bin", applet))
    with open(os.path.join(dest, "etc/passwd"), "w") as f:
        f.write(PASSWD)
    with open(os.path.join(dest, "etc/group"), "w") as f:
        f.write(GROUP)
    return dest


# -- fixtures -------------------------------------------------------------------------

@dataclass
class TestImage:
    ref: str                 # tag reference, e.g. 127.0.0.1:PORT/vmcri-test/busybox:1.0
    digest: str              # top-level manifest (or index) digest in the registry
    image_id: str            # sha256:<config digest> of the linux/amd64 image
    diff_ids: list[str]
    repo: str                # without tag

    @property
    def digest_ref(self) -> str:
        return f"{self.repo}@{self.digest}"


@dataclass
class TestImages:
    registry: Registry
    single: TestImage        # busybox base only
    multi: TestImage         # base + files + whiteout/opaque layer (shares the base layer)
    index: TestImage         # image index: linux/amd64 and linux/arm64
    v2s2: TestImage          # the single image pushed as Docker schema 2
    arm64_image_id: str
    layout: str
    base_layer: bytes = field(repr=False, default=b"")


BASE_CONFIG = {
    "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hello from vmcri"],
    "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "VMCRI_TEST=1"], "WorkingDir": "/work",
    "User": "1000:1000", "StopSignal": "SIGTERM", "Labels": {"org.vmcri.test": "single"},
    "ExposedPorts": {"8080/tcp": {}}, "Volumes": {"/data": {}},
}


def multi_layers() -> list[bytes]:
    files = build_layer([
        ("dir", "data"), ("file", "data/keep", b"keep\n"), ("file", "data/gone", b"gone\n"),
        ("dir", "opq"), ("file", "opq/old", b"old\n"), ("dir", "opq/sub"),
        ("file", "opq/sub/deep", b"deep\n"), ("file", "work/hello.txt", b"hello\n"),
        ("file", "bin/tool.sh", b"#!/bin/sh\necho tool\n", 0o755)])
    changes = build_layer([
        ("whiteout", "data/gone"), ("opaque", "opq"), ("file", "opq/new", b"new\n"),
        ("file", "data/added", b"added\n"), ("hardlink", "data/added-link", "data/added"),
        ("symlink", "data/abs-link", "/etc/passwd"), ("file", "etc/layer3", b"3\n", 0o600)])
    return [files, changes]


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    reg = start_registry(str(tmp_path_factory.mktemp("registry")))
    yield reg
    stop_registry(reg)


@pytest.fixture(scope="session")
def registry_factory(tmp_path_factory):
    started: list[Registry] = []

    def make(users: dict[str, str] | None = None, address: str = "127.0.0.1") -> Registry:
        reg = start_registry(str(tmp_path_factory.mktemp("registry-extra")), users, address)
        started.append(reg)
        return reg
    yield make
    for reg in started:
        stop_registry(reg)


@pytest.fixture(scope="session")
def busybox_base_layer(tmp_path_factory) -> bytes:
    root = busybox_rootfs(str(tmp_path_factory.mktemp("bbroot") / "rootfs"))
    return build_layer([("tree", root)])


@pytest.fixture(scope="session")
def test_images(registry, busybox_base_layer, tmp_path_factory) -> TestImages:
    layout = str(tmp_path_factory.mktemp("oci") / "layout")
    base = busybox_base_layer
    single = write_oci_image(layout, [base], BASE_CONFIG)
    multi_cfg = {**BASE_CONFIG, "User": "root", "StopSignal": "SIGUSR1",
                 "Labels": {"org.vmcri.test": "multi"}}
    multi = write_oci_image(layout, [base, *multi_layers()], multi_cfg)
    arch_layer = lambda arch: build_layer([("file", "etc/vmcri-arch", arch.encode() + b"\n")])
    amd = write_oci_image(layout, [base, arch_layer("amd64")],
                          {**BASE_CONFIG, "Labels": {"org.vmcri.test": "index"}})
    arm = write_oci_image(layout, [base, arch_layer("arm64")],
                          {**BASE_CONFIG, "Labels": {"org.vmcri.test": "index"}}, arch="arm64")
    set_layout_index(layout, "single", [single])
    set_layout_index(layout, "multi", [multi])
    set_layout_index(layout, "index", [arm, amd])  # amd64 second: the choice must be by platform

    def push(tag, desc, name, **kw) -> TestImage:
        repo = f"{registry}/vmcri-test/{name}"
        digest, manifest = push_layout(layout, tag, f"{repo}:1.0", **kw)
        # a format conversion rewrites the config, so the image id is what the registry has
        image_id = manifest["config"]["digest"] if "config" in manifest else desc["config_digest"]
        return TestImage(f"{repo}:1.0", digest, image_id, desc["diff_ids"], repo)

    imgs = TestImages(
        registry=registry, single=push("single", single, "busybox"),
        multi=push("multi", multi, "busybox-multi"),
        index=push("index", amd, "busybox-index", all_platforms=True),
        v2s2=push("single", single, "busybox-v2s2", fmt="v2s2"),
        arm64_image_id=arm["config_digest"], layout=layout, base_layer=base)
    return imgs
