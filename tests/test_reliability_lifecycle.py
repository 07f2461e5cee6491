"""Pods that die or come and go in numbers: nothing left behind, nobody else disturbed.

- QEMU killed under a pod with a container: the pod turns NOTREADY and its container EXITED
  (reason VMGone) from the libvirt event alone; the other pod keeps working; removing the
  dead pod leaves no domain, netns, tap, mount, dir, row or iptables chain.
- 10 concurrent RunPodSandbox -> CreateContainer -> Start -> Stop -> Remove cycles, twice:
  the daemon's footprint (domains, netns, taps, veths, leases, iptables chains and rules,
  mounts, dirs, rows, fds, threads) is the same afterwards.

The pods get the CNI config scripts/run.sh installs (packaging/cni: bridge with ipMasq,
host-local, portmap), in a node netns of the test's own, so the nat and filter tables
counted are that netns's.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
import json

import grpc
import libvirt
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.fx_cni import NodeNetwork
from tests.support.pods import start_container
from tests.test_sandbox_vm import pod_config
from vmcri.network.tap import tap_name_for

pytestmark = [pytest.mark.reliability, pytest.mark.vm, pytest.mark.registry]

CONCURRENT = 10
ROUNDS = 2


def _domains(d) -> list[str]:
    conn = libvirt.open("qemu:///system")
    try:
        out = []
        for dom in conn.listAllDomains(0):
            try:
                if d.root_dir in dom.XMLDesc(0):
                    out.append(dom.name())
            except libvirt.libvirtError:
                pass  # went away while we looked
        return out
    finally:
        conn.close()


def _taps(sandbox_ids, node) -> list[str]:
    """Pod taps left in libvirt's (the host's) netns or in the node's."""
    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True,
                                      check=True).stdout or "[]")
    ours = {tap_name_for(s) for s in sandbox_ids}
    return [n for n in [link["ifname"] for link in links] + node.links() if n in ours]


def _rows(d) -> dict[str, int]:
    db = sqlite3.connect(f"file:{os.path.join(d.root_dir, 'vmcri.db')}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}
    finally:
        db.close()


def _dirs(top: str) -> frozenset:
    """Dirs below the top-level ones (those, like sandboxes/, are made on first use)."""
    return frozenset(rel for root, subdirs, _ in os.walk(top) for sub in subdirs
                     if os.sep in (rel := os.path.relpath(os.path.join(root, sub), top)))


def footprint(d, node, sandbox_ids=()) -> dict:
    netns_dir = os.path.join(d.run_dir, "netns")
    with open("/proc/self/mountinfo") as f:
        # the netns dir's own shared self-bind is made once, on first use, and stays
        mounts = [line for line in f if d.base in line and line.split()[4] != netns_dir]
    return {
        "domains": len(_domains(d)),
        "netns": len(os.listdir(netns_dir)) if os.path.isdir(netns_dir) else 0,
        "taps": len(_taps(sandbox_ids, node)),
        "bridge_ports": len(node.bridge_ports()),
        "veths": len(node.veths()),
        "leases": len(node.leases()),
        **{f"iptables_{table}": rules for table, rules in node.iptables().items()},
        "mounts": len(mounts),
        "dirs_root": _dirs(d.root_dir),
        "dirs_run": _dirs(d.run_dir),
        "rows": _rows(d),
        "fds": len(os.listdir(f"/proc/{d.proc.pid}/fd")),
        "threads": len(os.listdir(f"/proc/{d.proc.pid}/task")),
    }


LEAK_KEYS = ("domains", "netns", "bridge_ports", "veths", "leases", "iptables_nat",
             "iptables_filter", "mounts", "dirs_root", "dirs_run", "rows")


def _masq_chains(fp) -> list[str]:
    return [r for r in fp["iptables_nat"] if r.startswith("-N CNI-") and "HOSTPORT" not in r]


def settled_footprint(d, node, sandbox_ids=(), want=None, timeout=60) -> dict:
    """Threads and fds of closed connections go away asynchronously: wait a little."""
    deadline = time.monotonic() + timeout
    while True:
        fp = footprint(d, node, sandbox_ids)
        if want is None or fp == want or time.monotonic() > deadline:
            return fp
        time.sleep(1)


@pytest.fixture(scope="module")
def lc_node(tmp_path_factory):
    node = NodeNetwork(str(tmp_path_factory.mktemp("lcnet")), "10.89.4.0/24", "vmcri-tbr4",
                       packaged=True)
    yield node
    node.remove()


@pytest.fixture(scope="module")
def lc_daemon(daemon_factory, test_images, lc_node):
    # ten TCG boots at once on two cores are slow: the agent timeout is only a hang detector
    d = daemon_factory(lc_node.daemon_config() + 'agent_timeout_s = 900.0\n'
                       'insecure_registries = ["%s"]' % test_images.registry)
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=test_images.multi.ref)))
    lc_node.move_daemon_in(d)  # real bridge CNI: netns, veths, taps and leases get counted
    return d, test_images.multi.ref, lc_node


def run_pod_with_sleeper(d, image, name, log_dir):
    cfg = pod_config(name)
    cfg.log_directory = log_dir
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    return sid, start_container(d, sid, cfg, image, "sleeper", ["sleep", "100000"])


def test_qemu_killed_pod_goes_notready_others_unaffected(lc_daemon, tmp_path):
    d, image, node = lc_daemon
    before = footprint(d, node)
    victim = run_pod_with_sleeper(d, image, "qkill-victim", str(tmp_path))
    bystander = run_pod_with_sleeper(d, image, "qkill-bystander", str(tmp_path))
    try:
        # the counts can see a leak: each pod has its ipMasq chain while it runs
        assert len(_masq_chains(footprint(d, node))) == len(_masq_chains(before)) + 2
        st = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=victim[0],
                                                                   verbose=True))
        os.kill(json.loads(st.info["info"])["vm"]["qemuPid"], signal.SIGKILL)
        killed = time.monotonic()
        # no RPC polls libvirt here: read the rows the lifecycle event updates
        db = sqlite3.connect(f"file:{os.path.join(d.root_dir, 'vmcri.db')}?mode=ro", uri=True)
        try:
            while time.monotonic() - killed < 60:  # a hang detector, not a bound
                row = db.execute("SELECT state, reason FROM containers WHERE id = ?",
                                 (victim[1],)).fetchone()
                if row[0] == "EXITED":
                    break
                time.sleep(0.1)
        finally:
            db.close()
        print(f"container EXITED {time.monotonic() - killed:.2f}s after the qemu kill")
        sst = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=victim[0]))
        assert sst.status.state == pb.PodSandboxState.SANDBOX_NOTREADY
        cst = d.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=victim[1])).status
        assert cst.state == pb.ContainerState.CONTAINER_EXITED
        assert cst.reason == "VMGone" and cst.exit_code == 137 and cst.message
        assert cst.finished_at > 0

        bst = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=bystander[0]))
        assert bst.status.state == pb.PodSandboxState.SANDBOX_READY
        r = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=bystander[1], cmd=["echo", "ok"],
                                                  timeout=60))
        assert r.stdout == b"ok\n"

        d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=victim[0]))
        with pytest.raises(grpc.RpcError) as e:
            d.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=victim[1]))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert victim[0] not in " ".join(_domains(d))
        assert _taps([victim[0]], node) == []
        with open("/proc/self/mountinfo") as f:
            assert not [line for line in f if victim[0] in line]
        for top in (d.root_dir, d.run_dir):
            for root, subdirs, files in os.walk(top):
                assert not [n for n in subdirs + files if victim[0] in n], root
    finally:
        for sid, _ in (victim, bystander):  # Remove stops first; a removed pod is fine
            d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    after = footprint(d, node)
    for key in LEAK_KEYS:
        assert after[key] == before[key], (key, before[key], after[key])


def one_cycle(d, image, name, log_dir, errors, made):
    try:
        sid, cid = run_pod_with_sleeper(d, image, name, log_dir)
        made.append(sid)
        d.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=2))
        d.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
        d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(f"{name}: {e!r}"[:2000])


def test_concurrent_cycles_leak_nothing(lc_daemon, tmp_path):
    d, image, node = lc_daemon
    made: list[str] = []
    start = footprint(d, node)
    warm = None
    for rnd in range(ROUNDS):
        errors: list[str] = []
        t0 = time.monotonic()
        threads = [threading.Thread(target=one_cycle, args=(d, image, f"leak-{rnd}-{i}",
                                                            str(tmp_path), errors, made))
                   for i in range(CONCURRENT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(1800)
        assert not [t for t in threads if t.is_alive()], "a cycle hung"
        assert not errors, "\n".join(errors)
        fp = settled_footprint(d, node, made, want=warm)
        shown = {k: len(v) if isinstance(v, frozenset) else v for k, v in fp.items()}
        print(f"round {rnd}: {time.monotonic() - t0:.0f}s, footprint {shown}")
        if warm is None:
            warm = fp  # worker threads of the gRPC pool exist from the first round on
    # nothing of the pods is left, compared with before any of them
    for key in ("taps", *LEAK_KEYS):
        assert fp[key] == start[key], (key, start[key], fp[key])
    # and the daemon's own fds and threads did not grow from round to round. gRPC's worker
    # pool grows lazily (up to 32), so a busier second round may add a worker or two; a leak
    # per cycle would add at least CONCURRENT.
    assert fp["fds"] == warm["fds"], (start, warm, fp)
    assert fp["threads"] - warm["threads"] <= 2 < CONCURRENT, (start, warm, fp)
