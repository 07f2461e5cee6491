"""zstd-compressed layers: unpacked with the diff_id checked over the decompressed stream,
and pulled from a real registry."""
import io
import os
import tarfile

import pytest
import zstandard

from tests.support.zstd_image import push_zstd_image, zstd_frames
from vmcri.config import Config
from vmcri.image.service import ImageService
from vmcri.image.unpack import LayerError, unpack_layer
from vmcri.store import Store


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    import hashlib
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_multi_frame_zstd_layer_unpacks_and_its_diff_id_is_checked(tmp_path):
    big = os.urandom(300_000)  # spans several 64 KiB frames
    tar_bytes = _tar({"a/big.bin": big, "b.txt": b"bee\n"})
    blob = tmp_path / "layer.zst"
    blob.write_bytes(zstd_frames(tar_bytes))
    dest = tmp_path / "out"
    dest.mkdir()
    size = unpack_layer(str(blob), str(dest), _sha(tar_bytes), blob_digest=_sha(blob.read_bytes()))
    assert size == len(tar_bytes)
    assert (dest / "a/big.bin").read_bytes() == big
    assert (dest / "b.txt").read_bytes() == b"bee\n"


def test_a_zstd_layer_whose_content_does_not_match_the_diff_id_is_refused(tmp_path):
    tar_bytes = _tar({"x": b"x"})
    blob = tmp_path / "layer.zst"
    blob.write_bytes(zstandard.ZstdCompressor().compress(tar_bytes))
    (tmp_path / "out").mkdir()
    with pytest.raises(LayerError, match="diff_id mismatch"):
        unpack_layer(str(blob), str(tmp_path / "out"), _sha(b"something else"))


def test_a_corrupt_zstd_layer_is_a_layer_error(tmp_path):
    good = zstandard.ZstdCompressor().compress(_tar({"x": b"x" * 10000}))
    blob = tmp_path / "layer.zst"
    blob.write_bytes(good[:4] + bytes(b ^ 0x5A for b in good[4:40]) + good[40:])
    (tmp_path / "out").mkdir()
    with pytest.raises(LayerError):
        unpack_layer(str(blob), str(tmp_path / "out"), _sha(b""))


@pytest.mark.registry
def test_pull_of_a_zstd_image_from_a_real_registry(tmp_path, registry, busybox_base_layer):
    img = push_zstd_image(str(tmp_path / "layout"), registry, busybox_base_layer)
    cfg = Config(root_dir=str(tmp_path / "root"), run_dir=str(tmp_path / "run"))
    store = Store(cfg.db_path)
    try:
        svc = ImageService(cfg, store)
        assert svc.pull(img["ref"]) == img["image_id"]
        got = svc.resolve(img["ref"])
        assert got.layers == img["diff_ids"]
        assert got.repo_digests == [f"{img['repo']}@{img['digest']}"]
        top = svc.layer_dirs(got)[-1]
        with open(os.path.join(top, "etc/vmcri-zstd"), "rb") as f:
            assert f.read() == b"unpacked from zstd\n"
        assert os.path.exists(os.path.join(svc.layer_dirs(got)[0], "bin/busybox"))
    finally:
        store.close()
