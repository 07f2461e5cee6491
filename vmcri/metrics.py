"""vmcri's own Prometheus metrics, served on a loopback port when metrics_port is set."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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

    def serve(self, address: str, port: int):
        return start_http_server(port, addr=address, registry=self.registry)
