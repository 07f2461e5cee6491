"""Image references: parse, validate and normalise the way docker/containerd do.

`busybox` -> `docker.io/library/busybox:latest`, `user/x` -> `docker.io/user/x:latest`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from vmcri.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAINS = ("index.docker.io", "registry-1.docker.io")
OFFICIAL_PREFIX = "library/"
DEFAULT_TAG = "latest"
MAX_NAME_LEN = 255

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Reference:
    domain: str
    path: str           # e.g. library/busybox
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def tagged(self) -> str | None:
        return f"{self.name}:{self.tag}" if self.tag else None

    @property
    def digested(self) -> str | None:
        return f"{self.name}@{self.digest}" if self.digest else None

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.domain, self.path, None, digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def is_image_id(text: str) -> bool:
    """`sha256:<64 hex>` or bare 64 hex (what kubelet passes for images it listed)."""
    return bool(_SHA256.fullmatch(text) or _HEX64.fullmatch(text))


def validate_digest(digest: str, what: str = "digest") -> str:
    if not _SHA256.fullmatch(digest or ""):
        raise InvalidArgument(f"{what}: {digest!r} is not a sha256 digest (sha256:<64 hex>)")
    return digest


def parse(ref: str) -> Reference:
    """Parse and normalise; a malformed reference raises InvalidArgument naming it."""
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("image reference: must not be empty")

    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(f"image reference {ref!r}: {why}")

    if len(ref) > 4096 or any(c.isspace() for c in ref):
        raise bad("contains whitespace or is too long")
    rest, digest = ref, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise bad(f"invalid digest {digest!r}")
        if digest.startswith("sha256:") and not _SHA256.fullmatch(digest):
            raise bad(f"invalid sha256 digest {digest!r}")
        if not digest.startswith("sha256:"):
            raise bad(f"unsupported digest algorithm in {digest!r}")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise bad(f"invalid tag {tag!r}")
    if not rest:
        raise bad("missing repository name")
    if _HEX64.fullmatch(rest) and tag is None and digest is None:
        raise bad("a 64-character hex string is an image id, not a repository name")

    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        domain, path = first, remainder
        if not _DOMAIN.fullmatch(domain):
            raise bad(f"invalid registry host {domain!r}")
    else:
        domain, path = DEFAULT_DOMAIN, rest
    if domain in LEGACY_DOMAINS:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_PREFIX + path
    for comp in path.split("/"):
        if not _COMPONENT.fullmatch(comp):
            raise bad(f"invalid repository path component {comp!r} (lowercase letters, digits, "
                      "and single separators only)")
    if len(domain) + 1 + len(path) > MAX_NAME_LEN:
        raise bad(f"repository name longer than {MAX_NAME_LEN} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)
