"""The daemon through its real unix socket: Version, Status, RuntimeConfig, socket mode."""
import os
import stat
import subprocess
import sys

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb


def test_version(daemon):
    v = daemon.runtime.Version(pb.VersionRequest(version="v1"))
    assert v.runtime_name == "vmcri"
    assert v.runtime_api_version == "v1"
    assert v.runtime_version


def test_socket_is_root_only(daemon):
    mode = stat.S_IMODE(os.stat(daemon.socket).st_mode)
    assert mode == 0o600, oct(mode)


def test_status_reports_both_conditions(daemon):
    st = daemon.runtime.Status(pb.StatusRequest(verbose=True))
    conds = {c.type: c for c in st.status.conditions}
    assert set(conds) == {"RuntimeReady", "NetworkReady"}
    for c in conds.values():
        if not c.status:
            assert c.reason and c.message, c
    assert "accel" in st.info["config"]


def test_status_libvirt_unreachable(daemon_factory):
    d = daemon_factory('libvirt_uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"')
    st = d.runtime.Status(pb.StatusRequest())
    rr = next(c for c in st.status.conditions if c.type == "RuntimeReady")
    assert rr.status is False
    assert rr.reason == "LibvirtUnreachable"
    assert "nonexistent" in rr.message


def test_runtime_config_cgroup_driver(daemon):
    r = daemon.runtime.RuntimeConfig(pb.RuntimeConfigRequest())
    assert r.linux.cgroup_driver == pb.CgroupDriver.CGROUPFS


def test_unimplemented_rpc_says_so(daemon):
    with pytest.raises(grpc.RpcError) as e:
        daemon.runtime.CheckpointContainer(pb.CheckpointContainerRequest(container_id="x"))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CheckpointContainer" in e.value.details()


def test_bad_config_names_the_key(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('default_memory_mib = "lots"\n')
    r = subprocess.run([sys.executable, "-m", "vmcri.cli", "--config", str(cfg), "serve"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "default_memory_mib" in r.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_flag_before_or_after_the_subcommand(tmp_path, where):
    """README documents `vmcri serve --config FILE`; `vmcri --config FILE serve` works too."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('default_memory_mib = 321\n')
    argv = (["--config", str(cfg), "config"] if where == "before"
            else ["config", "--config", str(cfg)])
    r = subprocess.run([sys.executable, "-m", "vmcri.cli", *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"default_memory_mib": 321' in r.stdout
