"""Container root filesystems through the guest-cached 9p view (rootfs_cache = "loose").

One 9p device exports every container's overlay, each a host mount of its own. Containers of
one image share the lower files, so without a device part in qemu's qids (multidevs=remap)
the guest's cache took two containers' /bin for one directory: a file one container wrote
appeared in the other, and a new container was shown a removed one's tree."""
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.test_container_vm import create_start, ctr_config, exec_sync, wait_state
from tests.support.pods import pod_env

pytestmark = [pytest.mark.vm, pytest.mark.registry]

SLEEPER = dict(command=["/bin/sh", "-c"], args=["exec sleep 100000"])


@pytest.fixture(scope="module")
def env(daemon_factory, test_images, tmp_path_factory):
    yield from pod_env(daemon_factory, test_images, tmp_path_factory, "rootfs-cache",
                       extra_config='rootfs_cache = "loose"')


def sh(env, cid, script):
    r = exec_sync(env, cid, ["/bin/sh", "-c", script])
    assert r.exit_code == 0, (script, r.stdout, r.stderr)
    return r.stdout.decode()


def running(env, name):
    cid = create_start(env, ctr_config(name, env[3].multi.ref, **SLEEPER))
    wait_state(env, cid, pb.ContainerState.CONTAINER_RUNNING)
    return cid


def gone(env, cid):
    env[0].runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    env[0].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_the_root_is_the_cached_view(env):
    cid = running(env, "which-root")
    root = [line.split() for line in sh(env, cid, "cat /proc/mounts").splitlines()
            if line.split()[1:2] == ["/"]]
    assert root and root[-1][0] == "vmcri-rootfs" and "loose" in root[-1][3].split(","), root
    gone(env, cid)


def test_two_containers_of_one_image_keep_their_own_writes(env):
    a, b = running(env, "writer-a"), running(env, "writer-b")
    # b looks first, so that its guest-cached view of the shared image files exists
    assert "tool.sh" in sh(env, b, "ls /bin") and sh(env, b, "cat /work/hello.txt") == "hello\n"
    sh(env, a, "echo a > /bin/only-a; echo changed > /work/hello.txt; rm /bin/tool.sh; mkdir /opq/a-dir")
    assert sh(env, a, "cat /bin/only-a /work/hello.txt") == "a\nchanged\n"
    listing_b = sh(env, b, "ls /bin; ls /opq")
    assert "only-a" not in listing_b and "tool.sh" in listing_b and "a-dir" not in listing_b
    assert sh(env, b, "cat /work/hello.txt; test ! -e /bin/only-a && echo absent") == "hello\nabsent\n"
    assert "tool.sh" not in sh(env, a, "ls /bin")
    gone(env, a)
    gone(env, b)


def test_a_new_container_sees_its_image_not_a_removed_ones_changes(env):
    for round_ in range(3):
        cid = running(env, f"again-{round_}")
        seen = sh(env, cid, "cat /work/hello.txt; ls /bin/sh /bin/tool.sh; ls /bin | grep -c left-by || true")
        assert seen == "hello\n/bin/sh\n/bin/tool.sh\n0\n", (round_, seen)
        sh(env, cid, f"echo {round_} > /work/hello.txt; echo x > /bin/left-by-{round_}; rm /bin/tool.sh")
        gone(env, cid)
