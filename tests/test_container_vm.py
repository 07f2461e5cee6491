"""Containers inside a real pod VM: images from the local registry, crun in the guest."""
import os
import platform
import re
import time

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.pods import pod_env

pytestmark = [pytest.mark.vm, pytest.mark.registry]
LOG_LINE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr) (P|F) (.*)$")


@pytest.fixture(scope="module")
def env(daemon_factory, test_images, tmp_path_factory):
    yield from pod_env(daemon_factory, test_images, tmp_path_factory, "ctr", images=("single", "multi"))


def ctr_config(name, image, command=None, args=None, **kw):
    return pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name),
                              image=pb.ImageSpec(image=image), command=command or [],
                              args=args or [], log_path=f"{name}.log", labels={"c": name}, **kw)


def create_start(env, config):
    d, sid, pcfg, _ = env
    cid = d.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, config=config, sandbox_config=pcfg)).container_id
    d.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    return cid


def status(env, cid):
    return env[0].runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status


def wait_state(env, cid, state, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(env, cid)
        if st.state == state:
            return st
        time.sleep(0.2)
    raise AssertionError(f"container {cid[:12]} never reached {state}: {st}")


def exec_sync(env, cid, cmd, timeout=60):
    return env[0].runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout))


def log_entries(path):
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        m = LOG_LINE.match(line)
        assert m, line
        out.append((m.group(1).decode(), m.group(2).decode(), m.group(3).decode()))
    return out


@pytest.fixture(scope="module")
def sleeper(env):
    cid = create_start(env, ctr_config("sleeper", env[3].multi.ref, command=["/bin/sh", "-c"],
                                       args=["echo started; echo oops >&2; exec sleep 100000"]))
    yield cid
    env[0].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_container_runs_on_the_guest_kernel(env, sleeper):
    st = wait_state(env, sleeper, pb.ContainerState.CONTAINER_RUNNING)
    assert st.started_at > 0 and st.image.image == env[3].multi.ref
    r = exec_sync(env, sleeper, ["uname", "-r"])
    assert r.exit_code == 0
    guest_kernel = r.stdout.decode().strip()
    assert guest_kernel and guest_kernel != platform.release()


def test_exec_sync_exit_code_and_streams(env, sleeper):
    r = exec_sync(env, sleeper, ["/bin/sh", "-c", "echo to-out; echo to-err >&2; exit 7"])
    assert (r.exit_code, r.stdout, r.stderr) == (7, b"to-out\n", b"to-err\n")


def test_image_layers_whiteouts_and_config(env, sleeper):
    r = exec_sync(env, sleeper, ["/bin/sh", "-c",
                                 "ls /data | sort | tr '\\n' ' '; echo; ls /opq | sort | tr '\\n' ' '; echo; pwd"])
    data, opq, cwd = r.stdout.decode().splitlines()
    assert "gone" not in data.split() and {"keep", "added"} <= set(data.split())
    assert opq.split() == ["new"]  # the opaque dir hid the lower layer's entries
    assert cwd == "/work"
    r = exec_sync(env, sleeper, ["/bin/sh", "-c", "echo $VMCRI_TEST"])
    assert r.stdout == b"1\n"


def test_pod_files_in_container(env, sleeper):
    r = exec_sync(env, sleeper, ["cat", "/etc/hostname", "/etc/resolv.conf"])
    out = r.stdout.decode()
    assert out.splitlines()[0] == "ctr"
    assert "nameserver 10.96.0.10" in out and "search svc.cluster.local" in out
    assert exec_sync(env, sleeper, ["hostname"]).stdout == b"ctr\n"


def test_logs_are_cri_formatted(env, sleeper):
    path = os.path.join(env[2].log_directory, "sleeper.log")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        entries = log_entries(path) if os.path.exists(path) else []
        if len(entries) >= 2:
            break
        time.sleep(0.2)
    assert ("stdout", "F", "started") in entries
    assert ("stderr", "F", "oops") in entries


def test_run_to_completion_default_cmd_and_user(env):
    cid = create_start(env, ctr_config("oneshot", env[3].single.ref))  # Entrypoint+Cmd of the image
    st = wait_state(env, cid, pb.ContainerState.CONTAINER_EXITED)
    assert st.exit_code == 0 and st.reason == "Completed"
    assert st.finished_at >= st.started_at > 0
    path = os.path.join(env[2].log_directory, "oneshot.log")
    assert ("stdout", "F", "hello from vmcri") in log_entries(path)
    env[0].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_user_from_image_and_exit_code(env):
    cid = create_start(env, ctr_config("whoami", env[3].single.ref,
                                       args=["id -u; id -g; exit 3"]))
    st = wait_state(env, cid, pb.ContainerState.CONTAINER_EXITED)
    assert st.exit_code == 3 and st.reason == "Error"
    entries = [e[2] for e in log_entries(os.path.join(env[2].log_directory, "whoami.log"))]
    assert entries[:2] == ["1000", "1000"]
    env[0].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_host_path_mounts(env, tmp_path):
    (tmp_path / "shared.txt").write_text("from the host\n")
    cfg = ctr_config("mounts", env[3].multi.ref, command=["/bin/sh", "-c"],
                     args=["cat /mnt/ro/shared.txt; touch /mnt/ro/x 2>/dev/null && echo writable || echo readonly;"
                           " echo hi > /mnt/rw/new.txt"],
                     mounts=[pb.Mount(container_path="/mnt/ro", host_path=str(tmp_path), readonly=True),
                             pb.Mount(container_path="/mnt/rw", host_path=str(tmp_path))])
    cid = create_start(env, cfg)
    wait_state(env, cid, pb.ContainerState.CONTAINER_EXITED)
    out = [e[2] for e in log_entries(os.path.join(env[2].log_directory, "mounts.log"))]
    assert out == ["from the host", "readonly"]
    assert (tmp_path / "new.txt").read_text() == "hi\n"
    env[0].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_stop_and_remove_are_idempotent(env):
    cid = create_start(env, ctr_config("stopper", env[3].multi.ref, command=["sleep", "100000"]))
    wait_state(env, cid, pb.ContainerState.CONTAINER_RUNNING)
    for _ in range(2):
        env[0].runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=5))
    st = status(env, cid)
    assert st.state == pb.ContainerState.CONTAINER_EXITED
    # the image's stop signal (SIGUSR1) ends sleep, which is not PID 1 in the pod's namespace
    assert st.exit_code in (138, 137)
    listed = env[0].runtime.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
        id=cid))).containers
    assert [c.id for c in listed] == [cid]
    for _ in range(2):
        env[0].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    with pytest.raises(grpc.RpcError) as e:
        status(env, cid)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_filters(env, sleeper):
    d, sid = env[0], env[1]
    running = d.runtime.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
        state=pb.ContainerStateValue(state=pb.ContainerState.CONTAINER_RUNNING),
        pod_sandbox_id=sid))).containers
    assert sleeper in [c.id for c in running]
    by_label = d.runtime.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
        label_selector={"c": "sleeper"}))).containers
    assert [c.id for c in by_label] == [sleeper]
    pst = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid))
    assert sleeper in [c.id for c in pst.containers_statuses]


@pytest.mark.parametrize("mutate,code,needle", [
    (lambda c: c.metadata.ClearField("name"), grpc.StatusCode.INVALID_ARGUMENT, "metadata.name"),
    (lambda c: setattr(c.image, "image", "127.0.0.1:1/never/pulled:1"), grpc.StatusCode.NOT_FOUND, "never/pulled"),
    (lambda c: setattr(c, "log_path", "../escape.log"), grpc.StatusCode.INVALID_ARGUMENT, "log_path"),
    (lambda c: c.mounts.append(pb.Mount(container_path="/x", host_path="/nonexistent/vmcri")),
     grpc.StatusCode.INVALID_ARGUMENT, "host_path"),
])
def test_create_bad_input_leaves_nothing(env, mutate, code, needle):
    d, sid, pcfg, imgs = env
    cfg = ctr_config("bad", imgs.multi.ref, command=["true"])
    mutate(cfg)
    before = len(d.runtime.ListContainers(pb.ListContainersRequest()).containers)
    with pytest.raises(grpc.RpcError) as e:
        d.runtime.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=cfg,
                                                            sandbox_config=pcfg))
    assert e.value.code() == code, e.value.details()
    assert needle in e.value.details()
    assert len(d.runtime.ListContainers(pb.ListContainersRequest()).containers) == before


def test_unknown_container_ids(env):
    d = env[0]
    for call, req in ((d.runtime.StartContainer, pb.StartContainerRequest(container_id="e" * 64)),
                      (d.runtime.ContainerStatus, pb.ContainerStatusRequest(container_id="e" * 64)),
                      (d.runtime.ExecSync, pb.ExecSyncRequest(container_id="e" * 64, cmd=["true"]))):
        with pytest.raises(grpc.RpcError) as e:
            call(req)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # Stop and Remove of an unknown container succeed: nothing is left to reclaim
    d.runtime.StopContainer(pb.StopContainerRequest(container_id="e" * 64))
    d.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id="e" * 64))


def test_image_in_use_cannot_be_removed(env, sleeper):
    with pytest.raises(grpc.RpcError) as e:
        env[0].image.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=env[3].multi.ref)))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert sleeper[:12] in e.value.details()
    st = env[0].image.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=env[3].multi.ref)))
    assert st.image.id == env[3].multi.image_id
