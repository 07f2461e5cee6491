"""The bench's containerd baseline and side-by-side tables, without starting anything."""
from __future__ import annotations

import tomllib

from bench import containerd, streaming, volumes
from bench.report import _p3_markdown


def test_containerd_config_stays_in_its_dir_and_mirrors_the_registry():
    cfg = tomllib.loads(containerd.config_toml("/t/b", "/t/b/c.sock", "127.0.0.1:5000",
                                               "127.0.0.1:5000/p:1"))
    assert (cfg["root"], cfg["state"], cfg["grpc"]["address"]) == ("/t/b/root", "/t/b/state", "/t/b/c.sock")
    assert "io.containerd.internal.v1.opt" in cfg["disabled_plugins"]  # would use /opt/containerd
    cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["containerd"]["snapshotter"] == "overlayfs"
    assert cri["containerd"]["runtimes"]["runc"]["options"]["Root"] == "/t/b/runc"
    assert cri["registry"]["mirrors"]["127.0.0.1:5000"]["endpoint"] == ["http://127.0.0.1:5000"]
    assert cri["sandbox_image"] == "127.0.0.1:5000/p:1" and cri["restrict_oom_score_adj"] is True


def test_p9_expected_counts_match_what_the_scripts_make():
    by = {name: (script, expect) for name, script, expect in volumes.ops("/x")}
    a, b, c = volumes.TREE
    assert by["find_count"][1] == str(volumes.SMALL_FILES)
    assert by["ls_l"][1] == str(volumes.SMALL_FILES + 1)  # busybox ls -l prints a total line
    assert by["find_tree"][1] == str(1 + a + a * b + a * b * c)
    assert f"count={volumes.BIG_MIB} conv=fsync" in by["write"][0]


def _s(median):
    return {"n": 1, "median": median, "min": median, "max": median, "p95": median}


def test_tables_show_containerd_and_the_ratio():
    p3 = {"after": {"first_container_s": 2.0, "exec_true_ms": _s(400.0)},
          "containerd": {"first_container_s": 0.5, "exec_true_ms": _s(40.0)}}
    md = "\n".join(_p3_markdown({"meta": {"variants": [{"label": "after"}]}, "p3": p3}))
    assert "| after | containerd | after / containerd |" in md
    assert "| P4 ExecSync `true` p50 (ms) | 400.0 | 40.0 | 10.00 |" in md

    side = {"exec_true_ms": _s(200), "exec_stdout_mb_s": _s(3.0), "port_forward_mb_s": _s(2.0)}
    p8 = {**side, "payload_mib": 16, "containerd": {**side, "exec_stdout_mb_s": _s(15.0)}}
    assert any("| 0.20 |" in line and "exec stdout" in line for line in streaming.markdown(p8))

    one = {p: {"write": _s(2.0)} for p in volumes.PLACES}
    p9 = {"rounds": 3, "big_mib": 64, "sides": {
        "after": {"places": one, "exec_true_s": _s(0.4), "sh_loop_s": _s(1.0)},
        "containerd": {"places": {p: {"write": _s(0.5)} for p in volumes.PLACES},
                       "exec_true_s": _s(0.05), "sh_loop_s": _s(0.1)}}}
    rows = [line for line in volumes.markdown(p9) if "sequential write" in line]
    assert len(rows) == 3 and all(line.endswith("| 2.00 (32) | 0.50 (128) | 4.00 |") for line in rows)


def test_p3_reads_the_create_phases_the_daemon_logs(caplog):
    import logging
    from bench.containers import create_phases
    from vmcri.container import container_create as cc
    laps = cc._Laps()
    for step in ("overlay", "mounts_and_spec", "bundle_write", "agent_create"):
        laps(step)
    cid = "ab" * 32
    with caplog.at_level(logging.INFO):
        cc.log.info("CreateContainer %s phases (s): %s; in the guest: %s", cid[:12], laps,
                    cc._fmt({"read_spec": 0.012, "crun_create": 0.25}))
    got = create_phases("\n".join(f"2026-12-08 INFO x: {m}" for m in caplog.messages), [cid, "cd" * 32])
    assert set(got[0]) == {"overlay", "mounts_and_spec", "bundle_write", "agent_create",
                           "guest.read_spec", "guest.crun_create"}
    assert got[0]["guest.crun_create"] == 0.25 and got[1] == {}
