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


def test_emulator_wrapper_joins_the_listed_cgroups_then_becomes_qemu(tmp_path):
    import os
    import subprocess
    fake_cg = tmp_path / "cg"
    fake_cg.mkdir()
    run = tmp_path / "run"
    path = podcgroup.emulator_wrapper(str(run), "/bin/echo")
    mtime = os.stat(path).st_mtime_ns
    assert podcgroup.emulator_wrapper(str(run), "/bin/echo") == path
    assert os.stat(path).st_mtime_ns == mtime  # unchanged: libvirt need not probe it again
    (run / "cgroup-targets").mkdir()
    (run / "cgroup-targets" / "vmcri-abc").write_text(f"{fake_cg}\n")
    out = subprocess.run([path, "-name", "guest=vmcri-abc,debug-threads=on", "-S"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "-name guest=vmcri-abc,debug-threads=on -S"  # exec'd with its args
    assert (fake_cg / "cgroup.procs").read_text().strip().isdigit()
    # a domain with no targets file (a capability probe, a pod without a parent) just runs
    (fake_cg / "cgroup.procs").unlink()
    subprocess.run([path, "-name", "guest=other", "-S"], capture_output=True, check=True)
    assert not (fake_cg / "cgroup.procs").exists()
    # a join that fails fails the start
    (run / "cgroup-targets" / "vmcri-bad").write_text(f"{tmp_path}/missing\n")
    assert subprocess.run([path, "-name", "guest=vmcri-bad"], capture_output=True).returncode != 0
