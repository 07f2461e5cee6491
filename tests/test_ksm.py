"""`ksm = true`: the daemon starts the host's KSM and Status --verbose reports its counters."""
from __future__ import annotations

import json
import os

import pytest
from cri_api.v1 import api_pb2 as pb

from vmcri.sandbox import ksm


def _fake_sysfs(tmp_path, run="0"):
    for name, value in {"run": run, "pages_to_scan": "100", "sleep_millisecs": "200",
                        "pages_shared": "7", "pages_sharing": "21", "full_scans": "3"}.items():
        (tmp_path / name).write_text(value + "\n")
    return str(tmp_path)


def test_start_sets_the_scan_rate_and_runs(tmp_path):
    root = _fake_sysfs(tmp_path)
    got = ksm.start(root)
    assert got == {"enabled": True, "before": {"run": "0", "pages_to_scan": "100",
                                               "sleep_millisecs": "200"}}
    assert (tmp_path / "run").read_text() == "1"
    assert (tmp_path / "pages_to_scan").read_text() == str(ksm.SETTINGS["pages_to_scan"])
    assert ksm.status(root) == {"run": 1, "pages_shared": 7, "pages_sharing": 21, "full_scans": 3}


def test_a_host_without_ksm_is_reported_not_fatal(tmp_path):
    got = ksm.start(str(tmp_path / "missing"))
    assert got["enabled"] is False and "missing" in got["error"]
    assert ksm.status(str(tmp_path / "missing")) == {}


@pytest.mark.skipif(not os.access(os.path.join(ksm.SYSFS, "run"), os.W_OK),
                    reason="needs a writable /sys/kernel/mm/ksm (root on a KSM kernel)")
def test_daemon_with_ksm_true_starts_the_hosts_ksm(daemon_factory):
    names = ("run", *ksm.SETTINGS)
    before = {n: open(os.path.join(ksm.SYSFS, n)).read().strip() for n in names}
    try:
        d = daemon_factory("ksm = true")
        info = json.loads(d.runtime.Status(pb.StatusRequest(verbose=True)).info["ksm"])
        assert info["configured"] is True and info["run"] == 1
        assert open(os.path.join(ksm.SYSFS, "pages_to_scan")).read().strip() == \
            str(ksm.SETTINGS["pages_to_scan"])
    finally:  # host-wide state: put back what the test found
        for n in ("pages_to_scan", "sleep_millisecs", "run"):
            with open(os.path.join(ksm.SYSFS, n), "w") as f:
                f.write(before[n])
