"""What a kubelet sees, through real pod VMs: CRI v1alpha2 on the same socket, a valid
hostname for any pod name, repo digests in ContainerStatus, zstd images, writable-layer
usage in ImageFsInfo, and no booting sandbox in ListPodSandbox."""
import os
import sqlite3
import threading

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb
from cri_api.v1alpha2 import api_pb2 as pb2
from cri_api.v1alpha2 import api_pb2_grpc as pb2_grpc

from tests.support.pods import start_container, wait_for
from tests.support.zstd_image import push_zstd_image
from tests.test_sandbox_vm import pod_config
from vmcri.agent import protocol

pytestmark = [pytest.mark.vm, pytest.mark.registry]

LONG_NAME = "kubelet-" + "x" * 84 + "-with-tail"  # 102 characters, no hostname set
HANG = 300  # hang detector for a TCG boot on a shared host, never a performance bound


def _a2(message_v1, cls_v2):
    return cls_v2.FromString(message_v1.SerializeToString())


@pytest.fixture(scope="module")
def a2pod(daemon_factory, test_images, tmp_path_factory):
    """A daemon and one pod started through the v1alpha2 stubs."""
    d = daemon_factory('cni_conf_dir = ""\ninsecure_registries = ["%s"]' % test_images.registry)
    runtime = pb2_grpc.RuntimeServiceStub(d.channel)
    images = pb2_grpc.ImageServiceStub(d.channel)
    images.PullImage(pb2.PullImageRequest(image=pb2.ImageSpec(image=test_images.multi.ref)))
    cfg = pod_config(LONG_NAME, hostname="")
    cfg.log_directory = str(tmp_path_factory.mktemp("a2-logs"))
    cfg2 = _a2(cfg, pb2.PodSandboxConfig)
    sid = runtime.RunPodSandbox(pb2.RunPodSandboxRequest(config=cfg2), timeout=HANG).pod_sandbox_id
    yield d, runtime, images, sid, cfg, cfg2
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))


def test_v1alpha2_runs_a_pod_a_container_and_an_exec(a2pod, test_images):
    d, runtime, images, sid, _cfg, cfg2 = a2pod
    version = runtime.Version(pb2.VersionRequest(version="0.1.0"))
    assert (version.runtime_name, version.runtime_api_version) == ("vmcri", "v1alpha2")
    assert d.runtime.Version(pb.VersionRequest()).runtime_api_version == "v1"

    status = runtime.PodSandboxStatus(pb2.PodSandboxStatusRequest(pod_sandbox_id=sid))
    assert status.status.state == pb2.PodSandboxState.SANDBOX_READY
    assert status.status.metadata.name == LONG_NAME
    cid = runtime.CreateContainer(pb2.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=cfg2, config=pb2.ContainerConfig(
            metadata=pb2.ContainerMetadata(name="a2"),
            image=pb2.ImageSpec(image=test_images.multi.ref),
            command=["/bin/sh", "-c", "exec sleep 100000"], log_path="a2.log")),
        timeout=HANG).container_id
    runtime.StartContainer(pb2.StartContainerRequest(container_id=cid), timeout=HANG)
    listed = runtime.ListContainers(pb2.ListContainersRequest(
        filter=pb2.ContainerFilter(pod_sandbox_id=sid)))
    assert [(c.id, c.state) for c in listed.containers] == [(cid, pb2.ContainerState.CONTAINER_RUNNING)]
    reply = runtime.ExecSync(pb2.ExecSyncRequest(container_id=cid, cmd=["cat", "/work/hello.txt"],
                                                 timeout=60), timeout=HANG)
    assert (reply.exit_code, reply.stdout) == (0, b"hello\n")
    failing = runtime.ExecSync(pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "exit 7"],
                                                   timeout=60), timeout=HANG)
    assert failing.exit_code == 7
    runtime.StopContainer(pb2.StopContainerRequest(container_id=cid, timeout=5), timeout=HANG)
    st = runtime.ContainerStatus(pb2.ContainerStatusRequest(container_id=cid)).status
    assert st.state == pb2.ContainerState.CONTAINER_EXITED
    runtime.RemoveContainer(pb2.RemoveContainerRequest(container_id=cid), timeout=HANG)
    fs = images.ImageFsInfo(pb2.ImageFsInfoRequest())
    assert fs.image_filesystems[0].used_bytes.value > 0
    # bad input keeps its code through v1alpha2
    with pytest.raises(grpc.RpcError) as e:
        runtime.PodSandboxStatus(pb2.PodSandboxStatusRequest(pod_sandbox_id="0" * 64))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_pod_with_a_long_name_and_no_hostname_gets_a_valid_one(a2pod, test_images):
    d, _runtime, _images, sid, cfg, _cfg2 = a2pod
    cid = start_container(d, sid, cfg, test_images.multi.ref, "hostname")
    try:
        out = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["hostname"],
                                                    timeout=60), timeout=HANG)
        hostname = out.stdout.decode().strip()
        assert out.exit_code == 0 and hostname == LONG_NAME[:63].rstrip("-")
        protocol.validate("set_hostname", {"hostname": hostname})
    finally:
        d.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_container_status_reports_the_repo_digest_as_image_ref(a2pod, test_images):
    d, _runtime, _images, sid, cfg, _cfg2 = a2pod
    img = test_images.multi
    cid = start_container(d, sid, cfg, img.ref, "digest")
    try:
        st = d.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
        assert st.image_ref == img.digest_ref  # repo@sha256:<manifest digest>, as containerd
        assert st.image_ref.startswith(f"{img.repo}@sha256:") and img.digest != img.image_id
        assert st.image_id == img.image_id     # the config digest
        assert st.image.image == img.ref       # the image's tag
        pod = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid))
        assert {c.id: c.image_ref for c in pod.containers_statuses}[cid] == img.digest_ref
    finally:
        d.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_a_zstd_image_runs_and_its_writes_count_in_container_filesystems(
        a2pod, test_images, busybox_base_layer, tmp_path):
    d, _runtime, _images, sid, cfg, _cfg2 = a2pod
    img = push_zstd_image(str(tmp_path / "layout"), test_images.registry, busybox_base_layer)
    assert d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=img["ref"]))).image_ref \
        == img["image_id"]
    cid = start_container(d, sid, cfg, img["ref"], "zstd")
    try:
        out = d.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["cat", "/etc/vmcri-zstd"],
                                                    timeout=60), timeout=HANG)
        assert (out.exit_code, out.stdout) == (0, b"unpacked from zstd\n")

        def writable() -> int:
            [fs] = d.image.ImageFsInfo(pb.ImageFsInfoRequest()).container_filesystems
            assert fs.fs_id.mountpoint == os.path.join(d.root_dir, "sandboxes")
            return fs.used_bytes.value
        before = writable()
        wrote = d.runtime.ExecSync(pb.ExecSyncRequest(
            container_id=cid, cmd=["sh", "-c", "head -c 3000000 /dev/urandom > /written"],
            timeout=120), timeout=HANG)
        assert wrote.exit_code == 0
        wait_for(lambda: writable() >= before + 2_900_000, "the write in container_filesystems")
    finally:
        d.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_a_booting_sandbox_is_neither_listed_nor_found(a2pod):
    d, _runtime, _images, first, _cfg, _cfg2 = a2pod
    cfg = pod_config("booting")
    result: dict = {}

    def run():
        try:
            result["id"] = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                                   timeout=HANG).pod_sandbox_id
        except grpc.RpcError as e:
            result["error"] = e
    t = threading.Thread(target=run)
    t.start()
    db = sqlite3.connect(f"file:{d.root_dir}/vmcri.db?mode=ro", uri=True, timeout=30)
    seen_creating = set()
    try:
        while t.is_alive():
            rows = db.execute("SELECT id FROM sandboxes WHERE name = ? AND state = 'CREATING'",
                              (cfg.metadata.name,)).fetchall()
            items = d.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=HANG).items
            # listed only once ready (the boot may end between the two reads)
            assert all(s.state == pb.PodSandboxState.SANDBOX_READY for s in items
                       if s.metadata.name == cfg.metadata.name), "a booting sandbox was listed"
            for (creating,) in rows:
                try:
                    st = d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(
                        pod_sandbox_id=creating), timeout=HANG).status
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND, e
                    seen_creating.add(creating)
                else:
                    assert st.state == pb.PodSandboxState.SANDBOX_READY  # finished meanwhile
        t.join()
    finally:
        db.close()
    assert "error" not in result, result.get("error")
    sid = result["id"]
    try:
        assert seen_creating == {sid}, "the race was never observed: the boot was not seen"
        items = d.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
        assert {s.id: s.state for s in items}[sid] == pb.PodSandboxState.SANDBOX_READY
        assert {s.id for s in items} == {first, sid}
    finally:
        d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
        d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))


def test_polls_answer_while_slow_execs_fill_every_slow_slot(a2pod, test_images):
    """More ExecSync `sleep 20` than the daemon admits: the polls still answer, the
    excess is RESOURCE_EXHAUSTED, the admitted ones finish."""
    from vmcri.cri import admission
    from vmcri.daemon import MAX_WORKERS, RESERVED_FOR_FAST_RPCS
    d, _runtime, _images, sid, cfg, _cfg2 = a2pod
    lane = admission.sized(MAX_WORKERS, RESERVED_FOR_FAST_RPCS)
    cid = start_container(d, sid, cfg, test_images.multi.ref, "sleepers")
    try:
        calls = [d.runtime.ExecSync.future(pb.ExecSyncRequest(
            container_id=cid, cmd=["sleep", "20"], timeout=HANG), timeout=HANG)
            for _ in range(lane.running + lane.waiting + 8)]
        wait_for(lambda: sum(c.done() for c in calls) >= 8, "the excess calls to be refused")
        in_flight = sum(not c.done() for c in calls)
        assert d.runtime.Version(pb.VersionRequest(), timeout=HANG).runtime_name == "vmcri"
        assert sid in {s.id for s in d.runtime.ListPodSandbox(pb.ListPodSandboxRequest(),
                                                              timeout=HANG).items}
        st = d.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=HANG)
        assert st.status.state == pb.ContainerState.CONTAINER_RUNNING
        still = sum(not c.done() for c in calls)
        # the polls answered while the slow slots were taken (sleep 20 outlasts them here)
        assert in_flight == lane.running + lane.waiting and still > 0, (in_flight, still)
        codes = {}
        for c in calls:
            try:
                codes.setdefault("ok" if c.result().exit_code == 0 else "exit", []).append(c)
            except grpc.RpcError as e:
                codes.setdefault(e.code().name, []).append(e)
        assert set(codes) == {"ok", "RESOURCE_EXHAUSTED"}, {k: len(v) for k, v in codes.items()}
        assert len(codes["RESOURCE_EXHAUSTED"]) == 8
    finally:
        d.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
