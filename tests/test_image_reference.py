"""Reference parsing and Docker Hub normalisation (unit)."""
import pytest

from vmcri.errors import InvalidArgument
from vmcri.image.reference import is_image_id, parse

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("ref,want", [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("user/x", "docker.io/user/x:latest"),
    ("docker.io/busybox", "docker.io/library/busybox:latest"),
    ("index.docker.io/user/x:2", "docker.io/user/x:2"),
    ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/a/b/c:v1", "localhost:5000/a/b/c:v1"),
    ("127.0.0.1:5000/vmcri-test/busybox:1.0", "127.0.0.1:5000/vmcri-test/busybox:1.0"),
    (f"busybox@{D}", f"docker.io/library/busybox@{D}"),
    (f"quay.io/a/b:t@{D}", f"quay.io/a/b:t@{D}"),
    ("a.b/c__d/e-f---g.h", "a.b/c__d/e-f---g.h:latest"),
    ("Host.Example/x", "Host.Example/x:latest"),
])
def test_normalisation(ref, want):
    assert str(parse(ref)) == want


def test_parts():
    r = parse(f"127.0.0.1:5000/ns/img:1.0@{D}")
    assert (r.domain, r.path, r.tag, r.digest) == ("127.0.0.1:5000", "ns/img", "1.0", D)
    assert r.name == "127.0.0.1:5000/ns/img" and r.digested == f"127.0.0.1:5000/ns/img@{D}"


@pytest.mark.parametrize("bad", [
    "", "UPPER", "ns/UPPER", "busybox:", ":1", "a//b", "a/b/", "/a", "busybox:-tag",
    "busybox@sha256:abc", "busybox@md5:" + "a" * 32, "a b", "a..b/c", "-a/b",
    "busybox:" + "t" * 129, "ab" * 32, "host:port:x/y",
])
def test_malformed_is_invalid_argument_naming_the_reference(bad):
    with pytest.raises(InvalidArgument) as e:
        parse(bad)
    assert "image reference" in str(e.value)
    if bad:
        assert repr(bad) in str(e.value)


def test_image_ids():
    assert is_image_id(D) and is_image_id("ab" * 32)
    assert not is_image_id("busybox") and not is_image_id("sha256:abc")
