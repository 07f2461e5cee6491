"""What the agent adds to a container's spec (podenv.py) and the container_exec contract,
without a VM; tests/test_pod_process_vm.py runs the same through a real pod VM."""
import json

import pytest

from vmcri.agent import podenv, protocol
from vmcri.agent.handlers_system import AgentCallError
from vmcri.agent.protocol import ProtocolError
from vmcri.container import ocispec_process
from tests.test_ocispec import build


class FakePodInit:
    pid = 4242

    def ensure(self):
        return self.pid


def prepared(spec, tmp_path, monkeypatch, targets=None):
    monkeypatch.setattr(podenv, "SPEC_DIR", str(tmp_path / "specs"))
    monkeypatch.setattr(podenv, "control_devices", lambda: {("c", 251, 1), ("b", 254, 0)})
    monkeypatch.setattr(podenv, "guest_hugepage_sizes", lambda: {2048: "2MB"})

    def target_pid(cid):
        if cid not in (targets or {}):
            raise AgentCallError("NotFound", f"no container {cid}")
        return targets[cid]
    path = podenv.prepare_spec("c1", spec, FakePodInit(), target_pid)
    assert (tmp_path / "specs" / "c1.json").stat().st_mode & 0o777 == 0o600
    with open(path) as f:
        return json.load(f)


def test_pod_pid_namespace_becomes_the_pod_inits(tmp_path, monkeypatch):
    spec = prepared(build(), tmp_path, monkeypatch)
    assert {"type": "pid", "path": "/proc/4242/ns/pid"} in spec["linux"]["namespaces"]


def test_target_pid_namespace_is_the_target_containers(tmp_path, monkeypatch):
    def spec():
        s = build()
        s["linux"]["namespaces"][1]["path"] = protocol.target_pid_ns("t1")
        return s
    out = prepared(spec(), tmp_path, monkeypatch, targets={"t1": 77})
    assert {"type": "pid", "path": "/proc/77/ns/pid"} in out["linux"]["namespaces"]
    with pytest.raises(AgentCallError, match="no container"):
        prepared(spec(), tmp_path, monkeypatch)


@pytest.mark.parametrize("namespaces", [
    [{"type": "mount"}, {"type": "pid", "path": "/proc/1/ns/pid"}],           # the agent's
    [{"type": "mount", "path": "/proc/1/ns/mnt"}, {"type": "pid"}],
    [{"type": "mount"}, {"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}],
    [{"type": "pid"}],                                                         # no own mount ns
    [{"type": "mount"}],                                                       # no pid entry
    [{"type": "mount"}, {"type": "pid", "path": protocol.TARGET_PID_NS_PREFIX + "../x/pid"}],
])
def test_no_spec_joins_the_agents_namespaces(namespaces, tmp_path, monkeypatch):
    spec = build()
    spec["linux"]["namespaces"] = namespaces
    with pytest.raises(AgentCallError) as e:
        prepared(spec, tmp_path, monkeypatch)
    assert e.value.kind == "InvalidArgument" and str(e.value).startswith(
        ("linux.namespaces", "namespace_options.target_id"))


def test_control_devices_are_denied_after_the_specs_own_rules(tmp_path, monkeypatch):
    spec = build()
    spec["linux"]["resources"]["devices"] = [{"allow": True, "access": "rwm"}]  # privileged
    devices = prepared(spec, tmp_path, monkeypatch)["linux"]["resources"]["devices"]
    assert devices[0] == {"allow": True, "access": "rwm"}
    assert {"allow": False, "type": "b", "major": 254, "minor": 0, "access": "rwm"} in devices[1:]
    assert {"allow": False, "type": "c", "major": 251, "minor": 1, "access": "rwm"} in devices[1:]


@pytest.mark.parametrize("source", ["/dev", "/", "/run/vmcri/share", "/dev/virtio-ports/vmcri.agent"])
def test_the_guests_own_dirs_are_never_bind_sources(source, tmp_path, monkeypatch):
    spec = build()
    spec["mounts"].append({"destination": "/x", "type": "bind", "source": source,
                           "options": ["rbind"]})
    with pytest.raises(AgentCallError, match="mounts:"):
        prepared(spec, tmp_path, monkeypatch)


def test_hugepages_keep_the_guests_sizes_and_drop_zero_limits_of_others(monkeypatch):
    monkeypatch.setattr(podenv, "guest_hugepage_sizes", lambda: {2048: "2MB"})
    limits = [{"pageSize": "1GB", "limit": 0}, {"pageSize": "2MB", "limit": 0}]
    assert podenv.filter_hugepages(limits, "f") == [{"pageSize": "2MB", "limit": 0}]
    assert podenv.filter_hugepages([{"pageSize": "2048KB", "limit": 4 << 20}], "f") == \
        [{"pageSize": "2MB", "limit": 4 << 20}]
    with pytest.raises(AgentCallError, match=r"f\[1\]: the pod VM has no 1GB huge pages \(it has: 2MB\)"):
        podenv.filter_hugepages([limits[1], {"pageSize": "1GB", "limit": 1 << 30}], "f")
    for bad in ({"pageSize": "2Mi", "limit": 0}, {"pageSize": "2MB", "limit": -1}, "2MB"):
        with pytest.raises(AgentCallError, match=r"f\[0\]"):
            podenv.filter_hugepages([bad], "f")


def test_kernel_names_of_page_sizes():
    assert podenv._kernel_size_name(2048) == "2MB"
    assert podenv._kernel_size_name(1 << 20) == "1GB"
    assert podenv._kernel_size_name(64) == "64KB"


# -- the container_exec contract --------------------------------------------------------

def exec_params(**over):
    process = ocispec_process.exec_process(build()["process"], ["id"], tty=False)
    ce = {"id": "c1", "token": "0123456789abcdef", "process": process}
    ce.update(over.pop("ce", {}))
    return {"container_exec": ce, **over}


def test_container_exec_round_trips():
    p = protocol.validate("run", exec_params())
    assert "argv" not in p and p["container_exec"]["process"]["args"] == ["id"]


@pytest.mark.parametrize("params, field", [
    (exec_params(argv=["sh"]), "argv:"),
    (exec_params(ce={"token": "../../etc"}), "container_exec.token:"),
    (exec_params(ce={"id": "../c"}), "container_exec.id:"),
    (exec_params(tty=True), "container_exec.process.terminal:"),
    (exec_params(ce={"process": {"args": ["id"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                                 "hooks": {}}}), "container_exec.process.hooks:"),
    (exec_params(ce={"process": {"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}}),
     "container_exec.process.args:"),
    (exec_params(ce={"process": {"args": ["id"], "cwd": "tmp", "user": {"uid": 0, "gid": 0}}}),
     "container_exec.process.cwd:"),
    (exec_params(ce={"process": {"args": ["id"], "cwd": "/", "user": {"uid": "0", "gid": 0}}}),
     "container_exec.process.user.uid:"),
    (exec_params(ce={"process": {"args": ["id"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                                 "capabilities": {"bounding": ["ALL; rm"]}}}),
     "container_exec.process.capabilities.bounding[0]:"),
])
def test_hostile_container_exec_names_the_field(params, field):
    with pytest.raises(ProtocolError) as e:
        protocol.validate("run", params)
    assert str(e.value).startswith(field), e.value


# -- the cached rootfs view (protocol.ROOTFS_TAG) ------------------------------------------

def test_root_moves_to_the_cached_view_only_when_it_is_mounted(tmp_path):
    shared = protocol.container_bundle("c1") + "/rootfs"
    spec = {"root": {"path": shared}}
    podenv._cached_root("c1", spec, rootfs_mount=str(tmp_path))  # not a mount point
    assert spec["root"]["path"] == shared
    podenv._cached_root("c1", spec, rootfs_mount="/proc")  # a mount point stands in for it
    assert spec["root"]["path"] == "/proc/containers/c1/rootfs"
    other = {"root": {"path": protocol.container_bundle("c2") + "/rootfs"}}
    podenv._cached_root("c1", other, rootfs_mount="/proc")  # another container's: left alone
    assert other["root"]["path"] == protocol.container_bundle("c2") + "/rootfs"


def test_the_cached_view_is_not_a_bind_source():
    spec = {"mounts": [{"destination": "/x", "type": "bind", "source": protocol.ROOTFS_MOUNT}]}
    with pytest.raises(AgentCallError, match="guest's own"):
        podenv._check_mounts(spec)
