"""Volumes and identity in a real pod VM, the way critest checks them: image volumes
(read-only, image_sub_path, in use while mounted), read-only vs recursive read-only
hostPaths with a submount (critest's RRO fixture: a tmpfs inside the hostPath), and
SupplementalGroupsPolicy Merge vs Strict as `id -G` and ContainerStatus.user show it."""
import os

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb

from tests.support import fx_registry as fx
from tests.support.pods import pod_env, wait_for
from tests.test_container_vm import create_start, ctr_config, exec_sync, log_entries, status
from vmcri.sandbox import hostfs

pytestmark = [pytest.mark.vm, pytest.mark.registry]
GROUP = b"root:x:0:\nvmcri:x:1000:\ngroup-defined-in-image:x:50000:vmcri\n"


@pytest.fixture(scope="module")
def groups_image(test_images):
    """critest's test-image-predefined-group: user 1000, a member of 50000 in /etc/group."""
    layer = fx.build_layer([("file", "etc/group", GROUP)])
    desc = fx.write_oci_image(test_images.layout, [test_images.base_layer, layer],
                              {**fx.BASE_CONFIG, "User": "1000"})
    fx.set_layout_index(test_images.layout, "groups", [desc])
    ref = f"{test_images.registry}/vmcri-test/busybox-groups:1.0"
    fx.push_layout(test_images.layout, "groups", ref)
    return ref


@pytest.fixture(scope="module")
def env(daemon_factory, test_images, tmp_path_factory, groups_image):
    gen = pod_env(daemon_factory, test_images, tmp_path_factory, "mounts",
                  images=("single", "multi"))
    d, sid, cfg, imgs = next(gen)
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=groups_image)))
    yield d, sid, cfg, imgs
    next(gen, None)


def create(env, name, mounts=()):
    """A root sleeper (root: write checks are about the mount, not the file's owner)."""
    config = ctr_config(name, env[3].single.ref, command=["sleep", "100000"])
    config.linux.security_context.run_as_user.value = 0
    config.mounts.extend(mounts)
    return create_start(env, config)


def sh(env, cid, script):
    r = exec_sync(env, cid, ["/bin/sh", "-c", script])
    return r.exit_code, (r.stdout + r.stderr).decode()


def remove(env, cid):
    env[0].runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def image_mount(env, path, sub=""):
    return pb.Mount(container_path=path, image=pb.ImageSpec(image=env[3].multi.ref),
                    readonly=True, image_sub_path=sub)


def test_image_volume_is_readable_read_only_and_in_use(env):
    d, _, _, imgs = env
    cid = create(env, "imgvol", [image_mount(env, "/vol"), image_mount(env, "/opq", "opq")])
    assert sh(env, cid, "cat /vol/data/keep /vol/work/hello.txt") == (0, "keep\nhello\n")
    code, out = sh(env, cid, "touch /vol/new")
    assert code != 0 and "Read-only file system" in out, out
    # the sub path is the image's merged opq/: the opaque layer left only "new"
    assert sh(env, cid, "ls /opq") == (0, "new\n")
    mounts = status(env, cid).mounts
    assert [(m.container_path, m.image.image, m.image.user_specified_image, m.image_sub_path,
             m.readonly) for m in mounts] == [
        ("/vol", imgs.multi.image_id, imgs.multi.ref, "", True),
        ("/opq", imgs.multi.image_id, imgs.multi.ref, "opq", True)]
    with pytest.raises(grpc.RpcError) as e:  # in use by the image volume, not the rootfs
        d.image.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=imgs.multi.ref)))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    assert cid[:12] in e.value.details()
    remove(env, cid)
    d.image.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=imgs.multi.ref)))
    d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=imgs.multi.ref)))


@pytest.mark.parametrize("mount,code,needle", [
    (lambda env: image_mount(env, "/v", "../../etc"), grpc.StatusCode.INVALID_ARGUMENT,
     "config.mounts[0].image_sub_path: '../../etc' escapes the image"),
    (lambda env: image_mount(env, "/v", "data/abs-link"), grpc.StatusCode.INVALID_ARGUMENT,
     "config.mounts[0].image_sub_path: 'data/abs-link' is not a directory"),
    (lambda env: image_mount(env, "/v", "no/such"), grpc.StatusCode.INVALID_ARGUMENT,
     "config.mounts[0].image_sub_path: 'no/such' does not exist in the image"),
    (lambda env: pb.Mount(container_path="/v", readonly=True,
                          image=pb.ImageSpec(image=f"{env[3].registry}/vmcri-test/never:1")),
     grpc.StatusCode.NOT_FOUND, "ImageVolumeMountFailed: failed to resolve image"),
])
def test_bad_image_volumes_are_refused(env, mount, code, needle):
    d, sid, cfg, imgs = env
    before = len(d.runtime.ListContainers(pb.ListContainersRequest()).containers)
    config = ctr_config("badvol", imgs.single.ref, command=["true"])
    config.mounts.append(mount(env))
    with pytest.raises(grpc.RpcError) as e:
        d.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, config=config, sandbox_config=cfg))
    assert e.value.code() == code and needle in e.value.details(), e.value.details()
    assert len(d.runtime.ListContainers(pb.ListContainersRequest()).containers) == before


@pytest.fixture
def rro_host_path(tmp_path):
    """critest's createHostPathForRROMount: a dir with a tmpfs mounted on tmpfs/."""
    path = tmp_path / "rro"
    (path / "tmpfs").mkdir(parents=True)
    (path / "sub").mkdir()
    hostfs._mount("none", str(path / "tmpfs"), "tmpfs", 0, "size=1m")
    yield str(path)
    hostfs.unmount_tree(str(path))


def test_status_advertises_recursive_read_only_and_groups_policy(env):
    st = env[0].runtime.Status(pb.StatusRequest())
    by_name = {h.name: h.features.recursive_read_only_mounts for h in st.runtime_handlers}
    assert all(by_name.values()), by_name
    assert st.features.supplemental_groups_policy


def test_read_only_keeps_submounts_writable_and_rro_does_not(env, rro_host_path, tmp_path):
    rw_dir = tmp_path / "rw"
    rw_dir.mkdir()
    ro = create(env, "ro", [
        pb.Mount(container_path="/mnt", host_path=rro_host_path, readonly=True),
        pb.Mount(container_path="/mnt/sub", host_path=str(rw_dir))])  # a writable volume in it
    assert sh(env, ro, "touch /mnt/tmpfs/file && touch /mnt/sub/file") == (0, "")
    code, out = sh(env, ro, "touch /mnt/top")
    assert code != 0 and "Read-only file system" in out, out
    assert os.path.exists(os.path.join(rro_host_path, "tmpfs", "file"))
    assert (rw_dir / "file").exists()
    rro = create(env, "rro", [pb.Mount(container_path="/mnt", host_path=rro_host_path,
                                       readonly=True, recursive_read_only=True)])
    # critest: touch /mnt/tmpfs/foo 2>&1 | grep -q "Read-only file system"
    code, out = sh(env, rro, "touch /mnt/tmpfs/foo")
    assert code != 0 and "Read-only file system" in out, out
    assert len(status(env, rro).mounts) == 1
    for cid in (ro, rro):
        remove(env, cid)


def test_bidirectional_propagation_is_refused_in_a_pod_vm(env, tmp_path):
    """Guest mounts cannot reach the host: Bidirectional is refused naming the field (a
    host sandbox runs it on the host, where it works); HostToContainer is accepted."""
    d, sid, cfg, imgs = env
    config = ctr_config("bidi", imgs.single.ref, command=["true"])
    config.mounts.append(pb.Mount(container_path="/mnt", host_path=str(tmp_path),
                                  propagation=pb.PROPAGATION_BIDIRECTIONAL))
    with pytest.raises(grpc.RpcError) as e:
        d.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, config=config, sandbox_config=cfg))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.mounts[0].propagation" in e.value.details() and "host sandbox" in e.value.details()
    cid = create(env, "h2c", [pb.Mount(container_path="/mnt", host_path=str(tmp_path),
                                       propagation=pb.PROPAGATION_HOST_TO_CONTAINER)])
    remove(env, cid)


@pytest.mark.parametrize("prop", [pb.PROPAGATION_HOST_TO_CONTAINER, pb.PROPAGATION_BIDIRECTIONAL])
def test_rro_needs_private_propagation(env, rro_host_path, prop):
    d, sid, cfg, imgs = env
    config = ctr_config("rro-prop", imgs.single.ref, command=["true"])
    config.mounts.append(pb.Mount(container_path="/mnt", host_path=rro_host_path, readonly=True,
                                  recursive_read_only=True, propagation=prop))
    with pytest.raises(grpc.RpcError) as e:
        d.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, config=config, sandbox_config=cfg))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.mounts[0].propagation" in e.value.details()


@pytest.mark.parametrize("policy,groups", [(pb.Merge, [1000, 1234, 50000]),
                                           (pb.Strict, [1000, 1234])])
def test_supplemental_groups_policy(env, groups_image, policy, groups):
    sec = pb.LinuxContainerSecurityContext(run_as_user=pb.Int64Value(value=1000),
                                           supplemental_groups=[1234],
                                           supplemental_groups_policy=policy)
    name = f"groups-{pb.SupplementalGroupsPolicy.Name(policy).lower()}"
    config = ctr_config(name, groups_image, command=["/bin/sh", "-c", "id -G; exec sleep 100000"],
                        linux=pb.LinuxContainerConfig(security_context=sec))
    cid = create_start(env, config)
    expected = " ".join(map(str, groups))
    log = os.path.join(env[2].log_directory, f"{name}.log")
    first = wait_for(lambda: os.path.exists(log) and log_entries(log), "the first line")
    assert first[0][2] == expected, first  # the container's first process
    assert sh(env, cid, "id -G") == (0, expected + "\n")  # an exec'd one
    user = status(env, cid).user.linux
    assert (user.uid, user.gid, sorted(user.supplemental_groups)) == (1000, 1000, groups)
    remove(env, cid)
