"""Host side of a container's volumes, without a VM: what the guest's export (a peer copy
of the share, as qemu sees it) gets for hostPath binds and image volumes.

The point of each check is the *copy*: flags set by a remount after the bind never reach
it, so these look at the export's mountinfo rows, not the share's. Needs root."""
import errno
import os
import shutil
import subprocess

import pytest
from cri_api.v1 import api_pb2 as pb

from vmcri.container import imagevol, ocispec, rootfs
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
    guest, subs = rootfs.bind_host_path(dirs, 0, host_path, readonly, rro)
    assert guest == "/run/vmcri/share/containers/c1/mounts/0"
    assert subs == [("tmpfs", "/run/vmcri/share/containers/c1/mounts/0.0")]
    for point, want in ((exported(dirs, export, "0"), top), (exported(dirs, export, "0.0"), sub)):
        assert {want, "nosuid", "nodev"} <= flags(point), (point, flags(point))
    with open(exported(dirs, export, "0", "file")) as f:
        assert f.read() == "top\n"
    assert not os.listdir(exported(dirs, export, "0", "tmpfs"))  # the submount is not in the top
    # the guest's bind of the top is read-only as asked: the submount is a bind of its own
    assert rootfs.guest_readonly(readonly, rro) == readonly


def test_host_path_owner_can_remove_a_submount_while_it_is_bound(share, host_path):
    """critest's readonly-mount cleanup: unmount (detach) the hostPath's tmpfs and remove the
    tree while the container still runs. With one rbind the copy of the tmpfs sat on the
    host's own dir, which then stayed a mount point here: rmdir said EBUSY."""
    dirs, export = share
    rootfs.bind_host_path(dirs, 0, host_path, True, False)
    subprocess.run(["umount", "-l", os.path.join(host_path, "tmpfs")], check=True)  # MNT_DETACH
    shutil.rmtree(host_path)
    assert not os.path.exists(host_path)
    assert exported(dirs, export, "0.0") in {m["point"] for m in hostfs.mount_table()}


def test_submounts_are_bound_in_place_in_the_spec():
    m = pb.Mount(container_path="/mnt", host_path="/h", readonly=True)
    guest = ocispec.GuestPaths(hosts="/h", resolv_conf="/r", hostname="/n", shm="/s",
                               host_mount_to_guest={}, prepared={0: ocispec.PreparedMount(
                                   "/g/0", True, submounts=(("tmpfs", "/g/0.0", False),))})
    config = pb.ContainerConfig(mounts=[m])
    mounts, _ = ocispec.build_mounts(config, guest, privileged=False)
    by_dest = {x["destination"]: x for x in mounts}
    assert by_dest["/mnt"]["source"] == "/g/0" and "ro" in by_dest["/mnt"]["options"]
    assert by_dest["/mnt/tmpfs"]["source"] == "/g/0.0" and "rw" in by_dest["/mnt/tmpfs"]["options"]
    order = [x["destination"] for x in mounts]
    assert order.index("/mnt") < order.index("/mnt/tmpfs")


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
