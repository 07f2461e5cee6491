"""OCI spec builder: golden specs, the CRI rules one by one, and crun on the host running them.

Regenerate the golden files with VMCRI_UPDATE_GOLDEN=1 (then review the diff).
"""
import json
import os
import pathlib
import shutil
import subprocess

import pytest
from cri_api.v1 import api_pb2 as cri

from vmcri.container import ocispec
from vmcri.container.ocispec import GuestPaths, build_spec, resolve_args, merge_env
from vmcri.errors import InvalidArgument

GOLDEN = pathlib.Path(__file__).parent / "golden"

PASSWD = b"""root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment
app:x:1000:1000:App:/home/app:/bin/sh
web:x:33:33:www:/var/www:/bin/sh
broken line
"""
GROUP = b"""root:x:0:
daemon:x:1:
audio:x:29:app,web
video:x:44:app
app:x:1000:
staff:x:50:
"""


def image_files(path):
    return {"/etc/passwd": PASSWD, "/etc/group": GROUP}.get(path)


def no_image_files(path):
    return None


GUEST = GuestPaths(
    hosts="/run/vmcri/pod/hosts", resolv_conf="/run/vmcri/pod/resolv.conf",
    hostname="/run/vmcri/pod/hostname", shm="/run/vmcri/pod/shm",
    host_mount_to_guest=lambda p: "/mnt/share/volumes" + p,
)

IMAGE = {"Entrypoint": ["/docker-entrypoint.sh"], "Cmd": ["nginx", "-g", "daemon off;"],
         "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "NGINX_VERSION=1.25"],
         "WorkingDir": "/srv", "StopSignal": "SIGQUIT"}


def sandbox(privileged=False, **ns):
    sb = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web-0", namespace="default", uid="pod-uid-1"),
        hostname="web-0", log_directory="/var/log/pods/default_web-0_pod-uid-1")
    sb.linux.security_context.privileged = privileged
    for k, v in ns.items():
        setattr(sb.linux.security_context.namespace_options, k, v)
    return sb


def container(**kw):
    c = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="nginx", attempt=0),
                            image=cri.ImageSpec(image="docker.io/library/nginx:1.25"),
                            log_path="nginx/0.log")
    for k, v in kw.items():
        if isinstance(v, list):
            getattr(c, k).extend(v)
        elif isinstance(v, dict):
            getattr(c, k).update(v)
        else:
            setattr(c, k, v)
    return c


def build(c=None, sb=None, image=IMAGE, read=image_files, guest=GUEST):
    return build_spec("ctr-1", c or container(), sb or sandbox(), image,
                      rootfs_path="/mnt/share/ctr-1/rootfs", guest_paths=guest,
                      read_image_file=read, sandbox_id="sb-1")


def check_golden(name, spec):
    path = GOLDEN / f"oci_{name}.json"
    text = ocispec.spec_json(spec)
    if os.environ.get("VMCRI_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with VMCRI_UPDATE_GOLDEN=1"
    assert json.loads(path.read_text()) == spec, f"spec differs from {path.name}"


# ---------------------------------------------------------------- golden specs


def golden_configs():
    plain = (container(), sandbox())

    priv = container()
    priv.linux.security_context.privileged = True
    privileged = (priv, sandbox(privileged=True))

    by_name = container(tty=True, stdin=True, stdin_once=True)
    by_name.linux.security_context.run_as_username = "app"
    by_name.linux.security_context.supplemental_groups.append(50)

    sec = container(command=["/bin/sh"], args=["-c", "sleep 1"])
    sec.linux.security_context.seccomp.profile_type = cri.SecurityProfile.RuntimeDefault
    sec.linux.security_context.capabilities.drop_capabilities.extend(["NET_RAW"])
    sec.linux.security_context.no_new_privs = True
    sec.linux.security_context.readonly_rootfs = True

    mr = container(working_dir="/data", envs=[cri.KeyValue(key="MODE", value="prod")],
                   labels={"io.kubernetes.container.name": "nginx"},
                   annotations={"io.kubernetes.container.restartCount": "0"})
    mr.mounts.extend([
        cri.Mount(container_path="/data/cache", host_path="/var/lib/kubelet/pods/x/cache"),
        cri.Mount(container_path="/data", host_path="/var/lib/kubelet/pods/x/data",
                  readonly=True, propagation=cri.PROPAGATION_HOST_TO_CONTAINER),
        cri.Mount(container_path="/etc/hosts", host_path="/var/lib/kubelet/pods/x/etc-hosts"),
    ])
    r = mr.linux.resources
    r.cpu_shares, r.cpu_quota, r.cpu_period = 512, 50000, 100000
    r.cpuset_cpus, r.cpuset_mems = "0-1", "0"
    r.memory_limit_in_bytes, r.oom_score_adj = 256 << 20, 999
    r.hugepage_limits.append(cri.HugepageLimit(page_size="2MB", limit=0))
    r.unified["memory.high"] = "200000000"
    return {"plain": plain, "privileged": privileged, "user_by_name": (by_name, sandbox()),
            "seccomp_runtime_default": (sec, sandbox()), "mounts_resources": (mr, sandbox())}


@pytest.mark.parametrize("name", sorted(golden_configs()))
def test_golden(name):
    c, sb = golden_configs()[name]
    check_golden(name, build(c, sb))


# ---------------------------------------------------------------- process rules


@pytest.mark.parametrize("command,args,image,expected", [
    ([], [], {"Entrypoint": ["/ep"], "Cmd": ["a", "b"]}, ["/ep", "a", "b"]),
    (["/bin/cmd"], [], {"Entrypoint": ["/ep"], "Cmd": ["a"]}, ["/bin/cmd"]),
    (["/bin/cmd"], ["x"], {"Entrypoint": ["/ep"], "Cmd": ["a"]}, ["/bin/cmd", "x"]),
    ([], ["x", "y"], {"Entrypoint": ["/ep"], "Cmd": ["a"]}, ["/ep", "x", "y"]),
    ([], ["x"], {"Cmd": ["a"]}, ["x"]),
    ([], [], {"Cmd": ["a"]}, ["a"]),
    ([], [], {"Entrypoint": [""], "Cmd": ["a"]}, ["a"]),
])
def test_command_and_args_follow_containerd(command, args, image, expected):
    assert resolve_args(command, args, image) == expected


def test_no_command_anywhere_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="config.command"):
        build(image={})


def test_env_merge_overrides_by_key_and_defaults_path():
    env = merge_env(["A=1", "B=2", "EMPTY"], [("B", "3"), ("C", "4")])
    assert env == [f"PATH={ocispec.DEFAULT_PATH}", "A=1", "B=3", "EMPTY=", "C=4"]
    spec = build(container(envs=[cri.KeyValue(key="PATH", value="/x")]))
    assert "PATH=/x" in spec["process"]["env"]
    assert "NGINX_VERSION=1.25" in spec["process"]["env"]
    assert "HOSTNAME=web-0" in spec["process"]["env"]


def test_working_dir_precedence():
    assert build(container(working_dir="/w"))["process"]["cwd"] == "/w"
    assert build()["process"]["cwd"] == "/srv"
    assert build(image={"Cmd": ["x"]})["process"]["cwd"] == "/"


def test_tty_and_stdin_are_recorded():
    spec = build(container(tty=True, stdin=True))
    assert spec["process"]["terminal"] is True
    assert "TERM=xterm" in spec["process"]["env"]
    assert spec["annotations"][ocispec.ANN_STDIN] == "true"
    assert spec["annotations"][ocispec.ANN_STDIN_ONCE] == "false"
    assert spec["annotations"][ocispec.ANN_STOP_SIGNAL] == "SIGQUIT"
    assert build(container(stop_signal=cri.SIGKILL))["annotations"][
        ocispec.ANN_STOP_SIGNAL] == "SIGKILL"


@pytest.mark.parametrize("image_signal,expected", [
    ("SIGQUIT", "SIGQUIT"), ("quit", "SIGQUIT"), ("3", "SIGQUIT"), (None, "SIGTERM"),
    ("SIGRTMIN", "SIGRTMIN"),
])
def test_image_stop_signal_forms(image_signal, expected):
    spec = build(image={**IMAGE, "StopSignal": image_signal})
    assert spec["annotations"][ocispec.ANN_STOP_SIGNAL] == expected


def test_unknown_image_stop_signal_is_invalid():
    with pytest.raises(InvalidArgument, match="StopSignal: unknown signal 'SIGNOPE'"):
        build(image={**IMAGE, "StopSignal": "SIGNOPE"})


def test_runtime_annotations_and_labels():
    spec = build(container(labels={"l": "1", "both": "label"},
                           annotations={"a": "2", "both": "annotation"}))
    ann = spec["annotations"]
    assert ann["l"] == "1" and ann["a"] == "2" and ann["both"] == "annotation"
    assert ann["io.kubernetes.cri.container-type"] == "container"
    assert ann["io.kubernetes.cri.sandbox-id"] == "sb-1"
    assert ann["io.kubernetes.cri.container-name"] == "nginx"
    assert ann["io.kubernetes.cri.sandbox-namespace"] == "default"


# ---------------------------------------------------------------- users and groups


def user_of(read=image_files, image_user="", **sec):
    c = container()
    for k, v in sec.items():
        if k in ("run_as_user", "run_as_group"):
            getattr(c.linux.security_context, k).value = v
        elif k == "supplemental_groups":
            c.linux.security_context.supplemental_groups.extend(v)
        else:
            setattr(c.linux.security_context, k, v)
    return build(c, image={**IMAGE, "User": image_user}, read=read)["process"]["user"]


def test_default_user_is_root():
    assert user_of() == {"uid": 0, "gid": 0, "additionalGids": [0]}


def test_run_as_username_resolves_uid_gid_and_member_groups():
    assert user_of(run_as_username="app") == {"uid": 1000, "gid": 1000,
                                              "additionalGids": [1000, 29, 44]}


def test_run_as_user_takes_primary_group_from_passwd_or_zero():
    assert user_of(run_as_user=33)["gid"] == 33
    assert user_of(run_as_user=4242) == {"uid": 4242, "gid": 0, "additionalGids": [0]}


def test_run_as_group_and_supplemental_groups():
    u = user_of(run_as_user=1000, run_as_group=7, supplemental_groups=[50, 29])
    assert u == {"uid": 1000, "gid": 7, "additionalGids": [7, 29, 44, 50]}


def test_strict_supplemental_groups_policy_ignores_etc_group():
    u = user_of(run_as_username="app", supplemental_groups_policy=cri.Strict)
    assert u["additionalGids"] == [1000]


@pytest.mark.parametrize("image_user,uid,gid", [
    ("web", 33, 33), ("1000", 1000, 1000), ("1000:50", 1000, 50), ("app:staff", 1000, 50),
    ("5000:6000", 5000, 6000), (":audio", 0, 29),
])
def test_image_user_forms(image_user, uid, gid):
    u = user_of(image_user=image_user)
    assert (u["uid"], u["gid"]) == (uid, gid)


def test_missing_users_and_groups_name_the_field():
    with pytest.raises(InvalidArgument, match=r"run_as_username: user 'ghost'"):
        user_of(run_as_username="ghost")
    with pytest.raises(InvalidArgument, match=r"image config User 'ghost'"):
        user_of(image_user="ghost")
    with pytest.raises(InvalidArgument, match=r"group 'nogroup'"):
        user_of(image_user="app:nogroup")
    with pytest.raises(InvalidArgument, match="run_as_username"):
        user_of(read=no_image_files, run_as_username="app")


# ---------------------------------------------------------------- capabilities, privileged


def caps_of(add=(), drop=()):
    c = container()
    c.linux.security_context.capabilities.add_capabilities.extend(add)
    c.linux.security_context.capabilities.drop_capabilities.extend(drop)
    return build(c)["process"]["capabilities"]


def test_default_capabilities_are_containerds():
    caps = caps_of()
    assert set(caps["bounding"]) == set(ocispec.DEFAULT_CAPABILITIES)
    assert caps["effective"] == caps["permitted"] == caps["bounding"]
    assert "ambient" not in caps


def test_capability_add_and_drop_with_and_without_prefix():
    caps = caps_of(add=["NET_ADMIN", "CAP_SYS_TIME"], drop=["cap_chown", "KILL"])
    assert {"CAP_NET_ADMIN", "CAP_SYS_TIME"} <= set(caps["bounding"])
    assert not {"CAP_CHOWN", "CAP_KILL"} & set(caps["bounding"])


def test_capability_all_in_add_and_drop():
    assert caps_of(add=["ALL"])["bounding"] == list(ocispec.ALL_CAPABILITIES)
    assert caps_of(drop=["ALL"])["bounding"] == []
    assert caps_of(add=["ALL"], drop=["SYS_ADMIN"])["bounding"] == [
        c for c in ocispec.ALL_CAPABILITIES if c != "CAP_SYS_ADMIN"]
    assert caps_of(add=["NET_BIND_SERVICE"], drop=["ALL"])["bounding"] == [
        "CAP_NET_BIND_SERVICE"]


def test_unknown_capability_names_the_field():
    with pytest.raises(InvalidArgument, match=r"drop_capabilities\[1\]: unknown capability"):
        caps_of(drop=["CHOWN", "FLY"])


def test_privileged_vs_unprivileged():
    c = container()
    c.linux.security_context.privileged = True
    c.linux.security_context.seccomp.profile_type = cri.SecurityProfile.RuntimeDefault
    priv = build(c, sandbox(privileged=True))
    plain = build()
    assert priv["process"]["capabilities"]["bounding"] == list(ocispec.ALL_CAPABILITIES)
    assert "seccomp" not in priv["linux"]
    assert "maskedPaths" not in priv["linux"] and "readonlyPaths" not in priv["linux"]
    assert priv["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    mounts = {m["destination"]: m for m in priv["mounts"]}
    assert mounts["/dev"]["type"] == "bind" and mounts["/dev"]["source"] == "/dev"
    assert "ro" not in mounts["/sys"]["options"] and "ro" not in mounts["/sys/fs/cgroup"]["options"]
    plain_mounts = {m["destination"]: m for m in plain["mounts"]}
    assert plain_mounts["/dev"]["type"] == "tmpfs"
    assert "ro" in plain_mounts["/sys"]["options"]
    assert plain["linux"]["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    assert plain["linux"]["maskedPaths"] == list(ocispec.DEFAULT_MASKED_PATHS)
    assert plain["linux"]["readonlyPaths"] == list(ocispec.DEFAULT_READONLY_PATHS)


def test_privileged_container_needs_privileged_sandbox():
    c = container()
    c.linux.security_context.privileged = True
    with pytest.raises(InvalidArgument, match="privileged"):
        build(c, sandbox(privileged=False))


def test_cri_masked_and_readonly_paths_override_defaults():
    c = container()
    c.linux.security_context.masked_paths.append("/proc/secret")
    c.linux.security_context.readonly_paths.append("/proc/ro")
    spec = build(c)
    assert spec["linux"]["maskedPaths"] == ["/proc/secret"]
    assert spec["linux"]["readonlyPaths"] == ["/proc/ro"]


# ---------------------------------------------------------------- seccomp


def seccomp_of(path="", profile=None, ref="", **kw):
    c = container(**kw)
    sec = c.linux.security_context
    sec.seccomp_profile_path = path
    if profile is not None:
        sec.seccomp.profile_type = profile
        sec.seccomp.localhost_ref = ref
    return build(c)["linux"].get("seccomp")


def test_seccomp_profiles():
    default = seccomp_of(profile=cri.SecurityProfile.RuntimeDefault)
    assert default["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {n for r in default["syscalls"] if r["action"] == "SCMP_ACT_ALLOW"
               and "args" not in r for n in r["names"]}
    assert {"read", "write", "execve", "exit_group"} <= allowed
    assert not {"mount", "unshare", "reboot", "init_module"} & allowed
    assert seccomp_of(profile=cri.SecurityProfile.Unconfined) is None
    assert seccomp_of() is None
    assert seccomp_of("runtime/default") == default
    assert seccomp_of("docker/default") == default
    assert seccomp_of("unconfined") is None


def test_seccomp_follows_capabilities():
    c = container()
    c.linux.security_context.capabilities.add_capabilities.append("SYS_ADMIN")
    c.linux.security_context.seccomp_profile_path = "runtime/default"
    rules = build(c)["linux"]["seccomp"]["syscalls"]
    allowed = {n for r in rules if r["action"] == "SCMP_ACT_ALLOW" and "args" not in r
               for n in r["names"]}
    assert {"mount", "unshare", "clone", "setns"} <= allowed


def test_seccomp_localhost_profile(tmp_path):
    prof = {"defaultAction": "SCMP_ACT_LOG", "syscalls": []}
    good = tmp_path / "p.json"
    good.write_text(json.dumps(prof))
    assert seccomp_of(profile=cri.SecurityProfile.Localhost, ref=str(good)) == prof
    assert seccomp_of(f"localhost/{good}") == prof
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(InvalidArgument, match=r"seccomp.localhost_ref: .*bad.json.*not valid JSON"):
        seccomp_of(profile=cri.SecurityProfile.Localhost, ref=str(bad))
    with pytest.raises(InvalidArgument, match=r"seccomp_profile_path: cannot read .*missing"):
        seccomp_of(f"localhost/{tmp_path}/missing.json")
    with pytest.raises(InvalidArgument, match="seccomp_profile_path: unknown profile"):
        seccomp_of("weird")


# ---------------------------------------------------------------- mounts, resources, namespaces


def test_mounts_are_mapped_sorted_and_shadow_sandbox_files():
    c = container()
    c.mounts.extend([
        cri.Mount(container_path="/a/b/c", host_path="/h/abc",
                  propagation=cri.PROPAGATION_BIDIRECTIONAL),
        cri.Mount(container_path="/a", host_path="/h/a", readonly=True,
                  recursive_read_only=True),
        cri.Mount(container_path="/etc/resolv.conf", host_path="/h/resolv"),
    ])
    spec = build(c)
    dests = [m["destination"] for m in spec["mounts"]]
    assert dests.index("/a") < dests.index("/a/b/c")
    assert dests.index("/dev") < dests.index("/dev/pts") < dests.index("/dev/shm")
    depths = [d.count("/") for d in dests]
    assert depths == sorted(depths)
    by_dest = {m["destination"]: m for m in spec["mounts"]}
    assert by_dest["/a/b/c"]["source"] == "/mnt/share/volumes/h/abc"
    assert by_dest["/a/b/c"]["options"] == ["rbind", "rshared", "rw"]
    assert by_dest["/a"]["options"] == ["rbind", "rprivate", "ro", "rro"]
    assert by_dest["/etc/resolv.conf"]["source"] == "/mnt/share/volumes/h/resolv"
    assert dests.count("/etc/resolv.conf") == 1
    assert by_dest["/etc/hosts"]["source"] == "/run/vmcri/pod/hosts"
    assert by_dest["/dev/shm"]["source"] == "/run/vmcri/pod/shm"
    assert spec["linux"]["rootfsPropagation"] == "rshared"


def test_guest_paths_mapping_form_rejects_unshared_host_paths():
    guest = GuestPaths(hosts="/h", resolv_conf="/r", hostname="", shm="/s",
                       host_mount_to_guest={"/known": "/guest/known"})
    c = container()
    c.mounts.append(cri.Mount(container_path="/k", host_path="/known"))
    spec = build(c, guest=guest)
    assert {"destination": "/k", "type": "bind", "source": "/guest/known",
            "options": ["rbind", "rprivate", "rw"]} in spec["mounts"]
    assert "/etc/hostname" not in [m["destination"] for m in spec["mounts"]]
    c.mounts.append(cri.Mount(container_path="/u", host_path="/unknown"))
    with pytest.raises(InvalidArgument, match="/unknown"):
        build(c, guest=guest)


def test_readonly_rootfs_makes_sandbox_files_readonly():
    c = container()
    c.linux.security_context.readonly_rootfs = True
    spec = build(c)
    assert spec["root"] == {"path": "/mnt/share/ctr-1/rootfs", "readonly": True}
    hosts = next(m for m in spec["mounts"] if m["destination"] == "/etc/hosts")
    assert "ro" in hosts["options"]


def test_resources_map_to_linux_resources():
    c = container()
    r = c.linux.resources
    r.cpu_shares, r.cpu_quota, r.cpu_period, r.memory_limit_in_bytes = 2, -1, 10000, 1 << 30
    r.memory_swap_limit_in_bytes, r.oom_score_adj = 2 << 30, -998
    r.unified["pids.max"] = "100"
    spec = build(c)
    res = spec["linux"]["resources"]
    assert res["cpu"] == {"shares": 2, "quota": -1, "period": 10000}
    assert res["memory"] == {"limit": 1 << 30, "swap": 2 << 30}
    assert res["unified"] == {"pids.max": "100"}
    assert spec["process"]["oomScoreAdj"] == -998
    assert "cpu" not in build()["linux"]["resources"]


def test_namespaces_and_cgroup_path():
    spec = build()
    assert spec["linux"]["namespaces"] == [{"type": "mount"}, {"type": "pid"},
                                           {"type": "cgroup"}]
    assert spec["linux"]["cgroupsPath"] == "/vmcri/sb-1/ctr-1"
    c = container()
    c.linux.security_context.namespace_options.pid = cri.POD
    types = [n["type"] for n in build(c)["linux"]["namespaces"]]
    assert types == ["mount", "cgroup"]


def test_pod_sysctls_are_for_the_guest_not_the_container_spec():
    sb = sandbox()
    sb.linux.sysctls["net.ipv4.ip_unprivileged_port_start"] = "0"
    assert ocispec.sandbox_sysctls(sb) == {"net.ipv4.ip_unprivileged_port_start": "0"}
    assert "sysctl" not in build(sb=sb)["linux"]


def test_host_namespaces_and_devices_are_rejected():
    with pytest.raises(InvalidArgument, match="cannot share host namespaces"):
        c = container()
        c.linux.security_context.namespace_options.pid = cri.NODE
        build(c)
    with pytest.raises(InvalidArgument, match=r"namespace_options\.network: a VM sandbox"):
        build(sb=sandbox(network=cri.NODE))
    c = container()
    c.devices.append(cri.Device(container_path="/dev/fuse", host_path="/dev/fuse",
                                permissions="rwm"))
    with pytest.raises(InvalidArgument, match=r"config.devices\[0\]: a VM sandbox cannot pass "
                                              "host devices"):
        build(c)


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


def host_adjust(spec):
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
# checks above cannot show): resources.unified, hugetlb and swap limits, the guest's /dev.


@pytest.fixture(scope="module")
def guest_pod():
    from tests.support.fx_daemon import make_daemon
    from vmcri import config as config_mod
    from vmcri.daemon import Runtime
    d = make_daemon('cni_conf_dir = ""', prefix="vmcri-ocispec-")
    rt = Runtime(config_mod.load(d.config_path))
    sb = sandbox(privileged=True)
    sb.log_directory = ""
    sid = rt.sandboxes.run(sb)
    try:
        yield rt, sid, sb
    finally:
        rt.sandboxes.stop(sid)
        rt.sandboxes.remove(sid)
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
    (host_bundle / "config.json").write_text(json.dumps(spec))
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


@pytest.mark.vm
def test_guest_crun_privileged_gets_the_guest_devices(guest_pod, busybox_rootfs):
    c = container()
    c.linux.security_context.privileged = True
    rc, out = run_in_guest_crun(guest_pod, busybox_rootfs, "priv", c,
                                "grep -E '^(CapEff|Seccomp):' /proc/self/status; "
                                "echo disk=$(head -c 16 /dev/vda | wc -c); "
                                "mkdir /sys/fs/cgroup/sub && rmdir /sys/fs/cgroup/sub && echo cg-rw")
    assert rc == 0, out
    assert int(_status_field(out, "CapEff"), 16) == _cap_mask(ocispec.ALL_CAPABILITIES)
    assert "Seccomp:\t0" in out
    assert "disk=16" in out  # a guest block device: the VM's, never the host's
    assert "cg-rw" in out


@pytest.mark.vm
def test_guest_crun_pod_pid_namespace_is_the_guests(guest_pod, busybox_rootfs):
    own, shared = container(), container()
    shared.linux.security_context.namespace_options.pid = cri.POD
    script = "echo pid=$$"
    _, out_own = run_in_guest_crun(guest_pod, busybox_rootfs, "pid-own", own, script)
    _, out_shared = run_in_guest_crun(guest_pod, busybox_rootfs, "pid-pod", shared, script)
    assert "pid=1\n" in out_own
    assert "pid=1\n" not in out_shared and "pid=" in out_shared
