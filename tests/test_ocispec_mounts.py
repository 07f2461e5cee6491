"""Host side of a container's volumes, without a VM: what the guest's export (a peer copy
of the share, as qemu sees it) gets for hostPath binds and image volumes.

The point of each check is the *copy*: flags set by a remount after the bind never reach
it, so these look at the export's mountinfo rows, not the share's. Needs root."""
import errno
import os

import pytest

from vmcri.container import imagevol, rootfs
from vmcri.errors import InvalidArgument
from vmcri.sandbox import hostfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


@pytest.fixture
def share(tmp_path):
    share, export = str(tmp_path / "share"), str(tmp_path / "share-ro")
    hostfs.make_shared_dir(share)
    hostfs.make_guest_export(share, export)
    dirs = rootfs.ContainerDirs.make(share, str(tmp_path / "state"), "c1")
    for d in (dirs.mounts, dirs.upper):
        os.makedirs(d)
    yield dirs, export
    rootfs.release(dirs)
    hostfs.unmount_tree(export)
    hostfs.unmount_tree(share)
    assert not hostfs.mounts_under(str(tmp_path))


def flags(point):
    return {m["point"]: set(m["options"]) for m in hostfs.mount_table()}.get(point)


def exported(dirs, export, *parts):
    return os.path.join(export, "containers", "c1", "mounts", *parts)


@pytest.fixture
def host_path(tmp_path):
    """A hostPath with a writable tmpfs mounted inside it (critest's RRO fixture)."""
    path = tmp_path / "hostpath"
    (path / "tmpfs").mkdir(parents=True)
    (path / "file").write_text("top\n")
    hostfs._mount("none", str(path / "tmpfs"), "tmpfs", 0, "size=1m")
    yield str(path)
    hostfs.unmount_tree(str(path))


@pytest.mark.parametrize("readonly,rro,top,sub", [
    (False, False, "rw", "rw"), (True, False, "ro", "rw"), (True, True, "ro", "ro")])
def test_host_path_flags_reach_the_export(share, host_path, readonly, rro, top, sub):
    dirs, export = share
    guest, submounts = rootfs.bind_host_path(dirs, 0, host_path, readonly, rro)
    assert guest == "/run/vmcri/share/containers/c1/mounts/0" and submounts
    for point, want in ((exported(dirs, export, "0"), top),
                        (exported(dirs, export, "0", "tmpfs"), sub)):
        assert {want, "nosuid", "nodev"} <= flags(point), (point, flags(point))
    with open(exported(dirs, export, "0", "file")) as f:
        assert f.read() == "top\n"
    # the guest's own bind: read-only only where that does not cover a writable submount
    assert rootfs.guest_readonly(readonly, rro, submounts) == (readonly and rro)
    assert rootfs.guest_readonly(True, False, False)


def layers(tmp_path):
    low, top = tmp_path / "layer0", tmp_path / "layer1"
    (low / "data" / "sub").mkdir(parents=True)
    (low / "data" / "file").write_text("low\n")
    (low / "etc").mkdir()
    (top / "data").mkdir(parents=True)
    (top / "data" / "file").write_text("top\n")
    os.symlink("/etc", top / "data" / "abs-link")
    os.symlink("../../..", top / "data" / "up-link")
    return [str(low), str(top)]


@pytest.mark.parametrize("n_layers", [1, 2])
def test_image_volume_is_read_only_in_the_export(share, tmp_path, n_layers):
    dirs, export = share
    target = imagevol.mount_volume(dirs, 0, layers(tmp_path)[:n_layers], "data")
    assert target == os.path.join(dirs.mounts, "0")
    copy = exported(dirs, export, "0")
    assert {"ro", "nosuid", "nodev"} <= flags(copy)
    with open(os.path.join(copy, "file")) as f:
        assert f.read() == ("low\n" if n_layers == 1 else "top\n")
    with pytest.raises(OSError) as e:
        open(os.path.join(target, "new"), "w")
    assert e.value.errno == errno.EROFS
    assert not os.listdir(os.path.join(dirs.private, "imagevol"))  # the staging mount went


@pytest.mark.parametrize("sub,expect", [
    ("data/abs-link", "sub"),      # /etc of the image, not the host's
    ("data/up-link", "data"),      # .. stops at the image's root
])
def test_image_sub_path_links_stay_in_the_image(share, tmp_path, sub, expect):
    dirs, _ = share
    target = imagevol.mount_volume(dirs, 0, layers(tmp_path), sub)
    names = sorted(os.listdir(target))
    assert (names == []) if expect == "sub" else ("data" in names and "etc" in names), names


@pytest.mark.parametrize("sub,message", [
    ("nope", r"config\.mounts\[0\]\.image_sub_path: 'nope' does not exist in the image"),
    ("data/file", r"config\.mounts\[0\]\.image_sub_path: 'data/file' is not a directory"),
    ("../x", r"config\.mounts\[0\]\.image_sub_path: '\.\./x' escapes the image"),
])
def test_bad_image_sub_path_is_refused_and_leaves_no_mount(share, tmp_path, sub, message):
    dirs, _ = share
    with pytest.raises(InvalidArgument, match=message):
        imagevol.mount_volume(dirs, 0, layers(tmp_path), sub)
    assert not [p for p in hostfs.mounts_under(dirs.bundle)]
    assert not hostfs.mounts_under(dirs.private)
