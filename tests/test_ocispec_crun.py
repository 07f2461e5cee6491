"""The built specs run by real crun: on the host, and inside a real pod VM (marked vm)."""
import json
import os
import pathlib
import shutil
import subprocess

import pytest
from cri_api.v1 import api_pb2 as cri

from tests.test_ocispec import GROUP, PASSWD, container, sandbox
from vmcri.agent import protocol
from vmcri.container import ocispec
from vmcri.container.ocispec import GuestPaths, build_spec


# ---------------------------------------------------------------- crun on the host
# The guest runs the same crun (1.8.1) as this host, so crun accepting and running our
# specs here proves them. Host differences, each adjusted only in host_adjust():
# - the host has cgroup v1 plus a cgroup2 mount holding only hugetlb ("hybrid"), which
#   crun refuses; the run happens in a private mount namespace without that cgroup2 mount,
#   and the cgroup v2-only linux.resources.unified and hugepage limits are left out;
# - root on this host lacks some capabilities (e.g. CAP_SYS_RESOURCE), so the capability
#   sets are cut to the host's bounding set and oomScoreAdj is never below the host's own.

CRUN = shutil.which("crun")
needs_crun = pytest.mark.skipif(not CRUN or os.geteuid() != 0, reason="needs crun and root")
DEB_CACHE = os.environ.get("VMCRI_TEST_DEB_CACHE", "/var/cache/vmcri-test/debs")


@pytest.fixture(scope="module")
def busybox_rootfs(tmp_path_factory):
    from vmcri.guestimage import debs
    found = debs.resolve(["busybox-static"])
    paths = debs.download(list(found.values()), DEB_CACHE)
    root = tmp_path_factory.mktemp("bb-rootfs")
    root.chmod(0o755)  # pytest's 0700 would lock a non-root container user out of "/"
    unpacked = tmp_path_factory.mktemp("bb-deb")
    debs.extract(paths["busybox-static"], str(unpacked))
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "data", "srv"):
        (root / d).mkdir()
    shutil.copy2(unpacked / "bin" / "busybox", root / "bin" / "busybox")
    for applet in ("sh", "id", "cat", "grep", "mount", "ls", "touch", "wc", "echo", "pwd",
                   "unshare"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_bytes(PASSWD)
    (root / "etc" / "group").write_bytes(GROUP)
    for f in ("hosts", "resolv.conf", "hostname"):
        (root / "etc" / f).write_text("")
    return root


def _host_capabilities():
    with open("/proc/self/status") as f:
        bnd = next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd:"))
    return {c for i, c in enumerate(ocispec.ALL_CAPABILITIES) if bnd >> i & 1}


def _cap_mask(caps):
    return sum(1 << ocispec.ALL_CAPABILITIES.index(c) for c in caps)


def standalone(spec):
    """The spec as plain crun can run it without the agent, which resolves the pod's
    placeholders: the pod PID namespace becomes a new one, the pod's devices the /dev."""
    for ns in spec["linux"]["namespaces"]:
        if ns.get("path") == protocol.POD_PID_NS:
            del ns["path"]
    for m in spec["mounts"]:
        if m["source"] == protocol.POD_DEV_DIR:
            m["source"] = "/dev"
    return spec


def host_adjust(spec):
    standalone(spec)
    spec["linux"]["resources"].pop("unified", None)
    spec["linux"]["resources"].pop("hugepageLimits", None)
    host_caps = _host_capabilities()
    caps = spec["process"]["capabilities"]
    for key in caps:
        caps[key] = [c for c in caps[key] if c in host_caps]
    with open("/proc/self/oom_score_adj") as f:
        spec["process"]["oomScoreAdj"] = max(spec["process"]["oomScoreAdj"], int(f.read()))
    return spec


def _rmdir_cgroups(name):
    for hierarchy in pathlib.Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / name
        if top.is_dir():
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                os.rmdir(dirpath)


def run_in_crun(tmp_path, rootfs, config, sb, script):
    """Build the spec for `config`, run `script` in it with crun, return (rc, stdout, spec)."""
    pod = tmp_path / "pod"
    (pod / "shm").mkdir(parents=True)
    (pod / "hosts").write_text("10.88.0.2 web-0\n")
    (pod / "resolv.conf").write_text("nameserver 10.88.0.1\n")
    (pod / "hostname").write_text("web-0\n")
    volumes = tmp_path / "volumes"
    cgroup_root = f"vmcri-hosttest-{os.getpid()}"
    guest = GuestPaths(hosts=str(pod / "hosts"), resolv_conf=str(pod / "resolv.conf"),
                       hostname=str(pod / "hostname"), shm=str(pod / "shm"),
                       host_mount_to_guest=lambda p: str(volumes) + p,
                       cgroup_root="/" + cgroup_root)
    config.command[:] = ["/bin/sh", "-c", script]
    spec = build_spec("ctr", config, sb, {"Env": ["FROM_IMAGE=yes"], "WorkingDir": "/srv"},
                      rootfs_path=str(rootfs), guest_paths=guest,
                      read_image_file=lambda p: (rootfs / p.lstrip("/")).read_bytes()
                      if (rootfs / p.lstrip("/")).is_file() else None,
                      sandbox_id="sb")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(host_adjust(json.loads(json.dumps(spec)))))
    state = tmp_path / "crun-state"
    try:
        r = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'umount /sys/fs/cgroup/unified 2>/dev/null; exec crun --root "$1" run -b "$2" "$3"',
             "sh", str(state), str(bundle), f"vmcri-test-{os.getpid()}"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    finally:
        _rmdir_cgroups(cgroup_root)
    assert "error" not in r.stderr.lower(), r.stderr
    return r.returncode, r.stdout, spec


def _status_field(out, name):
    return next(line.split()[1] for line in out.splitlines() if line.startswith(name + ":"))


@needs_crun
def test_crun_runs_plain_spec(tmp_path, busybox_rootfs):
    (tmp_path / "volumes" / "h" / "ro").mkdir(parents=True)
    (tmp_path / "volumes" / "h" / "ro" / "f").write_text("from-host\n")
    c = container(envs=[cri.KeyValue(key="FROM_CRI", value="yes")])
    sec = c.linux.security_context
    sec.run_as_username = "app"
    sec.supplemental_groups.append(50)
    sec.seccomp.profile_type = cri.SecurityProfile.RuntimeDefault
    c.mounts.append(cri.Mount(container_path="/data", host_path="/h/ro", readonly=True))
    c.linux.resources.memory_limit_in_bytes = 64 << 20
    c.linux.resources.cpu_shares = 512
    c.linux.resources.unified["memory.high"] = "60000000"  # v2 only: dropped on this host
    script = ("id; pwd; echo env=$FROM_IMAGE/$FROM_CRI; grep -E '^(Cap|Seccomp)' "
              "/proc/self/status; cat /etc/hosts /data/f; touch /data/x || echo ro-ok; "
              "echo masked=$(wc -c < /proc/timer_list); mount; ls /dev | wc -l")
    rc, out, spec = run_in_crun(tmp_path, busybox_rootfs, c, sandbox(), script)
    assert rc == 0, out
    assert "uid=1000(app) gid=1000(app) groups=29(audio),44(video),50(staff),1000(app)" in out
    assert "/srv\n" in out and "env=yes/yes" in out
    expected = set(spec["process"]["capabilities"]["effective"]) & _host_capabilities()
    # A non-root user keeps no effective capabilities, but the bounding set is ours.
    assert int(_status_field(out, "CapBnd"), 16) == _cap_mask(expected)
    assert _status_field(out, "Seccomp") == "2"
    assert "10.88.0.2 web-0" in out and "from-host" in out and "ro-ok" in out
    assert "masked=0" in out
    assert "on /sys type sysfs (ro," in out and "on /proc/sys type proc (ro," in out


@needs_crun
def test_crun_runs_privileged_spec(tmp_path, busybox_rootfs):
    c = container()
    c.linux.security_context.privileged = True
    script = ("grep -E '^(CapEff|Seccomp)' /proc/self/status; mount; "
              "echo devs=$(ls /dev | wc -l)")
    rc, out, spec = run_in_crun(tmp_path, busybox_rootfs, c, sandbox(privileged=True), script)
    assert rc == 0, out
    assert int(_status_field(out, "CapEff"), 16) == _cap_mask(
        set(ocispec.ALL_CAPABILITIES) & _host_capabilities())
    assert _status_field(out, "Seccomp") == "0"
    assert "on /sys type sysfs (rw," in out
    assert "/proc/timer_list" not in out  # nothing masked
    devs = int(out.split("devs=")[1].split()[0])
    assert devs > len(os.listdir("/dev")) // 2  # the runtime's own /dev, not a small tmpfs


@needs_crun
@pytest.mark.parametrize("profile,expected", [
    (cri.SecurityProfile.RuntimeDefault, "unshare(0x10000000): Operation not permitted"),
    (cri.SecurityProfile.Unconfined, "in-new-userns"),
])
def test_crun_enforces_runtime_default_seccomp(tmp_path, busybox_rootfs, profile, expected):
    # Creating a user namespace needs no capability, so only the seccomp filter (which
    # allows unshare only with CAP_SYS_ADMIN) can stop it.
    c = container()
    c.linux.security_context.seccomp.profile_type = profile
    rc, out, _ = run_in_crun(tmp_path, busybox_rootfs, c, sandbox(),
                             "unshare -U /bin/echo in-new-userns 2>&1")
    assert expected in out


@needs_crun
def test_crun_readonly_rootfs_and_sandbox_files(tmp_path, busybox_rootfs):
    c = container()
    c.linux.security_context.readonly_rootfs = True
    rc, out, _ = run_in_crun(tmp_path, busybox_rootfs, c, sandbox(),
                             "touch /x 2>&1; (echo x > /etc/hosts) 2>&1; "
                             "echo shm > /dev/shm/f && echo shm-writable")
    assert "touch: /x: Read-only file system" in out
    assert "can't create /etc/hosts: Read-only file system" in out
    assert "shm-writable" in out
    assert (tmp_path / "pod" / "shm" / "f").read_text() == "shm\n"  # the pod's shared shm


# ---------------------------------------------------------------- crun in a real pod VM
# The same specs, run by the guest's crun on the guest's cgroup v2 (which the host
# checks above cannot show): resources.unified, hugetlb and swap limits.


@pytest.fixture(scope="module")
def guest_pod():
    from tests.support.fx_daemon import make_daemon
    from vmcri import config as config_mod
    from vmcri.daemon import Runtime
    d = make_daemon('cni_conf_dir = ""', prefix="vmcri-ocispec-")
    rt = None
    sid = None
    sb = sandbox(privileged=True)
    sb.log_directory = ""
    try:
        rt = Runtime(config_mod.load(d.config_path))
        sid = rt.sandboxes.run(sb)
        yield rt, sid, sb
    finally:
        if sid:
            rt.sandboxes.stop(sid)
            rt.sandboxes.remove(sid)
        if rt is not None:
            rt.close()
        shutil.rmtree(d.base, ignore_errors=True)


def run_in_guest_crun(guest_pod, rootfs, name, config, script):
    from vmcri.agent import protocol
    rt, sid, sb = guest_pod
    host_bundle = pathlib.Path(rt.sandboxes.paths(sid).share_dir) / "ocispec-test" / name
    guest_bundle = f"{protocol.SHARE_MOUNT}/ocispec-test/{name}"
    shutil.copytree(rootfs, host_bundle / "rootfs", symlinks=True)
    for f in ("hosts", "resolv.conf", "hostname"):
        (host_bundle / f).write_text(f"{f} of the pod\n")
    (host_bundle / "shm").mkdir()
    guest = GuestPaths(hosts=f"{guest_bundle}/hosts", resolv_conf=f"{guest_bundle}/resolv.conf",
                       hostname=f"{guest_bundle}/hostname", shm=f"{guest_bundle}/shm",
                       host_mount_to_guest=lambda p: p)
    config.command[:] = ["/bin/sh", "-c", script]
    spec = build_spec(name, config, sb, {}, rootfs_path=f"{guest_bundle}/rootfs",
                      guest_paths=guest, sandbox_id=sid[:16],
                      read_image_file=lambda p: (rootfs / p.lstrip("/")).read_bytes()
                      if (rootfs / p.lstrip("/")).is_file() else None)
    (host_bundle / "config.json").write_text(json.dumps(standalone(json.loads(json.dumps(spec)))))
    agent = rt.sandboxes.agent(rt.sandboxes.get(sid))
    proc = agent.open_process(["/bin/sh", "-c", f"crun run -b {guest_bundle} {name} 2>&1"],
                              timeout=120)
    out = b""
    while len(out) < 1 << 20:
        chunk = proc.recv(65536, timeout=120)
        if not chunk:
            break
        out += chunk
    return proc.exit_status(120), out.decode()


@pytest.mark.vm
def test_guest_crun_applies_cgroup_v2_resources_and_seccomp(guest_pod, busybox_rootfs):
    c = container()
    c.linux.security_context.run_as_username = "app"
    c.linux.security_context.seccomp.profile_type = cri.SecurityProfile.RuntimeDefault
    r = c.linux.resources
    r.memory_limit_in_bytes, r.memory_swap_limit_in_bytes = 64 << 20, 128 << 20
    r.cpu_shares, r.cpu_quota, r.cpu_period, r.cpuset_cpus = 512, 50000, 100000, "0"
    r.oom_score_adj = 500
    r.hugepage_limits.append(cri.HugepageLimit(page_size="2MB", limit=0))
    r.unified.update({"memory.high": "60000000", "pids.max": "50"})
    files = ("memory.max memory.high pids.max cpu.max cpu.weight memory.swap.max "
             "hugetlb.2MB.max cpuset.cpus")
    rc, out = run_in_guest_crun(guest_pod, busybox_rootfs, "plain", c,
                                f"id; for f in {files}; do echo $f=$(cat /sys/fs/cgroup/$f); "
                                "done; echo oom=$(cat /proc/self/oom_score_adj); "
                                "grep Seccomp: /proc/self/status; cat /etc/hosts; "
                                "unshare -U /bin/echo in-userns 2>&1; echo done")
    assert rc == 0 and out.endswith("done\n"), out
    assert "uid=1000(app) gid=1000(app)" in out
    for expected in ("memory.max=67108864", "pids.max=50", "cpu.max=50000 100000",
                     "memory.swap.max=67108864",  # CRI's memory+swap less the memory limit
                     "hugetlb.2MB.max=0", "cpuset.cpus=0", "oom=500", "hosts of the pod"):
        assert expected in out, out
    assert "memory.high=59998208" in out  # 60000000 rounded down to whole pages
    assert "Seccomp:\t2" in out and "Operation not permitted" in out


@needs_crun
@pytest.mark.parametrize("rro", [False, True])
def test_crun_rro_covers_submounts_and_ro_does_not(tmp_path, busybox_rootfs, rro):
    # critest's RRO check, by the guest's crun version (1.8.1) run on the host: a tmpfs
    # mounted inside the read-only volume stays writable unless the mount is rro
    from vmcri.sandbox import hostfs
    vol = tmp_path / "volumes" / "h" / "vol"
    (vol / "tmpfs").mkdir(parents=True)
    hostfs._mount("none", str(vol / "tmpfs"), "tmpfs", 0, "size=1m")
    try:
        c = container()
        c.linux.security_context.run_as_user.value = 0
        c.mounts.append(cri.Mount(container_path="/data", host_path="/h/vol", readonly=True,
                                  recursive_read_only=rro))
        rc, out, spec = run_in_crun(tmp_path, busybox_rootfs, c, sandbox(),
                                    "touch /data/tmpfs/file 2>&1; echo rc=$?; "
                                    "touch /data/top 2>&1; echo top=$?")
    finally:
        hostfs.unmount_tree(str(vol))
    assert rc == 0, out
    assert ("rro" in next(m for m in spec["mounts"] if m["destination"] == "/data")["options"]) == rro
    assert "top=1" in out and "Read-only file system" in out, out
    assert ("rc=1" if rro else "rc=0") in out, out
