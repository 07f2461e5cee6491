"""vmcri's own Prometheus metrics, served on a loopback port when metrics_port is set."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 12, 16, 24, 32, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.sandbox_phase = Histogram(
            "vmcri_sandbox_start_phase_seconds", "Time spent in each phase of RunPodSandbox",
            ["phase"], buckets=PHASE_BUCKETS, registry=self.registry)
        self.container_start = Histogram(
            "vmcri_container_start_seconds", "StartContainer latency (crun start in the guest)",
            buckets=PHASE_BUCKETS, registry=self.registry)
        self.agent_rtt = Histogram(
            "vmcri_agent_call_seconds", "Round trip of agent control calls", ["method"],
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
            registry=self.registry)
        self.rpc_errors = Counter("vmcri_rpc_errors_total", "CRI RPCs that returned an error",
                                  ["method", "code"], registry=self.registry)
        self.rpc_seconds = Histogram("vmcri_rpc_seconds", "CRI RPC latency", ["method"],
                                     registry=self.registry)
        self.sandboxes = Gauge("vmcri_sandboxes", "Pod sandboxes by state", ["state"],
                               registry=self.registry)

    def observe_sandbox_phase(self, phase: str, seconds: float) -> None:
        self.sandbox_phase.labels(phase).observe(seconds)

    def observe_agent_call(self, method: str, seconds: float) -> None:
        self.agent_rtt.labels(method).observe(seconds)

    def observe_container_start(self, seconds: float) -> None:
        self.container_start.observe(seconds)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_seconds.labels(method).observe(seconds)
        if code != "OK":
            self.rpc_errors.labels(method, code).inc()

    def track_sandbox_states(self, table) -> None:
        """Sandbox counts are read from the store at scrape time, never cached."""
        def count(state):
            return lambda: sum(1 for r in table.all() if r.state == state)
        for state in ("READY", "NOTREADY", "CREATING"):
            self.sandboxes.labels(state).set_function(count(state))

    def track_pool(self, snapshot) -> None:
        """Warm-pool gauges and counters, read from `snapshot()` (WarmPool.snapshot) at scrape time."""
        self.registry.register(_PoolCollector(snapshot))

    def track_templates(self, snapshot) -> None:
        """VM-template gauges and counters, read from TemplateStore.snapshot at scrape time."""
        self.registry.register(_TemplateCollector(snapshot))

    def serve(self, address: str, port: int):
        return start_http_server(port, addr=address, registry=self.registry)


class _PoolCollector:
    # WarmPool.stats keys, exported as vmcri_pool_events_total{event=...} (docs/operating.md)
    COUNTERS = ("claimed", "empty", "unfit", "booted", "boot_failures", "adopted", "dropped",
                "grown", "grow_failures", "cloned")

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def describe(self):
        return []  # collected at scrape time only

    def collect(self):
        snap = self.snapshot()
        vms = GaugeMetricFamily("vmcri_pool_vms", "Warm-pool VMs by state", labels=["state"])
        vms.add_metric(["ready"], snap.get("ready", 0))
        vms.add_metric(["booting"], snap.get("booting", 0))
        yield vms
        yield GaugeMetricFamily("vmcri_pool_size", "Configured warm-pool size (pool_size)",
                                value=snap.get("size", 0))
        events = CounterMetricFamily("vmcri_pool_events", "Warm-pool events since daemon start",
                                     labels=["event"])
        for key in self.COUNTERS:
            events.add_metric([key], snap.get(key, 0))
        yield events


class _TemplateCollector:
    # TemplateStore.stats keys, exported as vmcri_vm_template_events_total{event=...}
    COUNTERS = ("built", "build_failures", "reused", "cloned", "clone_failures", "fallbacks")

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def describe(self):
        return []  # collected at scrape time only

    def collect(self):
        snap = self.snapshot()
        yield GaugeMetricFamily("vmcri_vm_template_ready",
                                "1 when a VM template is ready to clone from",
                                value=1 if snap.get("ready") else 0)
        events = CounterMetricFamily("vmcri_vm_template_events",
                                     "VM-template events since daemon start", labels=["event"])
        for key in self.COUNTERS:
            events.add_metric([key], snap.get(key, 0))
        yield events
