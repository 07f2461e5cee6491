"""vmcri's Prometheus registry without a VM: pool gauges/counters and agent call timing."""
from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vmcri.channel import AgentClient
from vmcri.metrics import Metrics


def scrape(m: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}


def test_pool_state_is_read_at_scrape_time():
    state = {"size": 2, "ready": 1, "booting": 1, "claimed": 3, "empty": 1, "unfit": 0}
    m = Metrics()
    m.track_pool(lambda: dict(state))
    fam = scrape(m)
    vms = {s.labels["state"]: s.value for s in fam["vmcri_pool_vms"].samples}
    assert vms == {"ready": 1, "booting": 1}
    assert fam["vmcri_pool_size"].samples[0].value == 2
    events = {s.labels["event"]: s.value for s in fam["vmcri_pool_events"].samples if s.name.endswith("_total")}
    assert events["claimed"] == 3 and events["empty"] == 1 and events["booted"] == 0
    state.update(ready=2, booting=0, claimed=4)
    fam = scrape(m)
    assert {s.labels["state"]: s.value for s in fam["vmcri_pool_vms"].samples}["ready"] == 2


def test_agent_calls_are_timed_by_method(dev_agent):
    m = Metrics()
    c = AgentClient(dev_agent, call_timeout=20, on_call=m.observe_agent_call)
    for _ in range(3):
        c.call("ping")
    counts = {s.labels["method"]: s.value for s in scrape(m)["vmcri_agent_call_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {"ping": 3}
