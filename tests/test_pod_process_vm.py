"""The pod's process model in a real pod VM: the pod PID namespace and its init, what
containers (privileged ones included) can see of the guest, exec's process identity,
StopContainer within the caller's deadline, and the kubelet's hugepage limits."""
import time

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.spdy_client import exec_url
from tests.test_container_vm import create_start, ctr_config, exec_sync, status, wait_state
from tests.support.pods import pod_env

pytestmark = [pytest.mark.vm, pytest.mark.registry]
STATUS_LINES = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                "NoNewPrivs", "Seccomp")


@pytest.fixture(scope="module")
def env(daemon_factory, test_images, tmp_path_factory):
    """One privileged pod (so that privileged containers may run in it), shared."""
    yield from pod_env(daemon_factory, test_images, tmp_path_factory, "procs", privileged=True)


def image(env):
    return env[3].multi.ref


def sleeper(env, name, seconds, pid_mode=None, **kw):
    config = ctr_config(name, image(env), command=["sleep", str(seconds)], **kw)
    if pid_mode is not None:
        config.linux.security_context.namespace_options.pid = pid_mode
    return create_start(env, config)


def out(env, cid, script):
    r = exec_sync(env, cid, ["/bin/sh", "-c", script])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.stdout.decode()


def status_lines(text):
    return {line.split(":")[0]: line.split(":", 1)[1].strip()
            for line in text.splitlines() if line.split(":")[0] in STATUS_LINES}


def test_pod_mode_sleep_sees_the_pod_init_and_stops_on_sigterm(env):
    # no namespace_options at all: POD, the proto's zero value
    started = time.monotonic()
    cid = sleeper(env, "pod-sleep", 100000, stop_signal=pb.SIGTERM)
    first = time.monotonic() - started
    started = time.monotonic()
    second = sleeper(env, "pod-sleep-2", 100000)
    print(f"create+start in POD mode: first (starts the pod init) {first:.2f} s, "
          f"second {time.monotonic() - started:.2f} s")
    env[0].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=second))
    assert out(env, cid, "cat /proc/1/comm").strip() == "vmcri-pod-init"
    ps = out(env, cid, "ps -o pid,args")
    assert "vmcri_agent" not in ps and "crun" not in ps, ps
    assert "sleep 100000" in ps
    # the pod init is not dumpable, and its root is an empty tmpfs anyway
    root = out(env, cid, "ls -A /proc/1/root/ 2>&1; echo end").strip().splitlines()
    assert root in (["end"], ["ls: /proc/1/root/: Permission denied", "end"]), root
    started = time.monotonic()
    env[0].runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=30))
    took = time.monotonic() - started
    st = wait_state(env, cid, pb.CONTAINER_EXITED)
    print(f"StopContainer(timeout=30) of a POD-mode busybox sleep: {took:.2f} s")
    assert st.exit_code == 143, st  # SIGTERM's status: sleep was not PID 1, so it died of it
    # the contrast: as PID 1 of its own namespace, sleep ignores SIGTERM and needs SIGKILL
    alone = sleeper(env, "own-sleep", 100000, pid_mode=pb.CONTAINER, stop_signal=pb.SIGTERM)
    started = time.monotonic()
    env[0].runtime.StopContainer(pb.StopContainerRequest(container_id=alone, timeout=5))
    print(f"StopContainer(timeout=5) of a CONTAINER-mode busybox sleep (PID 1): "
          f"{time.monotonic() - started:.2f} s")
    assert wait_state(env, alone, pb.CONTAINER_EXITED).exit_code == 137


def test_pod_mode_containers_share_and_container_mode_is_alone(env):
    a = sleeper(env, "pod-a", 100001)
    b = sleeper(env, "pod-b", 100002, pid_mode=pb.POD)
    own = sleeper(env, "own", 100003, pid_mode=pb.CONTAINER)
    ps_a = out(env, a, "ps -o pid,args")
    assert "sleep 100002" in ps_a and "sleep 100001" in ps_a
    assert "sleep 100003" not in ps_a
    assert "sleep 100001" in out(env, b, "ps -o pid,args")
    ps_own = out(env, own, "ps -o pid,args")
    assert "sleep 100003" in ps_own
    assert "sleep 100001" not in ps_own and "vmcri-pod-init" not in ps_own
    assert out(env, own, "cat /proc/1/cmdline").startswith("sleep")
    for cid in (a, b, own):
        env[0].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_target_mode_joins_the_target_container(env):
    target = sleeper(env, "target", 100004, pid_mode=pb.CONTAINER)
    config = ctr_config("debug", image(env), command=["sleep", "100005"])
    config.linux.security_context.namespace_options.pid = pb.TARGET
    config.linux.security_context.namespace_options.target_id = target
    debug = create_start(env, config)
    ps = out(env, debug, "ps -o pid,args")
    assert "sleep 100004" in ps and "sleep 100005" in ps
    assert out(env, debug, "cat /proc/1/cmdline").startswith("sleep")


def test_exec_is_the_containers_process(env):
    config = ctr_config("ident", image(env), command=["sleep", "100006"], working_dir="/tmp",
                        envs=[pb.KeyValue(key="FROM_CRI", value="yes")])
    sec = config.linux.security_context
    sec.run_as_user.value, sec.run_as_group.value = 1001, 2002
    sec.supplemental_groups.extend([3003])
    sec.no_new_privs = True
    sec.seccomp.profile_type = pb.SecurityProfile.RuntimeDefault
    sec.namespace_options.pid = pb.CONTAINER  # so that /proc/1 is the container's own process
    cid = create_start(env, config)
    r = exec_sync(env, cid, ["id"])
    assert r.exit_code == 0, r
    ident = r.stdout.decode()
    assert ident.startswith("uid=1001 gid=2002") and "3003" in ident, ident
    init, own = out(env, cid, "cat /proc/1/status"), out(env, cid, "cat /proc/self/status")
    assert status_lines(own) == status_lines(init), (own, init)
    assert status_lines(own)["Seccomp"] == "2" and status_lines(own)["NoNewPrivs"] == "1"
    assert out(env, cid, "pwd").strip() == "/tmp"
    assert "FROM_CRI=yes" in out(env, cid, "env")
    url = env[0].runtime.Exec(pb.ExecRequest(container_id=cid, cmd=["id"], stdout=True,
                                             stderr=True)).url
    res = exec_url(url)
    assert res.exit_code == 0 and res.stdout.decode() == ident
    took = []
    for _ in range(9):
        started = time.monotonic()
        exec_sync(env, cid, ["true"])
        took.append(time.monotonic() - started)
    print(f"ExecSync true: p50 {sorted(took)[4] * 1000:.0f} ms over 9")
    tty = env[0].runtime.Exec(pb.ExecRequest(container_id=cid, cmd=["id", "-u"], tty=True,
                                             stdout=True)).url
    assert exec_url(tty, stderr=False, tty=True).stdout.decode().strip() == "1001"


def test_exec_as_run_as_username_nobody(env):
    config = ctr_config("nobody", image(env), command=["sleep", "100007"])
    config.linux.security_context.run_as_username = "nobody"
    cid = create_start(env, config)
    r = exec_sync(env, cid, ["id"])
    assert r.stdout.decode().startswith("uid=65534(nobody) gid=65534(nogroup)"), r


def test_run_as_group_without_user_is_invalid(env):
    d, sid, cfg, _ = env
    config = ctr_config("group-only", image(env), command=["sleep", "1"])
    config.linux.security_context.run_as_group.value = 2002
    with pytest.raises(grpc.RpcError) as e:
        d.runtime.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=config,
                                                            sandbox_config=cfg))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "run_as_group" in e.value.details()


def test_kubelet_hugepage_limits_for_the_hosts_sizes_let_the_container_start(env):
    config = ctr_config("huge", image(env), command=["sleep", "100008"])
    for size in ("1GB", "2MB"):
        config.linux.resources.hugepage_limits.append(pb.HugepageLimit(page_size=size, limit=0))
    cid = create_start(env, config)
    assert out(env, cid, "cat /sys/fs/cgroup/hugetlb.2MB.max").strip() == "0"
    bad = ctr_config("huge-bad", image(env), command=["sleep", "1"])
    bad.linux.resources.hugepage_limits.append(pb.HugepageLimit(page_size="1GB", limit=1 << 30))
    with pytest.raises(grpc.RpcError) as e:
        env[0].runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=env[1], config=bad, sandbox_config=env[2]))
    assert "hugepageLimits[0]" in e.value.details() and "1GB" in e.value.details()


def test_stop_escalates_before_the_callers_deadline(env):
    # PID 1 of its own namespace, busybox sleep ignores SIGTERM
    cid = sleeper(env, "stubborn", 100013, pid_mode=pb.CONTAINER, stop_signal=pb.SIGTERM)
    started = time.monotonic()
    # a grace of 600 s, but a gRPC deadline of 12 s: StopContainer must answer in time
    env[0].runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=600),
                                 timeout=12)
    print(f"StopContainer(timeout=600) under a 12 s deadline: {time.monotonic() - started:.2f} s")
    assert status(env, cid).state == pb.CONTAINER_EXITED
    assert status(env, cid).exit_code == 137


def test_privileged_container_has_the_pods_devices_not_vmcris(env):
    config = ctr_config("priv", image(env), command=["sleep", "100009"])
    config.linux.security_context.privileged = True
    cid = create_start(env, config)
    listing = out(env, cid, "ls /dev; ls /dev/virtio-ports 2>&1; ls /dev/vport* 2>&1; "
                            "ls /dev/vda 2>&1; echo; grep CapEff /proc/self/status")
    names = listing.split()
    assert "null" in names and "kmsg" in names and "mem" in names, listing  # the pod's devices
    assert "virtio-ports" not in names and not any(n.startswith("vport") for n in names)
    assert "vda" not in names and "/dev/vda: No such file" in listing.replace("'", "")
    assert out(env, cid, "cat /proc/1/comm").strip() == "vmcri-pod-init"
    assert out(env, cid, "cat /proc/1/cgroup").strip().endswith("/vmcri-pod-init")
    mounts = out(env, cid, "cat /proc/self/mountinfo")
    assert "/run/vmcri/share " not in mounts and " /run/vmcri/share" not in mounts
    # CAP_MKNOD brings the nodes back, but the device cgroup denies them
    # (in its /dev: the rootfs is on 9p, which has no device nodes)
    made = out(env, cid, "d=$(cat /sys/block/vda/dev); mknod /dev/disk b ${d%:*} ${d#*:} 2>&1; "
                         "ls -l /dev/disk; head -c 16 /dev/disk 2>&1 | wc -c; "
                         "head -c 16 /dev/disk 2>&1; "
                         "p=$(cat /sys/class/virtio-ports/*/dev | head -n 1); "
                         "mknod /dev/port0 c ${p%:*} ${p#*:} 2>&1; (echo x > /dev/port0) 2>&1; "
                         "echo end")
    assert "brw" in made, made  # the node was made...
    # ...but it cannot be opened, nor can the agent's port
    assert made.count("Operation not permitted") >= 2 and "\n16\n" not in made, made


def test_the_pod_init_outlives_a_daemon_restart(env):
    before = sleeper(env, "before-restart", 100014)
    started_at = out(env, before, "cut -d' ' -f22 /proc/1/stat")  # the pod init's start time
    env[0].restart()
    after = sleeper(env, "after-restart", 100015)
    # the same pod init, so the same namespace: each sees the other
    assert "sleep 100014" in out(env, after, "ps -o pid,args")
    assert out(env, after, "cut -d' ' -f22 /proc/1/stat") == started_at
    for cid in (before, after):
        env[0].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_a_container_that_kills_everything_leaves_the_agent_running(env):
    """Last in the module: it kills every container it can see."""
    config = ctr_config("killer", image(env), command=["sleep", "100010"])
    config.linux.security_context.privileged = True
    killer = create_start(env, config)
    victim = sleeper(env, "victim", 100011)
    r = exec_sync(env, killer, ["/bin/sh", "-c", "kill -9 -1; kill -9 1; sleep 1; echo alive"])
    print("kill -9 -1 from a privileged container:", r.exit_code, r.stdout, r.stderr)
    wait_state(env, victim, pb.CONTAINER_EXITED)
    # the agent (and the pod init) survived: a new container starts and joins the pod init
    after = sleeper(env, "after", 100012)
    assert out(env, after, "cat /proc/1/comm").strip() == "vmcri-pod-init"
