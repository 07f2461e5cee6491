"""Keep a server thread free for the cheap RPCs the kubelet polls every second.

gRPC's sync server runs each RPC on one thread of a fixed pool. RunPodSandbox, PullImage,
ExecSync and the like can each take minutes, so without a bound enough of them would hold
every thread and Status, Version, List* and the *Status calls would queue behind them:
the kubelet then sees the runtime as down (PLEG not healthy). The slow RPCs therefore
pass a gate: at most `running` of them run at a time, at most `waiting` more wait for a
slot (within the caller's deadline), and the rest are answered RESOURCE_EXHAUSTED at once,
which the kubelet retries with back-off (an ExecSync probe error counts as neither success
nor failure). The pool is sized so that running + waiting leaves threads for everything
else. containerd has no such gate; its goroutines are cheap, our threads are not."""
from __future__ import annotations

import contextlib
import threading

import grpc

from vmcri.errors import VmcriError

# RPCs that may wait on a VM boot, the guest agent, a registry or a grace period.
SLOW_RPCS = frozenset({
    "RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "UpdatePodSandboxResources",
    "CreateContainer", "StartContainer", "StopContainer", "RemoveContainer",
    "ExecSync", "Exec", "Attach", "PortForward", "UpdateContainerResources",
    "ReopenContainerLog", "CheckpointContainer",
    "ContainerStats", "ListContainerStats", "PodSandboxStats", "ListPodSandboxStats",
    "ListPodSandboxMetrics",
    "PullImage", "RemoveImage",
})

MAX_WAIT_S = 60.0  # a caller without a deadline waits at most this long for a slot


class ResourceExhausted(VmcriError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class SlowLane:
    def __init__(self, running: int, waiting: int, max_wait_s: float = MAX_WAIT_S):
        if running < 1 or waiting < 0:
            raise ValueError("a slow lane needs at least one running slot")
        self.running, self.waiting, self.max_wait_s = running, waiting, max_wait_s
        self._slots = threading.Semaphore(running)
        self._lock = threading.Lock()
        self._waiters = 0
        self.in_flight = 0   # for tests and the verbose status
        self.rejected = 0

    @contextlib.contextmanager
    def admit(self, method: str, context):
        if not self._slots.acquire(blocking=False):
            self._wait_for_slot(method, context)
        with self._lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
            self._slots.release()

    def _wait_for_slot(self, method: str, context) -> None:
        with self._lock:
            if self._waiters >= self.waiting:
                self.rejected += 1
                raise ResourceExhausted(
                    f"{method}: vmcri is already running {self.running} slow calls with "
                    f"{self._waiters} more waiting; retry later")
            self._waiters += 1
        try:
            remaining = _time_remaining(context)
            timeout = self.max_wait_s if remaining is None else min(remaining, self.max_wait_s)
            if not self._slots.acquire(timeout=max(timeout, 0.0)):
                with self._lock:
                    self.rejected += 1
                raise ResourceExhausted(
                    f"{method}: no free slot among {self.running} slow calls within "
                    f"{timeout:.0f}s; retry later")
        finally:
            with self._lock:
                self._waiters -= 1


def _time_remaining(context) -> float | None:
    try:
        remaining = context.time_remaining()
    except AttributeError:
        return None
    return None if remaining is None or remaining > 1e9 else remaining


# Server-streaming RPCs (GetContainerEvents) hold a thread for as long as the client
# listens: at most this many at once, taken from the threads the fast RPCs keep.
MAX_STREAMS = 4


def sized(max_workers: int, reserved_fast: int) -> SlowLane:
    """A lane that leaves `reserved_fast` of `max_workers` threads to the fast RPCs."""
    budget = max_workers - reserved_fast
    waiting = max(budget // 6, 1)
    return SlowLane(running=budget - waiting, waiting=waiting)


def gated(fn, name: str):
    """Wrap servicer method `fn` so that it passes its servicer's slow lane, if any."""
    if name not in SLOW_RPCS:
        return fn

    def wrapper(self, request, context):
        lane = getattr(self, "slow_lane", None)
        if lane is None:
            return fn(self, request, context)
        with lane.admit(name, context):
            return fn(self, request, context)

    wrapper.__name__ = name
    wrapper.__wrapped__ = fn
    return wrapper


def gated_stream(fn, name: str):
    """Wrap server-streaming method `fn`: beyond its servicer's `stream_limit` (a
    semaphore) running streams, a new one is refused RESOURCE_EXHAUSTED."""

    def wrapper(self, request, context):
        limit = getattr(self, "stream_limit", None)
        if limit is None:
            yield from fn(self, request, context)
            return
        if not limit.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{name}: {MAX_STREAMS} streams are already open; close one first")
        try:
            yield from fn(self, request, context)
        finally:
            limit.release()

    wrapper.__name__ = name
    wrapper.__wrapped__ = fn
    return wrapper
