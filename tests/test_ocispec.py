"""OCI spec builder: golden specs, the CRI rules one by one, and crun on the host running them.

Regenerate the golden files with VMCRI_UPDATE_GOLDEN=1 (then review the diff).
"""
import json
import os
import pathlib

import pytest
from cri_api.v1 import api_pb2 as cri

from vmcri.agent import protocol
from vmcri.container import ocispec, ocispec_process
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


# The "volumes" golden: what CreateContainer of a VM pod prepares (container_create):
# 0 an image volume with a sub path, 1 a recursive read-only hostPath, 2 a read-only
# hostPath with a writable submount on the host (rw in the guest: the host keeps its top
# read-only), 3 a plain read-only hostPath.
VOLUME_MOUNTS = [
    cri.Mount(container_path="/models", image=cri.ImageSpec(image="registry.example/models:1"),
              readonly=True, image_sub_path="weights"),
    cri.Mount(container_path="/mnt/rro", host_path="/srv/rro", readonly=True,
              recursive_read_only=True),
    cri.Mount(container_path="/mnt/ro-sub", host_path="/srv/ro-sub", readonly=True),
    cri.Mount(container_path="/mnt/ro", host_path="/srv/ro", readonly=True),
]
VOLUME_GUEST = GuestPaths(
    hosts=GUEST.hosts, resolv_conf=GUEST.resolv_conf, hostname=GUEST.hostname, shm=GUEST.shm,
    host_mount_to_guest={}, prepared={
        i: ocispec.PreparedMount(f"/run/vmcri/share/containers/ctr-1/mounts/{i}", ro)
        for i, ro in ((0, True), (1, True), (2, False), (3, True))})


@pytest.mark.parametrize("name", sorted(golden_configs()) + ["volumes"])
def test_golden(name):
    if name == "volumes":
        check_golden(name, build(container(mounts=list(VOLUME_MOUNTS)), guest=VOLUME_GUEST))
        return
    c, sb = golden_configs()[name]
    check_golden(name, build(c, sb))


def test_volume_mounts_options():
    by_dest = {m["destination"]: m for m in
               build(container(mounts=list(VOLUME_MOUNTS)), guest=VOLUME_GUEST)["mounts"]}
    assert by_dest["/models"]["options"] == ["rbind", "rprivate", "ro"]
    assert by_dest["/models"]["source"].endswith("/mounts/0")
    assert by_dest["/mnt/rro"]["options"] == ["rbind", "rprivate", "ro", "rro"]
    assert by_dest["/mnt/ro-sub"]["options"] == ["rbind", "rprivate", "rw"]
    assert by_dest["/mnt/ro"]["options"] == ["rbind", "rprivate", "ro"]


def test_image_volume_needs_a_prepared_source():
    c = container(mounts=[VOLUME_MOUNTS[0]])
    with pytest.raises(InvalidArgument, match=r"config\.mounts\[0\]\.image: image volumes "
                                              r"are supported in VM sandboxes only"):
        build(c)


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


def test_image_config_fields_from_the_registry_are_checked():
    assert build(image={**IMAGE, "WorkingDir": "app/./x"})["process"]["cwd"] == "/app/x"
    with pytest.raises(InvalidArgument, match="image config Cmd: must be a list of strings"):
        build(image={"Cmd": "sleep 1"})
    with pytest.raises(InvalidArgument, match="image config Env"):
        build(image={**IMAGE, "Env": [1]})
    with pytest.raises(InvalidArgument, match="image config WorkingDir"):
        build(image={**IMAGE, "WorkingDir": ["/"]})


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
    # the pod's devices, which the agent prepares: never the guest's own /dev
    assert mounts["/dev"]["type"] == "bind" and mounts["/dev"]["source"] == protocol.POD_DEV_DIR
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
    # no namespace_options at all is POD, the proto's zero value: the pod's PID namespace
    spec = build()
    assert spec["linux"]["namespaces"] == [{"type": "mount"},
                                           {"type": "pid", "path": protocol.POD_PID_NS},
                                           {"type": "cgroup"}]
    assert spec["linux"]["cgroupsPath"] == "/vmcri/sb-1/ctr-1"
    c = container()
    c.linux.security_context.namespace_options.pid = cri.CONTAINER
    assert build(c)["linux"]["namespaces"][1] == {"type": "pid"}
    c.linux.security_context.namespace_options.pid = cri.TARGET
    c.linux.security_context.namespace_options.target_id = "abc123"
    assert build(c)["linux"]["namespaces"][1] == {
        "type": "pid", "path": "/run/vmcri/ns/container/abc123/pid"}
    c.linux.security_context.namespace_options.target_id = "../x"
    with pytest.raises(InvalidArgument, match="namespace_options.target_id"):
        build(c)


def test_hugepage_page_size_is_checked():
    c = container()
    c.linux.resources.hugepage_limits.append(cri.HugepageLimit(page_size="2Mi", limit=0))
    with pytest.raises(InvalidArgument, match=r"hugepage_limits\[0\].page_size"):
        build(c)


def test_run_as_group_without_user_is_refused_like_containerd():
    c = container()
    c.linux.security_context.run_as_group.value = 1000
    with pytest.raises(InvalidArgument, match="run_as_group: user group is specified without user"):
        build(c)
    c.linux.security_context.run_as_username = "app"
    assert build(c)["process"]["user"]["gid"] == 1000


def test_exec_process_is_the_containers_with_the_exec_args():
    c = container()
    c.linux.security_context.run_as_user.value = 1000
    c.linux.security_context.supplemental_groups.append(4242)
    c.linux.security_context.no_new_privs = True
    spec = build(c)
    proc = ocispec_process.exec_process(spec["process"], ["id", "-u"], tty=True)
    for key in ("user", "capabilities", "noNewPrivileges", "cwd", "oomScoreAdj"):
        assert proc[key] == spec["process"][key]
    assert proc["args"] == ["id", "-u"] and proc["terminal"] is True
    assert proc["user"]["uid"] == 1000 and 4242 in proc["user"]["additionalGids"]
    assert proc["env"][-1] == "TERM=xterm"
    assert [e for e in proc["env"] if e != "TERM=xterm"] == \
        [e for e in spec["process"]["env"] if not e.startswith("TERM=")]
    assert spec["process"]["args"] != ["id", "-u"]  # the container's own is left alone


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

