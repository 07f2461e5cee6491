"""Named network namespaces under vmcri's run dir (real kernel namespaces)."""
import os
import subprocess

import pytest

from vmcri import errors
from vmcri.network import netns


@pytest.fixture
def ns_dir(tmp_path):
    d = str(tmp_path / "netns")
    yield d
    for name in netns.list_names(d):
        netns.delete(d, name)
    netns.release_dir(d)


def _inode(path):
    return os.stat(path).st_ino


def test_create_gives_a_new_namespace_and_delete_is_idempotent(ns_dir):
    path = netns.create(ns_dir, "pod1")
    assert path == os.path.join(ns_dir, "pod1")
    assert netns.exists(path)
    assert _inode(path) != _inode("/proc/self/ns/net")
    assert netns.list_names(ns_dir) == ["pod1"]
    links = subprocess.run(["nsenter", f"--net={path}", "ip", "-j", "link"],
                           capture_output=True, text=True, check=True).stdout
    assert '"ifname":"lo"' in links and "eth0" not in links  # empty new namespace

    netns.delete(ns_dir, "pod1")
    assert not os.path.exists(path)
    assert netns.list_names(ns_dir) == []
    netns.delete(ns_dir, "pod1")  # second delete: no error


def test_create_twice_is_already_exists(ns_dir):
    netns.create(ns_dir, "pod2")
    with pytest.raises(errors.AlreadyExists):
        netns.create(ns_dir, "pod2")
    assert netns.exists(os.path.join(ns_dir, "pod2"))  # the first one is untouched


def test_delete_half_gone_namespace(ns_dir):
    path = netns.create(ns_dir, "pod3")
    subprocess.run(["umount", path], check=True)  # mount gone, file left (crash mid-delete)
    assert not netns.exists(path)
    assert netns.list_names(ns_dir) == ["pod3"]  # reconcile still sees it
    netns.delete(ns_dir, "pod3")
    assert netns.list_names(ns_dir) == []


def test_namespaces_are_distinct(ns_dir):
    a = netns.create(ns_dir, "a")
    b = netns.create(ns_dir, "b")
    assert _inode(a) != _inode(b)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 200])
def test_bad_names_are_refused(ns_dir, bad):
    with pytest.raises(errors.InvalidArgument, match="netns name"):
        netns.create(ns_dir, bad)


def test_in_netns_switches_only_inside_the_block(ns_dir):
    path = netns.create(ns_dir, "ctx")
    host = _inode("/proc/thread-self/ns/net")
    with netns.InNetns(path):
        assert _inode("/proc/thread-self/ns/net") == _inode(path)
    assert _inode("/proc/thread-self/ns/net") == host
