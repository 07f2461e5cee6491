"""Daemon killed with SIGKILL under running pods: nothing lost, nothing repeated.

Three pods, each with a container printing numbered lines. The daemon dies mid-stream and
comes back; every pod is READY, every container RUNNING, ExecSync works, and each log holds
every sequence number exactly once: output made while the daemon was down is replayed from
the agent's ring, output in flight at the kill is neither lost nor written twice (offsets).

Pod networking is off here: with CNI the daemon would have to run in the host netns (libvirtd
makes the taps there), and tests never put bridges or addresses into the real host netns.
"""
import os
import signal
import time

import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.pods import wait_for
from tests.test_container_vm import LOG_LINE
from tests.test_sandbox_vm import pod_config

pytestmark = [pytest.mark.reliability, pytest.mark.vm, pytest.mark.registry]

COUNTER = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done"
PODS = 3
KILLS = 3


def counter_config(name: str, image: str) -> pb.ContainerConfig:
    return pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name),
                              image=pb.ImageSpec(image=image), command=["/bin/sh", "-c"],
                              args=[COUNTER], log_path=f"{name}.log")


def sequence_in(path: str) -> list[int]:
    """The numbers of the counter's log, in file order (whole lines only)."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    out, partial = [], b""
    for line in lines:
        m = LOG_LINE.match(line)
        assert m, line
        partial += m.group(3)
        if m.group(2) == b"F":
            out.append(int(partial))
            partial = b""
    return out




def test_sigkill_restart_loses_and_repeats_no_log_line(daemon_factory, test_images, tmp_path):
    d = daemon_factory('cni_conf_dir = ""\ninsecure_registries = ["%s"]' % test_images.registry)
    image = test_images.multi.ref
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)))
    pods = []
    try:
        for n in range(PODS):
            cfg = pod_config(f"restart-{n}")
            cfg.log_directory = str(tmp_path / f"pod{n}")
            os.makedirs(cfg.log_directory)
            sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
            cid = d.runtime.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=sid, config=counter_config("counter", image),
                sandbox_config=cfg)).container_id
            d.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
            pods.append((sid, cid, os.path.join(cfg.log_directory, "counter.log")))

        # well into the stream, kill the daemon at a moment it is writing
        for _, _, path in pods:
            wait_for(lambda: os.path.exists(path) and len(sequence_in(path)) >= 20, "log lines")
        before = [len(sequence_in(p)) for _, _, p in pods]
        for kill in range(KILLS):
            d.stop(signal.SIGKILL)
            time.sleep(3)  # output keeps coming while nobody listens
            d.start()
            time.sleep(kill)  # the next kill lands at a different point of the stream

        for sid, cid, path in pods:
            st = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid))
            assert st.status.state == pb.PodSandboxState.SANDBOX_READY
            cst = d.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
            assert cst.state == pb.ContainerState.CONTAINER_RUNNING, cst
            r = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["echo", "alive"],
                                                      timeout=60))
            assert (r.exit_code, r.stdout) == (0, b"alive\n")
        # the replay covered the downtime and the stream goes on after it
        for (_, _, path), n_before in zip(pods, before):
            wait_for(lambda: len(sequence_in(path)) >= n_before + 100,
                     "output from after the restarts", timeout=300)
        for _, cid, _ in pods:
            d.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=5))
        for _, cid, path in pods:
            seq = sequence_in(path)
            dupes = len(seq) - len(set(seq))
            gaps = sorted(set(range(seq[-1] + 1)) - set(seq))
            print(f"{cid[:12]}: {len(seq)} lines, last {seq[-1]}, dupes {dupes}, gaps {gaps[:10]}")
            assert seq == list(range(len(seq))), (dupes, gaps[:20])
    finally:
        for sid, _, _ in pods:
            d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
            d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
