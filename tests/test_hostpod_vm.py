"""A host sandbox beside a pod VM in one daemon: kill -9 of the daemon adopts both, and the
figures a host pod costs against a VM pod (RunPodSandbox, create+start, ExecSync p50).
Boots a VM: run under the VM lock (flock /tmp/vmcri-vm.lock)."""
from __future__ import annotations

import os
import statistics
import time

import pytest
from cri_api.v1 import api_pb2 as pb

from tests.test_hostpod_cri import COUNTER, NODE, Env, assert_continuous, kill9_and_restart, \
    log_entries, verbose
from tests.support.pods import wait_for

pytestmark = [pytest.mark.vm, pytest.mark.registry,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


@pytest.fixture(scope="module")
def env(daemon_factory, test_images, tmp_path_factory):
    d = daemon_factory('cni_conf_dir = ""\ninsecure_registries = ["%s"]' % test_images.registry)
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=test_images.multi.ref)))
    e = Env(d, test_images.multi.ref, str(tmp_path_factory.mktemp("hostvm-logs")))
    yield e
    for sid in list(e.pods):
        e.remove(sid)


def _timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def _figures(env, sid, cfg, tag: str, containers: int, execs: int) -> dict:
    starts, cids = [], []
    for i in range(containers):
        cid, took = _timed(lambda: env.start(sid, cfg, f"{tag}{i}", ["sleep", "100000"]))
        starts.append(took)
        cids.append(cid)
    env.exec(cids[0], ["true"])  # warm: the first exec in a VM opens its agent session
    execs_s = [_timed(lambda: env.exec(cids[0], ["true"]))[1] for _ in range(execs)]
    return {"create+start p50": statistics.median(starts),
            "ExecSync p50": statistics.median(execs_s)}


def test_host_pod_beside_a_vm_pod_figures_and_kill9(env):
    host_runs = []
    for i in range(3):
        (sid, cfg), took = _timed(lambda: env.run_pod(f"hfig{i}", network=NODE))
        host_runs.append(took)
    (vm_sid, vm_cfg), vm_run = _timed(lambda: env.run_pod("vmfig"))
    assert verbose(env, vm_sid)["kind"] == "vm" and verbose(env, sid)["kind"] == "host"
    host = _figures(env, sid, cfg, "h", 5, 30)
    vm = _figures(env, vm_sid, vm_cfg, "v", 3, 30)
    host["RunPodSandbox"], vm["RunPodSandbox"] = statistics.median(host_runs), vm_run
    print("\nfigures (s)          host pod   VM pod (cold boot, TCG)")
    for key in ("RunPodSandbox", "create+start p50", "ExecSync p50"):
        print(f"  {key:18} {host[key]:9.3f}  {vm[key]:9.3f}")
    # both keep running through kill -9 of the daemon; logs continue exactly once
    h_cid = env.start(sid, cfg, "hcount", COUNTER)
    v_cid = env.start(vm_sid, vm_cfg, "vcount", COUNTER)
    logs = [os.path.join(c.log_directory, n) for c, n in ((cfg, "hcount.log"),
                                                           (vm_cfg, "vcount.log"))]
    for path in logs:
        wait_for(lambda: os.path.exists(path) and len(log_entries(path)) >= 5, "lines", 60)
    kill9_and_restart(env.d)
    for s in (sid, vm_sid):
        st = env.cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=s)).status
        assert st.state == pb.PodSandboxState.SANDBOX_READY
    for cid in (h_cid, v_cid):
        assert env.state(cid) == pb.ContainerState.CONTAINER_RUNNING
        assert env.exec(cid, ["echo", "adopted"]) == (0, b"adopted\n")
    counts = [assert_continuous(p) for p in logs]
    time.sleep(1.5)
    assert all(assert_continuous(p) > n for p, n in zip(logs, counts))
    for cid in (h_cid, v_cid):
        env.cri.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1))
    for path in logs:
        assert_continuous(path)
    for s in list(env.pods):
        env.remove(s)
