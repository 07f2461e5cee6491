"""ContainerStatus mounts of an image volume carry ImageSpec.image_ref (field 20, KEP-5365),
which critest's "should return image digest in ContainerStatus mounts" reads."""
from __future__ import annotations

from cri_api.v1 import api_pb2 as pb

from vmcri.container.imagevol import IMAGE_REF_FIELD, status_mount


def _fields(data: bytes) -> dict[int, bytes]:
    """field number -> value of the length-delimited fields of one message (a test's decoder)."""
    out, i = {}, 0
    while i < len(data):
        key, i = _varint(data, i)
        num, wire = key >> 3, key & 7
        assert wire == 2, f"field {num}: wire type {wire}"
        size, i = _varint(data, i)
        out[num] = data[i:i + size]
        i += size
    return out


def _varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def test_image_volume_mount_reports_the_digest_as_image_ref():
    image_id = "sha256:" + "ab" * 32
    asked = pb.Mount(container_path="/vol", readonly=True,
                     image=pb.ImageSpec(image="registry.k8s.io/x:1", user_specified_image="x:1"))
    out = status_mount(asked, image_id)
    wire = pb.Mount.FromString(out.SerializeToString())  # what a client receives
    assert wire.image.image == image_id and wire.image.user_specified_image == "x:1"
    spec = _fields(pb.Mount.FromString(wire.SerializeToString()).image.SerializeToString())
    assert spec[IMAGE_REF_FIELD].decode() == image_id
    assert spec[1].decode() == image_id


def test_a_mount_without_an_image_id_has_no_image_ref():
    out = status_mount(pb.Mount(container_path="/vol", image=pb.ImageSpec(image="x:1")), None)
    assert IMAGE_REF_FIELD not in _fields(out.image.SerializeToString())
