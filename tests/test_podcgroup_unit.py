"""linux.cgroup_parent: what RunPodSandbox accepts, and how a systemd slice is expanded."""
import pytest

from vmcri.errors import InvalidArgument
from vmcri.sandbox import podcgroup


def test_cgroupfs_paths_are_used_as_given():
    assert podcgroup.parent_path("/kubepods/burstable/pod1234") == "/kubepods/burstable/pod1234"
    assert podcgroup.parent_path("/kubepods//besteffort/") == "/kubepods/besteffort"


def test_systemd_slices_expand_like_systemd():
    assert podcgroup.parent_path("kubepods-burstable-pod12_34.slice") == \
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice"
    assert podcgroup.parent_path("kubepods.slice") == "/kubepods.slice"


@pytest.mark.parametrize("bad", ["relative/path", "/kubepods/../../etc", "/a/./b", "/a b",
                                 "/x/" + "y" * 300, "-.slice-", "/a\nb"])
def test_bad_parents_name_the_field(bad):
    with pytest.raises(InvalidArgument) as e:
        podcgroup.parent_path(bad)
    assert str(e.value).startswith("config.linux.cgroup_parent:")


def test_hierarchies_lists_this_hosts_cgroup_mounts():
    mounts = podcgroup.hierarchies()
    assert mounts and all(m.startswith("/sys/fs/cgroup") for m, _ in mounts)
