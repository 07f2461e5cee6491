"""Debian package handling for the guest image: resolve, download (cached), unpack.

Only apt's ordinary clients are used (apt-cache, apt-get download, dpkg-deb/dpkg -x).
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


class DebError(RuntimeError):
    """A package could not be resolved, downloaded or unpacked; the message names it."""


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    arch: str

    @property
    def filename(self) -> str:
        # apt-get download encodes the epoch colon as %3a
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def read_list(path: str) -> list[str]:
    """Names from a recipe list file: one per line, '#' comments and blank lines ignored."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    return out


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def _show(names: list[str]) -> dict[str, Deb]:
    r = _run(["apt-cache", "show", "--no-all-versions", *names])
    found: dict[str, Deb] = {}
    for stanza in r.stdout.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line[:1] not in (" ", "") and ":" in line:
                k, v = line.split(":", 1)
                fields[k] = v.strip()
        if "Package" in fields and "Version" in fields and fields["Package"] not in found:
            found[fields["Package"]] = Deb(fields["Package"], fields["Version"],
                                           fields.get("Architecture", "amd64"))
    return found


def resolve(names: list[str], log=print) -> dict[str, Deb]:
    """Candidate version of each package; runs `apt-get update` once when apt does not know them."""
    found = _show(names)
    missing = [n for n in names if n not in found]
    if missing:
        log(f"apt-cache does not know {', '.join(missing)}; running apt-get update")
        r = _run(["apt-get", "-o", "DPkg::Lock::Timeout=900", "update", "-q"])
        if r.returncode != 0:
            raise DebError(f"apt-get update failed: {r.stderr.strip()[-500:]}")
        found = _show(names)
        missing = [n for n in names if n not in found]
        if missing:
            raise DebError(f"Debian package(s) not found by apt-cache: {', '.join(missing)}")
    return {n: found[n] for n in names}


def kernel_package(log=print) -> str:
    """The versioned linux-image package the linux-image-amd64 metapackage currently depends on."""
    for attempt in range(2):
        r = _run(["apt-cache", "depends", "linux-image-amd64"])
        for line in r.stdout.splitlines():
            line = line.strip()
            if line.startswith("Depends:"):
                pkg = line.split(":", 1)[1].strip().strip("<>")
                if pkg.startswith("linux-image-") and pkg.endswith("-amd64"):
                    return pkg
        if attempt == 0:
            log("apt-cache cannot resolve linux-image-amd64; running apt-get update")
            _run(["apt-get", "-o", "DPkg::Lock::Timeout=900", "update", "-q"])
    raise DebError("linux-image-amd64: could not resolve its linux-image-*-amd64 dependency")


def download(debs: list[Deb], cache_dir: str, log=print) -> dict[str, str]:
    """Download missing .debs into cache_dir; return name -> path."""
    os.makedirs(cache_dir, exist_ok=True)
    missing = [d for d in debs if not os.path.exists(os.path.join(cache_dir, d.filename))]
    if missing:
        log(f"downloading {len(missing)} package(s): {' '.join(d.name for d in missing)}")
        r = _run(["apt-get", "download", "-q", *[f"{d.name}={d.version}" for d in missing]],
                 cwd=cache_dir)
        if r.returncode != 0:
            raise DebError(f"apt-get download failed: {r.stderr.strip()[-800:]}")
    paths = {}
    for d in debs:
        p = os.path.join(cache_dir, d.filename)
        if not os.path.exists(p):
            raise DebError(f"{d.name}: {d.filename} missing after apt-get download")
        paths[d.name] = p
    return paths


def extract(deb_path: str, dest: str) -> None:
    r = _run(["dpkg-deb", "-x", deb_path, dest])
    if r.returncode != 0:
        raise DebError(f"dpkg-deb -x {os.path.basename(deb_path)}: {r.stderr.strip()}")
