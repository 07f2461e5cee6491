"""Registry transport through skopeo: manifests, configs and layer blobs.

skopeo does the protocol work (token auth, redirects, retries of the HTTP layer);
we choose endpoints (mirrors, then upstream), hand it credentials in a 0600
authfile, and translate its failures into errors that name registry and repo.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from vmcri.config import Config
from vmcri.errors import (InvalidArgument, NotFound, Unauthenticated, Unavailable,
                          Unimplemented, VmcriError)
from vmcri.image.reference import Reference

log = logging.getLogger("vmcri.image.transport")

MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 8 << 20
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# skopeo dies with the daemon, so a killed daemon leaves no writer in the staging dir
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
_STDERR_TAIL = 600


@dataclass(frozen=True)
class Endpoint:
    host: str          # host[:port] that goes into docker://HOST/repo
    tls_verify: bool
    mirror: bool
    credentials: bool = True  # the pull's credentials may go here (upstream, or opted-in mirror)

    def url(self, ref: Reference, spec: str) -> str:
        """`spec` is ':tag' or '@sha256:...'."""
        return f"docker://{self.host}/{ref.path}{spec}"

    def __str__(self) -> str:
        scheme = "https" if self.tls_verify else "http/insecure"
        return f"{'mirror ' if self.mirror else ''}{self.host} ({scheme})"


@dataclass
class Credentials:
    username: str = ""
    password: str = field(default="", repr=False)   # secrets stay out of logs
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def fingerprint(self) -> str:
        """Distinguishes credentials without keeping them readable (in-flight pull keys)."""
        raw = "\0".join((self.username, self.password, self.identity_token, self.registry_token))
        return hashlib.sha256(raw.encode()).hexdigest()

    @classmethod
    def from_auth(cls, auth: dict | None) -> "Credentials | None":
        """CRI AuthConfig as a dict (username, password, auth, identity_token, registry_token).
        A registry_token alone is UNIMPLEMENTED: skopeo takes one only on its command line,
        where every local user sees it (containerd ignores it too)."""
        if not auth:
            return None
        creds = cls(username=auth.get("username") or "", password=auth.get("password") or "",
                    identity_token=auth.get("identity_token") or "",
                    registry_token=auth.get("registry_token") or "")
        encoded = auth.get("auth") or ""
        if encoded and not creds.username:
            try:
                user, sep, pw = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidArgument("auth.auth: not base64 of 'user:password'") from None
            if not sep:
                raise InvalidArgument("auth.auth: decoded value has no ':' between user and password")
            creds.username, creds.password = user, pw
        if creds.password and not creds.username:
            raise InvalidArgument("auth.username: required when auth.password is set")
        if creds.registry_token and not (creds.username or creds.identity_token):
            raise Unimplemented("auth.registry_token: not supported (skopeo would get it on its "
                                "command line, which every local user can read); use username "
                                "and password, or identity_token")
        if not (creds.username or creds.identity_token):
            return None
        return creds


def endpoints_for(cfg: Config, ref: Reference) -> list[Endpoint]:
    reg = cfg.registry_for(ref.domain)
    eps = []
    for m in reg.mirrors:
        scheme, _, rest = m.partition("://")
        host = rest.split("/", 1)[0]
        eps.append(Endpoint(host, tls_verify=(scheme == "https"), mirror=True,
                            credentials=m in reg.credential_mirrors))
    if not reg.skip_upstream or not eps:
        upstream = ref.domain  # skopeo itself maps docker.io to its API host
        hostname = ref.domain.rsplit(":", 1)[0] if not ref.domain.startswith("[") else ref.domain.split("]")[0] + "]"
        insecure = reg.insecure or hostname in LOOPBACK_HOSTS
        eps.append(Endpoint(upstream, tls_verify=not insecure, mirror=False))
    return eps


class Session:
    """One pull's skopeo environment: authfile and an empty registries.conf so host-wide
    mirror/credential settings never change what vmcri's own config says.

    Secrets go only into the authfile (0600, in a 0700 dir of its own, removed by close()),
    never on skopeo's command line, and only for `hosts` (the endpoints allowed them)."""

    def __init__(self, creds: Credentials | None, hosts: list[str], workdir: str,
                 skopeo: str = "skopeo", timeout: float = 600.0):
        self.creds, self.skopeo, self.timeout = creds, skopeo, timeout
        self.dir = tempfile.mkdtemp(prefix="skopeo-", dir=workdir)
        os.chmod(self.dir, 0o700)
        self.authfile = os.path.join(self.dir, "auth.json")
        auths = {}
        if creds and (creds.username or creds.identity_token):
            user = creds.username or "<token>"
            entry = {"auth": base64.b64encode(f"{user}:{creds.password}".encode()).decode()}
            if creds.identity_token:
                entry["identitytoken"] = creds.identity_token
            auths = {h: entry for h in hosts}
        fd = os.open(self.authfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"auths": auths}, f)
        self.registries_conf = os.path.join(self.dir, "registries.conf")
        with open(self.registries_conf, "w") as f:
            f.write("# vmcri: registries come from vmcri's config only\n")

    def close(self) -> None:
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_AUTH", "DOCKER_"))}
        env["CONTAINERS_REGISTRIES_CONF"] = self.registries_conf
        env["REGISTRY_AUTH_FILE"] = self.authfile
        return env

    def _run(self, args: list[str], what: str, ep: Endpoint, ref: Reference, limit: int) -> bytes:
        log.debug("skopeo %s", " ".join(args))
        try:
            proc = subprocess.run([*_DIE_WITH_PARENT, self.skopeo, *args], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=self.timeout, env=self._env())
        except subprocess.TimeoutExpired:
            raise Unavailable(f"{what} from registry {ep} for repository {ref.path}: "
                              f"timed out after {self.timeout:.0f}s") from None
        if proc.returncode != 0:
            raise classify(proc.stderr.decode(errors="replace"), what, ep, ref)
        if len(proc.stdout) > limit:
            raise Unavailable(f"{what} from registry {ep}: {len(proc.stdout)} bytes exceeds {limit}")
        return proc.stdout

    def _src_flags(self, ep: Endpoint, prefix: str) -> list[str]:
        return [f"--{prefix}tls-verify={'true' if ep.tls_verify else 'false'}",
                f"--{prefix}authfile={self.authfile}"]

    def manifest(self, ep: Endpoint, ref: Reference, spec: str) -> bytes:
        return self._run(["inspect", "--raw", "--retry-times=1", *self._src_flags(ep, ""),
                          ep.url(ref, spec)], f"manifest {ref.path}{spec}", ep, ref,
                         MAX_MANIFEST_BYTES)

    def config(self, ep: Endpoint, ref: Reference, manifest_digest: str) -> bytes:
        return self._run(["inspect", "--raw", "--config", "--retry-times=1",
                          *self._src_flags(ep, ""), ep.url(ref, "@" + manifest_digest)],
                         f"config of {ref.path}@{manifest_digest}", ep, ref, MAX_CONFIG_BYTES)

    def copy_blobs(self, ep: Endpoint, ref: Reference, manifest_digest: str, shared_dir: str,
                   layout_dir: str) -> None:
        """Fetch the image's blobs into `shared_dir/sha256/<hex>`. Blobs already there
        (hard links to what the store holds) are not transferred again."""
        self._run(["copy", "--quiet", "--retry-times=1", *self._src_flags(ep, "src-"),
                   f"--dest-shared-blob-dir={shared_dir}",
                   ep.url(ref, "@" + manifest_digest), f"oci:{layout_dir}:pull"],
                  f"layers of {ref.path}@{manifest_digest}", ep, ref, 1 << 20)


_SKOPEO_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
_NOISE_PREFIX = re.compile(r'^Error parsing image name "[^"]*": |^initializing source [^:]*:[^:]*: ')
_AUTH_HINTS = ("unauthorized", "authentication required", "invalid username/password",
               "requested access to the resource is denied", "incorrect username or password")


def skopeo_detail(stderr: str) -> str:
    """The useful part of skopeo's fatal log line, bounded."""
    lines = stderr.strip().splitlines()
    if not lines:
        return "no output"
    last = lines[-1]
    m = _SKOPEO_MSG.search(last)
    if m:
        last = m.group(1).replace('\\"', '"')
    return _NOISE_PREFIX.sub("", last)[-_STDERR_TAIL:]


def classify(stderr: str, what: str, ep: Endpoint, ref: Reference) -> VmcriError:
    low = stderr.lower()
    detail = skopeo_detail(stderr)
    where = f"registry {ep}"
    if "name unknown" in low or "repository name not known" in low or "name_unknown" in low:
        return NotFound(f"{what}: repository {ref.path!r} not found in {where}: {detail}")
    if "manifest unknown" in low or "manifest_unknown" in low:
        return NotFound(f"{what}: repository {ref.path!r} or this tag/digest not found in "
                        f"{where}: {detail}")
    if any(h in low for h in _AUTH_HINTS):
        return Unauthenticated(f"{what}: {where} rejected the credentials or requires them: "
                               f"{detail}")
    if "did not match" in low or ("digest" in low and "mismatch" in low):
        return Unavailable(f"{what}: content from {where} failed digest verification: {detail}")
    return Unavailable(f"{what}: {where} unreachable or failed: {detail}")
