"""Slow RPCs never take the threads the kubelet's cheap polls need.

The server is the daemon's own (build_server: v1 + v1alpha2, the slow lane) over a unix
socket; only the runtime behind it is a stand-in whose ExecSync blocks until released."""
import threading
import time
import types

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc
from cri_api.v1alpha2 import api_pb2 as pb2
from cri_api.v1alpha2 import api_pb2_grpc as pb2_grpc

from vmcri.container.model import RUNNING, ContainerRecord
from vmcri.cri import admission
from vmcri.daemon import build_server
from vmcri.errors import NotFound
from vmcri.sandbox.model import READY, SandboxRecord

HANG = 60  # a hang detector, never a performance bound
SANDBOX = SandboxRecord(id="s" * 64, name="pod", namespace="ns", uid="u", attempt=0, state=READY,
                        created_ns=1, domain="vmcri-s", config=pb.PodSandboxConfig().SerializeToString())
CONTAINER = ContainerRecord(
    id="c" * 64, sandbox_id=SANDBOX.id, name="app", attempt=0, state=RUNNING, created_ns=2,
    image="busybox", image_id="sha256:" + "e" * 64,
    config=pb.ContainerConfig(metadata=pb.ContainerMetadata(name="app")).SerializeToString())


class BlockingContainers:
    """ContainerService stand-in: ExecSync holds its thread until `release` is set."""

    def __init__(self):
        self.release = threading.Event()
        self.table = types.SimpleNamespace(all=lambda: [CONTAINER], for_sandbox=lambda _s: [CONTAINER])

    def exec_sync(self, container_id, cmd, timeout):
        assert self.release.wait(HANG * 2), "test never released the slow calls"
        return 0, b"done\n", b""

    def get(self, container_id):
        if not CONTAINER.id.startswith(container_id):
            raise NotFound(f"container {container_id!r} not found")
        return CONTAINER


class QuietEvents:
    """EventBus stand-in: subscribers that never get an event."""

    def __init__(self):
        import queue
        self.subscribed = []
        self._queue = queue.Queue

    def subscribe(self):
        q = self._queue()
        self.subscribed.append(q)
        return q

    def unsubscribe(self, q):
        if q in self.subscribed:
            self.subscribed.remove(q)


def _runtime(containers):
    sandboxes = types.SimpleNamespace(table=types.SimpleNamespace(all=lambda: [SANDBOX]),
                                      refresh=lambda rec: rec)
    images = types.SimpleNamespace()
    rt = types.SimpleNamespace(containers=containers, sandboxes=sandboxes, images=images,
                               cfg=types.SimpleNamespace(cgroup_driver="cgroupfs"),
                               conditions=lambda: [("RuntimeReady", True, "", "")],
                               status_info=lambda: {}, events=QuietEvents())
    return rt


@pytest.fixture
def served(tmp_path):
    containers = BlockingContainers()
    # 16 threads, 4 never given to slow calls: 10 run, 2 wait, the rest are refused
    containers.rt = _runtime(containers)
    server = build_server(containers.rt, max_workers=16, reserved_fast=4)
    sock = f"unix://{tmp_path}/cri.sock"
    server.add_insecure_port(sock)
    server.start()
    channel = grpc.insecure_channel(sock)
    yield containers, server, channel
    containers.release.set()
    channel.close()
    server.stop(grace=None)




def test_fast_rpcs_answer_while_slow_ones_saturate_the_daemon(served):
    containers, server, channel = served
    v1 = pb_grpc.RuntimeServiceStub(channel)
    v1a2 = pb2_grpc.RuntimeServiceStub(channel)
    slow = [v1.ExecSync.future(pb.ExecSyncRequest(container_id=CONTAINER.id, cmd=["sleep", "20"]))
            for _ in range(30)]
    # the refused ones come back at once; the admitted twelve hold their threads
    deadline = time.monotonic() + HANG
    while sum(f.done() for f in slow) < 18 and time.monotonic() < deadline:
        time.sleep(0.05)
    refused = [f for f in slow if f.done()]
    assert len(refused) == 18
    assert all(f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for f in refused)
    assert "slow calls" in refused[0].details()
    assert sum(not f.done() for f in slow) == 12

    # meanwhile everything the kubelet polls answers, over v1 and v1alpha2
    for _ in range(3):
        assert v1.Version(pb.VersionRequest(), timeout=HANG).runtime_api_version == "v1"
        assert [s.id for s in v1.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=HANG).items] \
            == [SANDBOX.id]
        assert [c.id for c in v1.ListContainers(pb.ListContainersRequest(), timeout=HANG).containers] \
            == [CONTAINER.id]
        status = v1.ContainerStatus(pb.ContainerStatusRequest(container_id=CONTAINER.id), timeout=HANG)
        assert status.status.state == pb.ContainerState.CONTAINER_RUNNING
        assert v1.Status(pb.StatusRequest(), timeout=HANG).status.conditions[0].status
        assert v1a2.Version(pb2.VersionRequest(), timeout=HANG).runtime_api_version == "v1alpha2"
        assert len(v1a2.ListPodSandbox(pb2.ListPodSandboxRequest(), timeout=HANG).items) == 1

    containers.release.set()  # the admitted calls, waiting ones included, now finish
    for f in slow:
        if f not in refused:
            assert f.result(timeout=HANG).stdout == b"done\n"


class _Context:
    def __init__(self, remaining):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining


def test_a_waiting_slow_call_gives_up_within_its_callers_deadline():
    lane = admission.SlowLane(running=1, waiting=1)
    with lane.admit("ExecSync", _Context(None)):
        with pytest.raises(admission.ResourceExhausted, match="no free slot"):
            with lane.admit("ExecSync", _Context(0.05)):
                pass
    with lane.admit("ExecSync", _Context(0.05)):  # the slot came back
        assert lane.in_flight == 1
    assert lane.in_flight == 0 and lane.rejected == 1


def test_sized_leaves_the_reserved_threads_to_fast_rpcs():
    lane = admission.sized(64, 16)
    assert lane.running + lane.waiting == 48 and lane.waiting >= 1
    assert {"Version", "Status", "ListPodSandbox", "ListContainers", "ContainerStatus",
            "PodSandboxStatus", "ImageStatus", "ListImages", "ImageFsInfo"}.isdisjoint(
        admission.SLOW_RPCS)


def test_event_streams_are_bounded_and_freed_when_the_client_goes(served):
    containers, server, channel = served
    v1 = pb_grpc.RuntimeServiceStub(channel)
    streams = [v1.GetContainerEvents(pb.GetEventsRequest()) for _ in range(admission.MAX_STREAMS)]
    rt_events = containers.rt.events
    deadline = time.monotonic() + HANG
    while len(rt_events.subscribed) < admission.MAX_STREAMS and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(rt_events.subscribed) == admission.MAX_STREAMS
    extra = v1.GetContainerEvents(pb.GetEventsRequest())
    with pytest.raises(grpc.RpcError) as e:
        next(extra)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert v1.Version(pb.VersionRequest(), timeout=HANG).runtime_name == "vmcri"
    streams[0].cancel()  # the server notices within its 1 s poll and frees the slot
    refused_meanwhile = 0
    again = v1.GetContainerEvents(pb.GetEventsRequest())
    while len(rt_events.subscribed) < admission.MAX_STREAMS and time.monotonic() < deadline:
        if again.done():  # refused: the slot was not free yet
            assert again.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            refused_meanwhile += 1
            again = v1.GetContainerEvents(pb.GetEventsRequest())
        time.sleep(0.05)
    assert len(rt_events.subscribed) == admission.MAX_STREAMS and not again.done()
    for s in [*streams[1:], again]:
        s.cancel()
