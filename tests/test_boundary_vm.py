"""The guest is hostile and has root: guest root in a real pod VM (a shell the test runs
through the pod's own agent, as any guest-kernel owner could) attacks every path of the
pod's 9p share that the host touches, before CreateContainer, StartContainer,
ContainerStats, RemoveContainer and RemovePodSandbox. (A container cannot mount the share
itself: the agent's mount holds the virtio-9p channel, a second mount is EBUSY.) After each step the host has written, mounted and deleted nothing
outside the pod's own dirs (a canary host dir is checked, and /proc/self/mountinfo), and
the daemon still answers.

test_reproduction_symlinked_containers_dir is issue 16's escape: on the code before the
read-only export, CreateContainer made <canary>/<id>/rootfs on the host and mounted the
container's overlay there, and the mount outlived RemovePodSandbox.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support.pods import wait_for
from vmcri.channel import AgentClient
from tests.test_sandbox_vm import pod_config
from vmcri.agent import protocol
from vmcri.sandbox import hostfs

pytestmark = [pytest.mark.vm, pytest.mark.registry]

SHARE = protocol.SHARE_MOUNT  # where the guest has the pod's share mounted
CONSOLE_FLOOD_MIB = 10
# virtlogd's defaults (max_size 2 MiB, max_backups 3): console.log and 3 backups
CONSOLE_BOUND = 4 * 2 * 1024 * 1024 + 65536


def _tree_digest(root: str) -> list:
    """Everything under `root` (names, types, sizes, link targets, contents), to compare."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            item = [os.path.relpath(p, root), st.st_mode, st.st_size]
            if os.path.islink(p):
                item.append(os.readlink(p))
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    item.append(hashlib.sha256(f.read()).hexdigest())
            out.append(item)
    return out


class Canary:
    """A host dir the guest aims at; nothing in it may change, and nothing be mounted there."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.join(path, "keep", "deep"))
        with open(os.path.join(path, "keep", "deep", "data"), "wb") as f:
            f.write(b"canary" * 700_000)  # 4 MiB: must never count as the pod's usage
        self.before = _tree_digest(path)

    def check(self, what: str) -> None:
        assert hostfs.mounts_under(self.path) == [], f"{what}: a mount appeared in the canary"
        assert _tree_digest(self.path) == self.before, f"{what}: the canary dir changed"


@pytest.fixture(scope="module")
def hostile_pod(daemon_factory, test_images, tmp_path_factory):
    d = daemon_factory('cni_conf_dir = ""\ninsecure_registries = ["%s"]' % test_images.registry)
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=test_images.multi.ref)))
    cfg = pod_config("hostile")
    cfg.linux.security_context.privileged = True
    cfg.log_directory = str(tmp_path_factory.mktemp("hostile-logs"))
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    canary = Canary(str(tmp_path_factory.mktemp("canary") / "c"))
    hostpath = str(tmp_path_factory.mktemp("hostpath"))
    with open(os.path.join(hostpath, "file"), "w") as f:
        f.write("host data\n")
    attacker = _create(d, sid, cfg, test_images.multi.ref, "attacker", privileged=True)
    d.runtime.StartContainer(pb.StartContainerRequest(container_id=attacker))
    info = json.loads(d.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(
        pod_sandbox_id=sid, verbose=True)).info["info"])
    env = {"d": d, "sid": sid, "cfg": cfg, "image": test_images.multi.ref, "canary": canary,
           "hostpath": hostpath, "attacker": attacker, "agent_socket": info["agentSocket"],
           "console": info["consoleLog"]}
    rc, out = _guest_root(env, f"ls {SHARE}; touch {SHARE}/planted")
    assert "containers" in out, f"guest root does not see the share: {out}"
    assert rc != 0 and "Read-only file system" in out, f"the share's top is writable: {out}"
    yield env
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))


def _create(d, sid, cfg, image, name, privileged=False, mounts=()) -> str:
    c = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image),
                           command=["/bin/sh", "-c", "exec sleep 100000"], log_path=f"{name}.log",
                           mounts=list(mounts))
    if privileged:
        c.linux.security_context.privileged = True
        c.linux.security_context.namespace_options.pid = pb.POD
    return d.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=cfg, config=c)).container_id


def _guest_root(env, script: str, timeout: int = 600) -> tuple[int, str]:
    """`script` as root in the guest's own namespaces, through the pod's agent. The agent's
    port takes one host connection, so the daemon steps away meanwhile (pods outlive it)."""
    d = env["d"]
    d.stop()
    try:
        client = AgentClient(env["agent_socket"], connect_timeout=30, call_timeout=60)
        try:
            proc = client.open_process(["/bin/sh", "-c", script + " 2>&1"])
            out = bytearray()
            while chunk := proc.recv(65536, timeout=timeout):
                out += chunk
            rc = proc.exit_status(timeout)
        finally:
            client.close()
    finally:
        d.start()
    return rc, out.decode(errors="replace")


def _still_serving(env) -> None:
    d = env["d"]
    assert d.runtime.Version(pb.VersionRequest()).runtime_name
    ids = {c.id for c in d.runtime.ListContainers(pb.ListContainersRequest()).containers}
    assert env["attacker"] in ids


def _no_stray_mounts(env) -> None:
    """Every vmcri-made mount lies in the daemon's own dirs."""
    root = env["d"].base
    env["canary"].check("mounts")
    for m in hostfs.mount_table():
        if "/containers/" in m["point"] and "vmcri" in m["point"]:
            assert m["point"].startswith(root + "/"), f"a container mount outside vmcri: {m}"


def test_reproduction_symlinked_containers_dir(hostile_pod):
    env = hostile_pod
    c = env["canary"].path
    _guest_root(env, f"mv {SHARE}/containers {SHARE}/containers.x; ln -s {c} {SHARE}/containers; "
                     f"ln -s {c} {SHARE}/containers.x/planted")
    cid = _create(env["d"], env["sid"], env["cfg"], env["image"], "victim-repro")
    env["canary"].check("CreateContainer after the containers/ swap")
    assert not glob.glob(os.path.join(c, "*", "rootfs")), "CreateContainer followed the guest's link"
    env["d"].runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    rc, out = _guest_root(env, f"ls {SHARE}/containers/{cid}/rootfs/bin/sh")
    assert rc == 0, f"the new container's rootfs is not in the share where the host put it: {out}"
    env["d"].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    env["canary"].check("RemoveContainer")
    _no_stray_mounts(env)
    _still_serving(env)


def test_skeleton_paths_of_a_container(hostile_pod):
    """Swap config.json, rootfs/ and mounts/N of a created container for links to the
    canary before Start, Stats and Remove."""
    env, c = hostile_pod, hostile_pod["canary"].path
    mount = pb.Mount(container_path="/data", host_path=env["hostpath"], readonly=True)
    cid = _create(env["d"], env["sid"], env["cfg"], env["image"], "victim-skel", mounts=[mount])
    b = f"{SHARE}/containers/{cid}"
    _guest_root(env, f"mv {b}/config.json {b}/config.old; ln -s {c}/keep {b}/config.json; "
             f"mv {b}/mounts {b}/mounts.old; ln -s {c} {b}/mounts; "
             f"rm -rf {b}/mounts.old/0/*; ln -s {c} {b}/rootfs/evil; mkdir {b}/rootfs/d; "
             f"ln -s {c}/keep {b}/rootfs/d/deep")
    env["d"].runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    env["canary"].check("StartContainer")
    stats = env["d"].runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats
    assert stats.writable_layer.used_bytes.value < 4_000_000, "the stats walk counted the canary"
    with open(os.path.join(env["hostpath"], "file")) as f:
        assert f.read() == "host data\n", "a read-only hostPath was written through the share"
    env["d"].runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    env["d"].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    env["canary"].check("RemoveContainer")
    assert os.path.exists(os.path.join(env["hostpath"], "file")), "Remove emptied the hostPath"
    _no_stray_mounts(env)
    _still_serving(env)


def test_devices_made_in_the_rootfs_are_not_opened_by_qemu(hostile_pod):
    """With 9p passthrough, a guest mknod in the overlay makes a real device node on the
    host; qemu (root) must not open it for the guest: the overlay is nodev."""
    env = hostile_pod
    cid = _create(env["d"], env["sid"], env["cfg"], env["image"], "victim-dev")
    r = f"{SHARE}/containers/{cid}/rootfs"
    rc, out = _guest_root(env, f"mknod {r}/hostzero c 1 5 && head -c 4 {r}/hostzero | wc -c")
    assert out.strip().splitlines()[-1:] != ["4"], f"the guest read a host device via qemu: {out}"
    env["d"].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    _no_stray_mounts(env)
    _still_serving(env)


def test_console_flood_is_capped(hostile_pod):
    env = hostile_pod
    console = env["console"]
    rc, out = _guest_root(env, "t=/dev/ttyS0; "
                       f"i=0; while [ $i -lt {CONSOLE_FLOOD_MIB * 4} ]; do "
                       "head -c 262144 /dev/zero | tr '\\0' x > $t || exit 1; i=$((i+1)); done; "
                       "echo FLOOD-END > $t", timeout=600)
    assert rc == 0, f"the flood did not reach the console: {out}"
    files = glob.glob(console + "*")
    total = sum(os.path.getsize(f) for f in files)
    assert total <= CONSOLE_BOUND, f"console logs grew to {total} bytes: {files}"
    wait_for(lambda: "FLOOD-END" in hostfs.console_tail(console), "the console tail", timeout=30)
    _still_serving(env)


def test_remove_pod_leaves_nothing(hostile_pod, daemon_factory):
    """Last: the attacker breaks what it can of the share, then the pod goes; the canary
    is untouched and no mount of the pod is left on the host."""
    env = hostile_pod
    c = env["canary"].path
    _guest_root(env, f"for d in {SHARE}/containers/*; do ln -s {c} $d/rootfs/link; "
             f"mv $d $d.gone; ln -s {c} $d; done; ln -s {c} {SHARE}/evil")
    d, sid = env["d"], env["sid"]
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    env["canary"].check("RemovePodSandbox")
    assert [m for m in hostfs.mounts_under(d.root_dir) if "/sandboxes/" in m] == []
    assert not os.path.exists(os.path.join(d.root_dir, "sandboxes", sid))
    assert d.runtime.Version(pb.VersionRequest()).runtime_name
