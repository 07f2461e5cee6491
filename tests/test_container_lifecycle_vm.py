"""Container lifecycle edges on a real pod VM: stop timeouts, OOM, readonly rootfs,
partial log lines, ExecSync timeout, log rotation and live resource updates."""
import os
import time

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.test_container_vm import create_start, ctr_config, exec_sync, log_entries, status, wait_state
from tests.support.pods import pod_env

pytestmark = [pytest.mark.vm, pytest.mark.registry]


@pytest.fixture(scope="module")
def env(daemon_factory, test_images, tmp_path_factory):
    yield from pod_env(daemon_factory, test_images, tmp_path_factory, "life")


def remove(env, cid):
    env[0].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def logfile(env, name):
    return os.path.join(env[2].log_directory, f"{name}.log")


def test_stop_timeout_kills_a_container_ignoring_sigterm(env):
    # the image's stop signal is SIGUSR1: the shell ignores both
    cid = create_start(env, ctr_config("stubborn", env[3].multi.ref, command=["/bin/sh", "-c"],
                                       args=["trap '' TERM USR1; echo ready; while true; do sleep 1; done"]))
    wait_state(env, cid, pb.ContainerState.CONTAINER_RUNNING)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not os.path.getsize(logfile(env, "stubborn")):
        time.sleep(0.2)  # the trap is installed once it printed
    t0 = time.monotonic()
    env[0].runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=2))
    waited = time.monotonic() - t0
    st = status(env, cid)
    assert st.state == pb.ContainerState.CONTAINER_EXITED
    assert st.exit_code == 137  # SIGKILL after the grace period
    assert waited >= 2  # it did wait out the grace period before SIGKILL
    remove(env, cid)


def test_oom_killed_reason(env):
    cfg = ctr_config("hog", env[3].multi.ref, command=["/bin/sh", "-c"],
                     args=["echo start; x=a; while true; do x=$x$x; done"])
    cfg.linux.resources.memory_limit_in_bytes = 16 << 20
    cid = create_start(env, cfg)
    st = wait_state(env, cid, pb.ContainerState.CONTAINER_EXITED, timeout=120)
    assert st.reason == "OOMKilled", st
    assert st.exit_code == 137
    remove(env, cid)


def test_readonly_rootfs(env):
    cfg = ctr_config("ro", env[3].multi.ref, command=["/bin/sh", "-c"],
                     args=["touch /newfile 2>/dev/null && echo writable || echo readonly; "
                           "touch /tmp/x 2>/dev/null && echo tmp-writable || echo tmp-readonly"])
    cfg.linux.security_context.readonly_rootfs = True
    cid = create_start(env, cfg)
    wait_state(env, cid, pb.ContainerState.CONTAINER_EXITED)
    lines = [e[2] for e in log_entries(logfile(env, "ro"))]
    assert lines[0] == "readonly"
    remove(env, cid)


def test_partial_line_is_tagged_p(env):
    cid = create_start(env, ctr_config("partial", env[3].multi.ref, command=["/bin/sh", "-c"],
                                       args=["printf 'whole\\nno-newline-at-end'"]))
    wait_state(env, cid, pb.ContainerState.CONTAINER_EXITED)
    entries = log_entries(logfile(env, "partial"))
    assert ("stdout", "F", "whole") in entries
    assert ("stdout", "P", "no-newline-at-end") in entries
    remove(env, cid)


def test_exec_sync_timeout_kills_and_errors(env):
    cid = create_start(env, ctr_config("execto", env[3].multi.ref, command=["sleep", "100000"]))
    wait_state(env, cid, pb.ContainerState.CONTAINER_RUNNING)
    with pytest.raises(grpc.RpcError) as e:
        exec_sync(env, cid, ["/bin/sh", "-c", "sleep 300"], timeout=2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "timed out" in e.value.details()
    # the timed-out process was killed: no `sleep 300` left in the container
    ps = exec_sync(env, cid, ["ps", "-o", "args"]).stdout.decode()
    assert "sleep 300" not in ps
    remove(env, cid)


def test_reopen_container_log_after_rotation(env):
    cid = create_start(env, ctr_config("rotate", env[3].multi.ref, command=["/bin/sh", "-c"],
                                       args=["i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.2; done"]))
    wait_state(env, cid, pb.ContainerState.CONTAINER_RUNNING)
    path = logfile(env, "rotate")
    time.sleep(2)
    os.rename(path, path + ".1")
    env[0].runtime.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not os.path.exists(path) or not os.path.getsize(path)):
        time.sleep(0.2)
    new = [e[2] for e in log_entries(path)]
    old = [e[2] for e in log_entries(path + ".1")]
    assert old and new
    assert int(new[0].split("-")[1]) > int(old[-1].split("-")[1])  # continues, nothing repeated
    env[0].runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    with pytest.raises(grpc.RpcError) as e:
        env[0].runtime.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    remove(env, cid)


def test_update_container_resources_in_the_guest(env):
    cid = create_start(env, ctr_config("resize", env[3].multi.ref, command=["sleep", "100000"]))
    wait_state(env, cid, pb.ContainerState.CONTAINER_RUNNING)
    env[0].runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(
            memory_limit_in_bytes=48 << 20, cpu_quota=20000, cpu_period=100000)))
    out = exec_sync(env, cid, ["cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max"]).stdout.decode()
    assert out.split("\n")[:2] == [str(48 << 20), "20000 100000"], out
    st = status(env, cid)
    assert st.resources.linux.memory_limit_in_bytes == 48 << 20
    with pytest.raises(grpc.RpcError) as e:
        env[0].runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
            container_id=cid, linux=pb.LinuxContainerResources(cpuset_cpus="zero")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cpuset_cpus" in e.value.details()
    remove(env, cid)
