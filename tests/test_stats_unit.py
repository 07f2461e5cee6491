"""Stats shaping: cAdvisor semantics and hostile agent numbers."""

from vmcri import stats as st


def test_working_set_excludes_inactive_file():
    m = st.memory_usage(1, {"current": 100 << 20, "inactive_file": 30 << 20, "anon": 50 << 20,
                            "pgfault": 7, "pgmajfault": 1, "max": 200 << 20})
    assert m.working_set_bytes.value == 70 << 20
    assert m.usage_bytes.value == 100 << 20
    assert m.rss_bytes.value == 50 << 20
    assert m.available_bytes.value == 130 << 20
    assert (m.page_faults.value, m.major_page_faults.value) == (7, 1)


def test_nano_cores_between_samples():
    rates = st.CpuRate()
    first = st.cpu_usage(rates, "c", 1_000_000_000, 1_000_000)  # 1 s of CPU
    assert first.usage_core_nano_seconds.value == 1_000_000_000
    assert not first.HasField("usage_nano_cores")  # one sample gives no rate
    second = st.cpu_usage(rates, "c", 3_000_000_000, 2_000_000)  # +1 s CPU over 2 s
    assert second.usage_nano_cores.value == 500_000_000


def test_hostile_numbers_are_clamped():
    m = st.memory_usage(1, {"current": -5, "inactive_file": "lots", "anon": 10**30, "pgfault": None})
    assert m.working_set_bytes.value == 0
    assert m.rss_bytes.value == (1 << 64) - 1
    assert m.page_faults.value == 0
    rates = st.CpuRate()
    st.cpu_usage(rates, "x", 10, 5)
    back = st.cpu_usage(rates, "x", 5, 1)  # time going backwards gives no rate
    assert not back.HasField("usage_nano_cores")


def test_metric_descriptors_are_cadvisor_names():
    names = {d.name for d in st.metric_descriptors()}
    assert {"container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
            "container_network_receive_bytes_total"} <= names


def test_list_pod_stats_asks_the_guests_side_by_side_and_survives_a_silent_one():
    import threading
    import time
    from types import SimpleNamespace

    from vmcri.channel import AgentTimeout
    from vmcri.container import container_stats as cs

    live = {"now": 0, "max": 0}
    lock = threading.Lock()

    class Agent:
        def __init__(self, sid):
            self.sid = sid

        def call(self, method, timeout=None, **params):
            with lock:
                live["now"] += 1
                live["max"] = max(live["max"], live["now"])
            try:
                time.sleep(0.3)
                if self.sid == "silent":
                    raise AgentTimeout("agent call timed out")
                return {"cpu_usage_usec": 1000, "memory": {"current": 1 << 20}, "processes": 3}
            finally:
                with lock:
                    live["now"] -= 1

    pods = [SimpleNamespace(id=i, state="READY", name=i, namespace="ns", uid="u", attempt=0,
                            labels={}, annotations={}) for i in ("a", "silent", "b", "c")]
    sandboxes = SimpleNamespace(table=SimpleNamespace(all=lambda: pods), refresh=lambda sb: sb,
                                agent=lambda sb: Agent(sb.id))
    svc = SimpleNamespace(sandboxes=sandboxes, table=SimpleNamespace(for_sandbox=lambda sid: []))
    got = cs.list_pod_sandbox_stats(svc, None)
    assert [s.attributes.id for s in got] == ["a", "silent", "b", "c"]  # table order kept
    assert live["max"] >= 2  # the calls overlapped
    assert got[0].linux.process.process_count.value == 3
    assert not got[1].linux.HasField("process")  # the silent pod has no sample, the rest do
    assert all(s.linux.process.process_count.value == 3 for s in got[2:])
