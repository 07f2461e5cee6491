"""set_cpus_online (the agent's OnlineCPUMem) against a sysfs-shaped tree; the VM test is
tests/test_sandbox_resize_vm.py."""
from __future__ import annotations

import threading
import time

import pytest

from vmcri.agent import handlers_resources, protocol


@pytest.fixture
def cpu_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(handlers_resources, "CPU_DIR", str(tmp_path))
    (tmp_path / "cpu0").mkdir()  # the boot CPU has no online switch

    def add(n, online="0"):
        (tmp_path / f"cpu{n}").mkdir()
        (tmp_path / f"cpu{n}" / "online").write_text(online + "\n")

    def online_file():
        on = [0] + [n for n in range(1, 64) if (tmp_path / f"cpu{n}" / "online").exists()
                    and (tmp_path / f"cpu{n}" / "online").read_text().strip() == "1"]
        (tmp_path / "online").write_text(",".join(map(str, on)) + "\n")
    (tmp_path / "online").write_text("0\n")
    (tmp_path / "cpufreq").mkdir()  # not a cpu: ignored
    return tmp_path, add, online_file


def test_onlines_up_to_count_and_offlines_the_rest(cpu_dir):
    path, add, _ = cpu_dir
    for n in (1, 2, 3):
        add(n, "1" if n == 3 else "0")
    res = handlers_resources.set_cpus_online(None, {"count": 3, "wait_ms": 0})
    assert [(path / f"cpu{n}" / "online").read_text().strip() for n in (1, 2, 3)] == ["1", "1", "0"]
    assert res["present"] == 4 and res["errors"] == []


def test_waits_for_cpus_the_hotplug_adds_late(cpu_dir):
    path, add, _ = cpu_dir
    threading.Timer(0.3, add, (1,)).start()
    t = time.monotonic()
    res = handlers_resources.set_cpus_online(None, {"count": 2, "wait_ms": 5000})
    assert time.monotonic() - t < 5
    assert res["present"] == 2 and (path / "cpu1" / "online").read_text().strip() == "1"


def test_params_are_validated_naming_the_field():
    assert protocol.validate("set_cpus_online", {"count": 2}) == {"count": 2, "wait_ms": 5000}
    for bad, field in (({"count": 0}, "count"), ({"count": "2"}, "count"),
                       ({"count": 2, "wait_ms": 60_000}, "wait_ms"), ({}, "count")):
        with pytest.raises(protocol.ProtocolError, match=field):
            protocol.validate("set_cpus_online", bad)
