"""The agent's native exec (vmcri/agent/nsexec.py) on the host's own kernel: a target made
with unshare(1) stands in for a container; the probe (tests/support/nsexec_probe.py) runs
the exec in a process of its own, which is a subreaper, as the agent is PID 1 in a guest.
Through a real pod VM the same path is checked by tests/test_pod_process_vm.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from vmcri.agent import nsexec, protocol, seccompbpf
from vmcri.agent.protocol import ProtocolError
from vmcri.container import seccomp

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare(1)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def target():
    """A process in new pid, mount (own /proc), uts, ipc and net namespaces; yields its pid."""
    p = subprocess.Popen(["unshare", "--fork", "--pid", "--mount-proc", "--uts", "--ipc", "--net",
                          "sh", "-c", "hostname nsexec-target; exec sleep 100000"])
    deadline = time.monotonic() + 10
    child = 0
    while time.monotonic() < deadline and not child:
        try:
            with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                kids = f.read().split()
            if kids and os.readlink(f"/proc/{kids[0]}/exe").endswith("sleep"):
                child = int(kids[0])
        except OSError:
            pass
        time.sleep(0.05)
    assert child, "unshare did not start its child"
    yield child
    p.send_signal(signal.SIGKILL)
    os.kill(child, signal.SIGKILL)
    p.wait()


@pytest.fixture
def cgroup():
    path = f"/sys/fs/cgroup/pids/vmcri-nsexec-{uuid.uuid4().hex[:8]}"
    if not os.path.isdir("/sys/fs/cgroup/pids"):
        path = f"/sys/fs/cgroup/vmcri-nsexec-{uuid.uuid4().hex[:8]}"  # cgroup v2
    os.mkdir(path)
    yield path
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.1)


def process(args, **over):
    p = {"terminal": False, "args": args, "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "ONLY=this"],
         "cwd": "/tmp", "user": {"uid": 1001, "gid": 2002, "additionalGids": [3003, 4004]},
         "capabilities": {k: ["CAP_CHOWN", "CAP_KILL"] for k in
                          ("bounding", "effective", "permitted")},
         "noNewPrivileges": True, "oomScoreAdj": 500,
         "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1000, "hard": 1001}]}
    p.update(over)
    return protocol.validate("run", {"container_exec": {"id": "c1", "token": "0" * 16,
                                                        "process": p}})["container_exec"]["process"]


def probe(target, proc, cgroup=None, profile=None) -> dict:
    req = {"target": target, "cgroup": cgroup, "process": proc, "seccomp": profile}
    r = subprocess.run([sys.executable, "-m", "tests.support.nsexec_probe"], cwd=ROOT,
                       input=json.dumps(req), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def status_of(text: str) -> dict:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_exec_joins_the_targets_namespaces_and_cgroup(target, cgroup):
    script = ("hostname; echo pid=$$; for n in ipc uts net pid mnt; do readlink /proc/self/ns/$n; "
              "done; cat /proc/self/cgroup; pwd; /usr/bin/env")
    res = probe(target, process(["sh", "-c", script]), cgroup)
    assert res.get("exit_code") == 0, res
    lines = res["stdout"].splitlines()
    assert lines[0] == "nsexec-target"
    assert lines[1] != f"pid={res['pid']}" and int(lines[1][4:]) < 100, lines  # in the target's pid ns
    for i, name in enumerate(("ipc", "uts", "net", "pid", "mnt")):
        assert lines[2 + i] == os.readlink(f"/proc/{target}/ns/{name}"), name
        assert lines[2 + i] != os.readlink(f"/proc/self/ns/{name}"), name
    assert any(line.endswith(os.path.basename(cgroup)) for line in lines[7:]), lines
    assert "/tmp" in lines
    env = {line.split("=", 1)[0] for line in lines[lines.index("/tmp") + 1:]}
    assert {"ONLY", "PATH"} <= env and not env & {"HOME", "VMCRI_TEST_GUEST_DIR"}, env


def test_exec_has_the_process_identity(target):
    res = probe(target, process(["sh", "-c", "id; ulimit -n; cat /proc/self/oom_score_adj; "
                                 "ls /proc/self/fd; cat /proc/self/status"]))
    assert res.get("exit_code") == 0, res
    out = res["stdout"].splitlines()
    assert out[0].startswith("uid=1001 gid=2002 groups=") and "3003" in out[0] and "4004" in out[0]
    assert out[1] == "1000" and out[2] == "500"
    assert out[3:7] == ["0", "1", "2", "3"], out  # ls's own dir fd is 3: nothing of the agent's
    st = status_of(res["stdout"])
    caps = (1 << 0) | (1 << 5)  # CAP_CHOWN, CAP_KILL
    # a non-root exec keeps only the bounding set (the kernel's execve rules, as with crun)
    assert int(st["CapBnd"], 16) == caps and int(st["CapEff"], 16) == 0, st
    assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
    assert st["NoNewPrivs"].strip() == "1"
    assert int(st["SigIgn"], 16) == 0 and int(st["SigBlk"], 16) == 0  # not the agent's SIGPIPE
    root = probe(target, process(["cat", "/proc/self/status"], user={"uid": 0, "gid": 0}))
    st = status_of(root["stdout"])
    for key in ("CapEff", "CapPrm", "CapBnd"):
        assert int(st[key], 16) == caps, (key, st[key])


def test_exec_loads_the_containers_seccomp_filter(target):
    profile = seccomp.default_profile(["CAP_CHOWN", "CAP_KILL"])
    res = probe(target, process(["sh", "-c", "grep Seccomp: /proc/self/status; unshare -n true; "
                                 "echo rc=$?"]), profile=profile)
    assert res.get("exit_code") == 0, res
    assert "Seccomp:\t2" in res["stdout"]
    assert "rc=1" in res["stdout"] and "Operation not permitted" in res["stderr"], res


def test_ambient_capabilities_without_no_new_privs(target):
    caps = {k: ["CAP_NET_BIND_SERVICE"] for k in ("bounding", "effective", "permitted",
                                                  "inheritable", "ambient")}
    res = probe(target, process(["cat", "/proc/self/status"], capabilities=caps,
                                noNewPrivileges=False), profile=seccomp.default_profile([]))
    st = status_of(res["stdout"])
    assert int(st["CapAmb"], 16) == 1 << 10 and st["NoNewPrivs"].strip() == "0", res
    assert st["Seccomp"].strip() == "2"


def test_exit_codes_and_a_missing_executable(target):
    assert probe(target, process(["sh", "-c", "exit 7"]))["exit_code"] == 7
    res = probe(target, process(["no-such-binary"]))
    assert res["exit_code"] == 127 and "not found" in res["stderr"], res
    res = probe(target, process(["/etc/hostname"]))
    assert res["exit_code"] == 126, res


def test_a_failed_setup_is_an_error_not_a_process(target):
    res = probe(target, process(["true"], cwd="/no/such/dir"))
    assert "error" in res and "/no/such/dir" in res["error"], res


def test_what_the_native_path_hands_to_crun():
    proc = process(["true"])
    assert nsexec.plan(proc, nsexec.exec_info({"linux": {"namespaces": [{"type": "user"}]}}, None)) is None
    assert nsexec.plan(dict(proc, apparmorProfile="x"), nsexec.exec_info({}, None)) is None
    bad = {"defaultAction": "SCMP_ACT_NOTIFY", "syscalls": []}
    assert nsexec.plan(proc, nsexec.exec_info({"linux": {"seccomp": bad}}, None)) is None
    assert nsexec.plan(proc, nsexec.exec_info({}, None)) is not None


def test_seccomp_rules_follow_runc():
    # the same argument twice: one rule per condition (libseccomp refuses them in one rule)
    prof = {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["personality", "no_such_call"], "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                                   {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                         {"names": ["getpid"], "action": "SCMP_ACT_ERRNO"}]}
    assert len(seccompbpf.compile_profile(prof).code.raw) % 8 == 0
    with pytest.raises(ValueError, match="op"):
        seccompbpf.compile_profile({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "op": "LIKE"}]}]})


@pytest.mark.parametrize("runner", ["native", "crun"])
def test_runner_is_validated(runner):
    ce = {"id": "c1", "token": "0" * 16, "process": process(["true"]), "runner": runner}
    assert protocol.validate("run", {"container_exec": ce})["container_exec"]["runner"] == runner
    with pytest.raises(ProtocolError, match="container_exec.runner"):
        protocol.validate("run", {"container_exec": dict(ce, runner="runc")})
