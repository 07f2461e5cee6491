"""StartContainer in the guest without a `crun start` process: the agent releases the
created init through crun's exec fifo itself (handlers_container._release_init). Run here
against the host's real crun, which is the same crun 1.x the guest image carries."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from vmcri.agent import handlers_container as hc
from vmcri.agent.handlers_system import AgentCallError

pytestmark = pytest.mark.skipif(shutil.which("crun") is None or os.geteuid() != 0,
                                reason="needs crun and root")


# The host is cgroup v1 plus a hugetlb-only cgroup2 mount ("hybrid"), which crun refuses;
# as in test_ocispec_crun.py, crun runs in a mount namespace without that cgroup2 mount.
HIDE_HYBRID = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               'umount /sys/fs/cgroup/unified 2>/dev/null; exec crun "$@"', "sh"]


def _crun(root, *args, check=True):
    return subprocess.run([*HIDE_HYBRID, "--root", root, *args], capture_output=True, text=True,
                          check=check, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def created(tmp_path, monkeypatch):
    from tests.support.fx_registry import busybox_rootfs
    root, bundle = str(tmp_path / "state"), tmp_path / "bundle"
    os.makedirs(root)
    os.makedirs(bundle)
    busybox_rootfs(str(bundle / "rootfs"))
    subprocess.run(["crun", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["/bin/sh", "-c", "echo started > /started"]
    spec["root"]["readonly"] = False
    (bundle / "config.json").write_text(json.dumps(spec))
    monkeypatch.setattr(hc, "CRUN_STATE_ROOT", root)
    cid = f"start-{os.getpid()}"
    with open(tmp_path / "create.err", "w+") as err:  # the init keeps what it inherits
        rc = subprocess.run([*HIDE_HYBRID, "--root", root, "create", "--bundle", str(bundle), cid],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                            timeout=60).returncode
        err.seek(0)
        assert rc == 0, err.read()
    yield root, bundle, cid
    _crun(root, "delete", "-f", cid, check=False)


def _status(root, cid):
    return json.loads(_crun(root, "state", cid).stdout)["status"]


def test_the_init_runs_once_released_and_crun_sees_it_started(created):
    root, bundle, cid = created
    assert _status(root, cid) == "created"
    assert not (bundle / "rootfs/started").exists()
    assert hc._release_init(cid) is True
    deadline = time.monotonic() + 30
    while not (bundle / "rootfs/started").exists():
        assert time.monotonic() < deadline, "the released init never ran"
        time.sleep(0.05)
    assert (bundle / "rootfs/started").read_text() == "started\n"
    assert _status(root, cid) in ("running", "stopped")
    assert hc._release_init(cid) is False  # fifo gone: crun start answers for itself
    assert _crun(root, "start", cid, check=False).returncode != 0  # crun agrees: started


def test_an_init_that_is_gone_is_a_precondition_error(tmp_path, monkeypatch):
    monkeypatch.setattr(hc, "CRUN_STATE_ROOT", str(tmp_path))
    os.makedirs(tmp_path / "dead")
    os.mkfifo(tmp_path / "dead/exec.fifo")  # nobody holds the read end
    with pytest.raises(AgentCallError) as e:
        hc._release_init("dead")
    assert e.value.kind == "FailedPrecondition" and "id:" in str(e.value)


def test_a_container_crun_does_not_know_goes_to_crun(tmp_path, monkeypatch):
    monkeypatch.setattr(hc, "CRUN_STATE_ROOT", str(tmp_path))
    assert hc._release_init("unknown") is False


def test_a_symlinked_fifo_is_not_followed(tmp_path, monkeypatch):
    monkeypatch.setattr(hc, "CRUN_STATE_ROOT", str(tmp_path))
    os.makedirs(tmp_path / "c")
    os.mkfifo(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", tmp_path / "c/exec.fifo")
    with pytest.raises(AgentCallError):
        hc._release_init("c")
    assert os.path.exists(tmp_path / "elsewhere")
