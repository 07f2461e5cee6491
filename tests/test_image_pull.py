"""ImageService through a real docker-registry: pull by tag/digest, indexes, schema 2,
whiteouts on a real overlay mount, dedup, concurrency, remove, fs info."""
import os
import stat
import subprocess
import threading

import pytest

from vmcri.config import Config
from vmcri.errors import InvalidArgument, NotFound, Unavailable
from vmcri.image.service import ImageService
from vmcri.image.unpack import OPAQUE_XATTR
from vmcri.store import Store

pytestmark = pytest.mark.registry


@pytest.fixture
def cfg(tmp_path):
    return Config(root_dir=str(tmp_path / "root"), run_dir=str(tmp_path / "run"))


@pytest.fixture
def svc(cfg):
    store = Store(cfg.db_path)
    yield ImageService(cfg, store)
    store.close()


def blob_gets(registry, repo_path: str, digest: str) -> int:
    needle = f'"GET /v2/{repo_path}/blobs/{digest} '
    return registry.log_text().count(needle)


def skopeo_counter(tmp_path, delay: float = 0.0) -> tuple[str, str]:
    """A wrapper around the real skopeo that logs each invocation (and may delay it)."""
    log = tmp_path / "skopeo-calls.log"
    wrapper = tmp_path / "skopeo-wrapper"
    wrapper.write_text(f"#!/bin/sh\necho \"$1\" >> {log}\nsleep {delay}\nexec skopeo \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper), str(log)


def test_pull_by_tag_gives_image_id_and_config(svc, test_images):
    img = test_images.single
    image_id = svc.pull(img.ref)
    assert image_id == img.image_id
    got = svc.resolve(img.ref)
    assert got.repo_tags == [img.ref]
    assert got.repo_digests == [img.digest_ref]
    assert got.layers == img.diff_ids
    assert got.config.entrypoint == ["/bin/sh", "-c"]
    assert got.config.cmd == ["echo hello from vmcri"]
    assert "VMCRI_TEST=1" in got.config.env
    assert got.config.working_dir == "/work"
    assert got.config.stop_signal == "SIGTERM"
    assert got.config.exposed_ports == ["8080/tcp"] and got.config.volumes == ["/data"]
    assert got.uid == 1000 and got.username == ""
    assert got.size > 100_000
    (layer,) = svc.layer_dirs(got)
    assert os.access(os.path.join(layer, "bin/busybox"), os.X_OK)
    assert os.readlink(os.path.join(layer, "bin/sh")) == "busybox"
    # the unpacked busybox really runs (its libs came along)
    out = subprocess.run(["chroot", layer, "/bin/sh", "-c", "echo ok"], capture_output=True,
                         text=True)
    assert out.stdout == "ok\n"


def test_pull_by_digest(svc, test_images):
    img = test_images.multi
    assert svc.pull(img.digest_ref) == img.image_id
    got = svc.resolve(img.digest_ref)
    assert got.repo_digests == [img.digest_ref]
    assert got.repo_tags == []
    assert got.username == "root" and got.uid is None
    assert svc.resolve(img.image_id).id == img.image_id
    assert svc.resolve(img.image_id.split(":")[1]).id == img.image_id


def test_index_resolves_to_linux_amd64(svc, test_images):
    img = test_images.index
    image_id = svc.pull(img.ref)
    assert image_id == img.image_id != test_images.arm64_image_id
    got = svc.resolve(img.ref)
    assert got.repo_digests == [img.digest_ref]  # the index digest, as containerd records it
    assert got.raw_config["architecture"] == "amd64"
    top = svc.layer_dirs(got)[-1]
    with open(os.path.join(top, "etc/vmcri-arch")) as f:
        assert f.read() == "amd64\n"


def test_docker_schema2_image(svc, test_images):
    img = test_images.v2s2
    assert svc.pull(img.ref) == img.image_id
    got = svc.resolve(img.ref)
    assert got.config.entrypoint == ["/bin/sh", "-c"]
    assert len(svc.layer_dirs(got)) == 1


def test_whiteouts_and_opaque_dirs_work_on_a_real_overlay(svc, test_images, tmp_path):
    got = svc.resolve(svc.pull(test_images.multi.ref))
    base, files, changes = svc.layer_dirs(got)
    st = os.lstat(os.path.join(changes, "data/gone"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(os.path.join(changes, "opq"), OPAQUE_XATTR) == b"y"
    assert os.stat(os.path.join(changes, "data/added")).st_ino == \
        os.stat(os.path.join(changes, "data/added-link")).st_ino
    assert os.readlink(os.path.join(changes, "data/abs-link")) == "/etc/passwd"
    assert stat.S_IMODE(os.stat(os.path.join(changes, "etc/layer3")).st_mode) == 0o600

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lower = ":".join([changes, files, base])  # top first
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", str(mnt)],
                   check=True)
    try:
        assert not (mnt / "data/gone").exists()
        assert (mnt / "data/keep").read_text() == "keep\n"
        assert sorted(os.listdir(mnt / "opq")) == ["new"]  # old + sub hidden by opaque
        assert (mnt / "bin/busybox").exists() and (mnt / "work/hello.txt").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_shared_base_layer_is_stored_and_fetched_once(svc, test_images):
    reg = test_images.registry
    single = svc.resolve(svc.pull(test_images.single.ref))
    base_blob = svc.store.get_image(single.id).layers[0]["digest"]
    before = blob_gets(reg, "vmcri-test/busybox-multi", base_blob)
    multi = svc.resolve(svc.pull(test_images.multi.ref))
    assert multi.layers[0] == single.layers[0]
    assert svc.layer_dirs(multi)[0] == svc.layer_dirs(single)[0]
    assert len(os.listdir(svc.store.layers_dir)) == 3  # base + two multi layers
    # the base blob was offered to skopeo from the store, not downloaded again
    assert blob_gets(reg, "vmcri-test/busybox-multi", base_blob) == before


def test_concurrent_pulls_of_one_ref_do_the_work_once(cfg, test_images, tmp_path):
    wrapper, calls = skopeo_counter(tmp_path, delay=0.3)
    store = Store(cfg.db_path)
    svc = ImageService(cfg, store, skopeo=wrapper)
    barrier = threading.Barrier(4)
    results, errors = [], []

    def pull():
        barrier.wait()
        try:
            results.append(svc.pull(test_images.multi.ref))
        except Exception as e:  # collected for the assertion below
            errors.append(e)
    threads = [threading.Thread(target=pull) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert errors == []
    assert results == [test_images.multi.image_id] * 4
    assert svc.pulls_done == 1
    with open(calls) as f:
        assert f.read().split().count("copy") == 1


def test_unknown_repository_and_tag_are_named(svc, test_images):
    reg = test_images.registry
    with pytest.raises(NotFound) as e:
        svc.pull(f"{reg}/vmcri-test/no-such-repo:1.0")
    assert "vmcri-test/no-such-repo" in str(e.value) and str(reg) in str(e.value)
    with pytest.raises(NotFound) as e:
        svc.pull(f"{reg}/vmcri-test/busybox:no-such-tag")
    assert "no-such-tag" in str(e.value) and str(reg) in str(e.value)


def test_unreachable_registry_is_unavailable_and_named(svc):
    from tests.support.fx_registry import free_port
    host = f"127.0.0.1:{free_port()}"
    with pytest.raises(Unavailable) as e:
        svc.pull(f"{host}/vmcri-test/busybox:1.0")
    assert host in str(e.value)


@pytest.mark.parametrize("bad", ["UPPER/Case:1", "busybox:bad tag", "a//b", "busybox@sha256:123",
                                 "busybox:", ":tag"])
def test_malformed_reference_is_invalid_argument(svc, bad):
    with pytest.raises(InvalidArgument) as e:
        svc.pull(bad)
    assert repr(bad) in str(e.value)


def test_remove_by_tag_digest_and_id(svc, test_images):
    img = test_images.single
    for how in (img.ref, img.digest_ref, img.image_id):
        svc.pull(img.ref)
        assert svc.status(img.ref) is not None
        svc.remove(how)
        assert svc.status(img.ref) is None and svc.status(img.image_id) is None
        assert svc.list() == []
        assert os.listdir(svc.store.layers_dir) == [] and os.listdir(svc.store.blobs_dir) == []
    svc.remove(img.ref)  # unknown now: still fine
    svc.remove("sha256:" + "0" * 64)


def test_remove_keeps_layers_other_images_share(svc, test_images):
    single = svc.resolve(svc.pull(test_images.single.ref))
    svc.pull(test_images.multi.ref)
    svc.remove(test_images.multi.ref)
    assert [i.id for i in svc.list()] == [single.id]
    (base,) = svc.layer_dirs(single)
    assert os.path.isfile(os.path.join(base, "bin/busybox"))
    assert len(os.listdir(svc.store.layers_dir)) == 1


def test_list_filter_status_and_verbose_info(svc, test_images):
    import json
    svc.pull(test_images.single.ref)
    svc.pull(test_images.multi.ref)
    assert {i.id for i in svc.list()} == {test_images.single.image_id, test_images.multi.image_id}
    assert [i.id for i in svc.list(test_images.multi.ref)] == [test_images.multi.image_id]
    assert [i.id for i in svc.list(test_images.multi.image_id)] == [test_images.multi.image_id]
    assert svc.list(f"{test_images.registry}/vmcri-test/nothing:1") == []
    assert svc.status(f"{test_images.registry}/vmcri-test/nothing:1") is None
    img = svc.resolve(test_images.multi.ref)
    info = json.loads(svc.verbose_info(img)["info"])
    assert info["layers"] == test_images.multi.diff_ids
    assert info["chainID"].startswith("sha256:") and info["chainID"] != info["layers"][-1]
    assert info["imageSpec"]["config"]["StopSignal"] == "SIGUSR1"


def test_fs_info_counts_what_a_pull_adds(svc, test_images):
    before = svc.fs_info()
    assert before["mountpoint"] == svc.cfg.image_store_dir
    svc.pull(test_images.single.ref)
    after = svc.fs_info()
    assert after["used_bytes"] > before["used_bytes"] + 1_000_000  # busybox + libc, twice
    assert after["inodes_used"] > before["inodes_used"] + len("bin lib lib64 etc".split())
    assert after["timestamp_ns"] > before["timestamp_ns"]


def test_pulling_a_present_image_again_fetches_no_blobs(cfg, test_images, tmp_path):
    wrapper, calls = skopeo_counter(tmp_path)
    store = Store(cfg.db_path)
    svc = ImageService(cfg, store, skopeo=wrapper)
    svc.pull(test_images.multi.ref)
    svc.pull(test_images.multi.digest_ref)
    with open(calls) as f:
        assert f.read().split() == ["inspect", "copy", "inspect"]
    assert svc.resolve(test_images.multi.ref).repo_digests == [test_images.multi.digest_ref]
    store.close()


def test_fs_info_drops_after_remove(svc, test_images):
    svc.pull(test_images.multi.ref)
    full = svc.fs_info()
    svc.remove(test_images.multi.image_id)
    empty = svc.fs_info()
    assert empty["used_bytes"] < full["used_bytes"] - 1_000_000
    assert empty["inodes_used"] < full["inodes_used"]


def test_image_repeating_a_layer(svc, test_images, tmp_path):
    from tests.support.fx_registry import build_layer, push_layout, set_layout_index, write_oci_image
    layout = str(tmp_path / "layout")
    small = build_layer([("file", "again", b"again\n")])
    other = build_layer([("file", "other", b"other\n")])
    first = write_oci_image(layout, [test_images.base_layer, small], {"Cmd": ["true"]})
    rep = write_oci_image(layout, [test_images.base_layer, small, small, other], {"Cmd": ["true"]})
    set_layout_index(layout, "first", [first])
    set_layout_index(layout, "rep", [rep])
    push_layout(layout, "first", f"{test_images.registry}/vmcri-test/repeat:first")
    ref = f"{test_images.registry}/vmcri-test/repeat:rep"
    push_layout(layout, "rep", ref)
    svc.pull(f"{test_images.registry}/vmcri-test/repeat:first")  # repeated blob now held
    dirs = svc.layer_dirs(svc.resolve(svc.pull(ref)))
    assert len(dirs) == 4 and dirs[1] == dirs[2] and len(set(dirs)) == 3
