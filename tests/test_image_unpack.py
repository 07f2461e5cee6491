"""Layer unpacking: overlay-form whiteouts, metadata, and hostile archives (unit)."""
import gzip
import hashlib
import io
import os
import stat
import tarfile

import pytest

from tests.support.fx_registry import build_layer
from vmcri.image.unpack import OPAQUE_XATTR, LayerError, unpack_layer


def write_blob(tmp_path, tar_bytes: bytes, compress=True) -> tuple[str, str]:
    path = tmp_path / "blob"
    path.write_bytes(gzip.compress(tar_bytes) if compress else tar_bytes)
    return str(path), "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


def raw_tar(members: list[tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(b"x" * m.size) if m.isreg() else None)
    return buf.getvalue()


def member(name, kind=tarfile.REGTYPE, linkname="", size=0, mode=0o644):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.size, ti.mode = kind, linkname, size, mode
    return ti


@pytest.mark.parametrize("compress", [True, False])
def test_overlay_form_and_metadata(tmp_path, compress):
    tar = build_layer([("dir", "d", 0o750), ("file", "d/f", b"hi", 0o640), ("whiteout", "d/old"),
                       ("opaque", "o"), ("symlink", "d/l", "/abs/target"),
                       ("hardlink", "d/h", "d/f"), ("file", "top", b"t")])
    blob, diff_id = write_blob(tmp_path, tar, compress)
    dest = tmp_path / "out"
    dest.mkdir()
    assert unpack_layer(blob, str(dest), diff_id) == len(tar)
    wh = os.lstat(dest / "d/old")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(dest / "o", OPAQUE_XATTR) == b"y"
    assert not (dest / "o/.wh..wh..opq").exists() and not (dest / "d/.wh.old").exists()
    assert stat.S_IMODE(os.stat(dest / "d").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(dest / "d/f").st_mode) == 0o640
    assert os.readlink(dest / "d/l") == "/abs/target"
    assert os.stat(dest / "d/h").st_ino == os.stat(dest / "d/f").st_ino
    assert int(os.stat(dest / "top").st_mtime) == 1_700_000_000


def test_compressed_digest_checked_in_the_same_pass(tmp_path):
    blob, diff_id = write_blob(tmp_path, build_layer([("file", "a", b"a")]))
    right = "sha256:" + hashlib.sha256(open(blob, "rb").read()).hexdigest()
    (tmp_path / "ok").mkdir()
    unpack_layer(blob, str(tmp_path / "ok"), diff_id, blob_digest=right)
    (tmp_path / "bad").mkdir()
    with pytest.raises(LayerError, match="hashes to"):
        unpack_layer(blob, str(tmp_path / "bad"), diff_id, blob_digest="sha256:" + "1" * 64)


def test_diff_id_mismatch(tmp_path):
    blob, _ = write_blob(tmp_path, build_layer([("file", "a", b"a")]))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(LayerError, match="diff_id mismatch"):
        unpack_layer(blob, str(dest), "sha256:" + "0" * 64)


@pytest.mark.parametrize("members,why", [
    ([member("../escape")], "escapes"),
    ([member("a/../../escape")], "escapes"),
    ([member("link", tarfile.SYMTYPE, "/tmp"), member("link/pwned")], "not a directory"),
    ([member("up", tarfile.SYMTYPE, ".."), member("up/pwned")], "not a directory"),
    ([member("h", tarfile.LNKTYPE, "../../etc/passwd")], "escapes"),
    ([member("h", tarfile.LNKTYPE, "missing")], "missing"),
])
def test_hostile_archives_are_refused(tmp_path, members, why):
    tar = raw_tar(members)
    blob, diff_id = write_blob(tmp_path, tar)
    dest = tmp_path / "sub" / "out"
    dest.mkdir(parents=True)
    with pytest.raises(LayerError, match=why):
        unpack_layer(blob, str(dest), diff_id)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "sub" / "escape").exists()
    assert not os.path.exists("/tmp/pwned")


def test_hard_link_into_a_lower_layer_gets_a_copy(tmp_path):
    lower = tmp_path / "lower"
    (lower / "bin").mkdir(parents=True)
    (lower / "bin/tool").write_bytes(b"tool")
    blob, diff_id = write_blob(tmp_path, raw_tar([member("bin", tarfile.DIRTYPE, mode=0o755),
                                                  member("bin/alias", tarfile.LNKTYPE, "bin/tool")]))
    dest = tmp_path / "out"
    dest.mkdir()
    unpack_layer(blob, str(dest), diff_id, [str(lower)])
    assert (dest / "bin/alias").read_bytes() == b"tool"
    assert not (dest / "bin/tool").exists()


def test_absolute_member_names_stay_inside(tmp_path):
    tar = raw_tar([member("/etc/inside", size=3)])
    blob, diff_id = write_blob(tmp_path, tar)
    dest = tmp_path / "out"
    dest.mkdir()
    unpack_layer(blob, str(dest), diff_id)
    assert (dest / "etc/inside").read_bytes() == b"xxx"


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(gzip.compress(build_layer([("file", "a", b"a" * 5000)]))[:-40])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(LayerError):
        unpack_layer(str(path), str(dest), "sha256:" + "0" * 64)


# -- whiteouts: malformed or out of place ---------------------------------------------------

def _unpack_in_store(tmp_path, members):
    """Unpack into store/layers/new next to an existing layer and a file beside the store,
    the things a bad whiteout would remove."""
    layers = tmp_path / "store" / "layers"
    (layers / "other").mkdir(parents=True)
    (layers / "other" / "keep").write_bytes(b"k")
    (tmp_path / "store" / "beside").write_bytes(b"b")
    dest = layers / "new"
    dest.mkdir()
    (dest / "pre").mkdir()  # as if an earlier entry of this layer made it
    (dest / "pre" / "f").write_bytes(b"f")
    blob, diff_id = write_blob(tmp_path, raw_tar(members))
    return dest, blob, diff_id


def _untouched(tmp_path, dest):
    assert (tmp_path / "store" / "layers" / "other" / "keep").read_bytes() == b"k"
    assert (tmp_path / "store" / "beside").read_bytes() == b"b"
    assert (dest / "pre" / "f").read_bytes() == b"f"


@pytest.mark.parametrize("members,why", [
    ([member(".wh.")], "names no entry"),                 # whiteout of "" = the layer root
    ([member("pre/.wh.")], "names no entry"),             # ... or of its parent dir
    ([member(".wh..")], "names no entry"),                # whiteout of "."
    ([member("pre/.wh..")], "names no entry"),
    ([member(".wh...")], "names no entry"),               # whiteout of "..": the store's layers
    ([member("pre/.wh...")], "names no entry"),
    ([member(".wh..wh.plnk")], "whiteout metadata"),      # AUFS metadata
    ([member("pre/.wh..wh..wh..opq")], "whiteout metadata"),
    ([member(".wh.x", tarfile.DIRTYPE)], "regular file"),
    ([member("pre/.wh..wh..opq", tarfile.DIRTYPE)], "regular file"),
    ([member("pre/.wh..wh..opq", tarfile.SYMTYPE, "/")], "regular file"),
    ([member(".wh.pre", tarfile.LNKTYPE, "pre/f")], "regular file"),
    ([member(".wh..wh..opq/x")], "used as a directory"),  # opaque marker as a directory
    ([member("pre/.wh.f/x")], "used as a directory"),
])
def test_bad_whiteouts_are_refused_and_remove_nothing(tmp_path, members, why):
    dest, blob, diff_id = _unpack_in_store(tmp_path, members)
    with pytest.raises(LayerError, match=why):
        unpack_layer(blob, str(dest), diff_id)
    _untouched(tmp_path, dest)


def test_good_whiteouts_still_work_beside_the_checks(tmp_path):
    dest, blob, diff_id = _unpack_in_store(tmp_path, [
        member("pre/.wh.f"), member(".wh..wh..opq"), member("pre/.wh..wh..opq"),
        member(".wh.a.wh.b"), member("d/.wh...hidden")])
    unpack_layer(blob, str(dest), diff_id)
    for wh in ("pre/f", "a.wh.b", "d/..hidden"):
        st = os.lstat(dest / wh)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, wh
    assert os.getxattr(dest / "pre", OPAQUE_XATTR) == b"y"
    assert (tmp_path / "store" / "layers" / "other" / "keep").exists()


def test_removal_outside_the_layer_is_refused_at_the_last_step(tmp_path):
    from vmcri.image.unpack import _remove_existing
    (tmp_path / "layer").mkdir()
    (tmp_path / "victim").mkdir()
    for path in (tmp_path / "layer" / "..", tmp_path / "layer", tmp_path / "layer" / ".",
                 tmp_path / "victim"):
        with pytest.raises(LayerError, match="not inside the layer"):
            _remove_existing(str(tmp_path / "layer"), str(path), keep_dir=False)
    assert (tmp_path / "victim").is_dir() and (tmp_path / "layer").is_dir()
