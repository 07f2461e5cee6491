"""CRI config validation: each bad input is INVALID_ARGUMENT naming its field."""
import grpc
import pytest
from cri_api.v1 import api_pb2 as cri

from vmcri.container.validate import validate_container_config, validate_sandbox_config
from vmcri.errors import InvalidArgument


def good_container():
    c = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="app"),
                            image=cri.ImageSpec(image="busybox:1.36"), log_path="app/0.log",
                            command=["/bin/sh"], working_dir="/w")
    c.envs.append(cri.KeyValue(key="A", value="1"))
    c.mounts.append(cri.Mount(container_path="/data", host_path="/var/lib/x"))
    c.linux.resources.cpu_quota = -1
    c.linux.resources.cpuset_cpus = "0-1,3"
    c.linux.resources.hugepage_limits.append(cri.HugepageLimit(page_size="2MB", limit=1 << 21))
    return c


def good_sandbox():
    sb = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="p", namespace="ns", uid="u"),
                              log_directory="/var/log/pods/ns_p_u")
    sb.linux.sysctls["net.ipv4.ip_forward"] = "1"
    sb.linux.sysctls["kernel.shm_rmid_forced"] = "1"
    return sb


def test_good_configs_pass():
    validate_container_config(good_container())
    validate_sandbox_config(good_sandbox())


def _set(path, value):
    def apply(c):
        *parents, last = path.split(".")
        obj = c
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return apply


CONTAINER_CASES = [
    (_set("metadata.name", ""), r"config\.metadata\.name: is required"),
    (_set("metadata.name", "bad name!"), r"config\.metadata\.name: 'bad name!'"),
    (_set("metadata.name", "-x"), r"config\.metadata\.name"),
    (_set("image.image", ""), r"config\.image\.image: is required"),
    (_set("log_path", "/abs/0.log"), r"config\.log_path: must be relative"),
    (_set("log_path", "app/../../etc/passwd"), r"config\.log_path: must not contain '\.\.'"),
    (_set("working_dir", "rel"), r"config\.working_dir: must be an absolute path"),
    (lambda c: c.mounts.append(cri.Mount(container_path="rel", host_path="/h")),
     r"config\.mounts\[1\]\.container_path: must be an absolute path"),
    (lambda c: c.mounts.append(cri.Mount(container_path="/x")),
     r"config\.mounts\[1\]\.host_path: is required"),
    (lambda c: c.mounts.append(cri.Mount(container_path="/", host_path="/h")),
     r"config\.mounts\[1\]\.container_path: cannot mount over"),
    (lambda c: c.mounts.append(cri.Mount(container_path="/x", host_path="/h",
                                         recursive_read_only=True)),
     r"config\.mounts\[1\]\.recursive_read_only"),
    (lambda c: c.mounts.append(cri.Mount(container_path="/x",
                                         image=cri.ImageSpec(image="data:1"))),
     r"config\.mounts\[1\]\.readonly: must be true for an image volume"),
    (lambda c: c.mounts.append(cri.Mount(container_path="/x", host_path="/h", readonly=True,
                                         image=cri.ImageSpec(image="data:1"))),
     r"config\.mounts\[1\]\.host_path: must be empty for an image volume"),
    (lambda c: c.mounts.append(cri.Mount(container_path="/x", readonly=True,
                                         image=cri.ImageSpec(image="data:1"),
                                         image_sub_path="a/../../etc")),
     r"config\.mounts\[1\]\.image_sub_path: 'a/\.\./\.\./etc' escapes the image"),
    (lambda c: c.mounts.append(cri.Mount(container_path="/x", readonly=True,
                                         image=cri.ImageSpec(image="data:1"),
                                         image_sub_path="/etc")),
     r"config\.mounts\[1\]\.image_sub_path: '/etc' must be relative"),
    (lambda c: c.mounts.append(cri.Mount(container_path="/x", host_path="/h",
                                         image_sub_path="etc")),
     r"config\.mounts\[1\]\.image_sub_path: is only for image volume"),
    (lambda c: c.mounts.append(cri.Mount(container_path="/x", host_path="/h", readonly=True,
                                         recursive_read_only=True,
                                         propagation=cri.PROPAGATION_HOST_TO_CONTAINER)),
     r"config\.mounts\[1\]\.propagation: a recursive read-only mount must have private"),
    (lambda c: c.mounts.append(cri.Mount(container_path="/x", host_path="/h", readonly=True,
                                         recursive_read_only=True,
                                         propagation=cri.PROPAGATION_BIDIRECTIONAL)),
     r"config\.mounts\[1\]\.propagation: a recursive read-only mount must have private"),
    (lambda c: c.envs.append(cri.KeyValue(key="", value="x")), r"config\.envs\[1\]\.key: must not be empty"),
    (lambda c: c.envs.append(cri.KeyValue(key="A=B", value="x")), r"config\.envs\[1\]\.key"),
    (lambda c: c.envs.append(cri.KeyValue(key="K", value="a\x00b")), r"config\.envs\[1\]\.value: .*NUL"),
    (lambda c: c.args.append("x\x00"), r"config\.args\[0\]: must not contain NUL"),
    (lambda c: c.devices.append(cri.Device(container_path="/dev/kvm", host_path="/dev/kvm")),
     r"config\.devices\[0\]: a VM sandbox cannot pass host devices"),
    (lambda c: c.CDI_devices.append(cri.CDIDevice(name="vendor.com/gpu=0")),
     r"config\.CDI_devices\[0\]: a VM sandbox cannot pass host devices"),
    (_set("linux.security_context.namespace_options.network", cri.NODE),
     r"namespace_options\.network: a VM sandbox cannot share host namespaces"),
    (lambda c: (c.linux.security_context.run_as_user.SetInParent(),
                setattr(c.linux.security_context, "run_as_username", "bob")),
     r"run_as_username: must not be set together with run_as_user"),
    (lambda c: c.linux.security_context.masked_paths.append("proc/x"),
     r"security_context\.masked_paths\[0\]: must be an absolute path"),
    (_set("linux.resources.oom_score_adj", 1001), r"resources\.oom_score_adj"),
    (_set("linux.resources.memory_limit_in_bytes", -5), r"resources\.memory_limit_in_bytes"),
    (_set("linux.resources.cpu_quota", -2), r"resources\.cpu_quota"),
    (_set("linux.resources.cpuset_cpus", "0-a"), r"resources\.cpuset_cpus: '0-a'"),
    (lambda c: c.linux.resources.hugepage_limits.append(cri.HugepageLimit(page_size="2M")),
     r"resources\.hugepage_limits\[1\]\.page_size: '2M'"),
    (lambda c: c.linux.resources.unified.update({"../escape": "1"}), r"resources\.unified"),
]


@pytest.mark.parametrize("mutate,message", CONTAINER_CASES)
def test_bad_container_config_names_the_field(mutate, message):
    c = good_container()
    mutate(c)
    with pytest.raises(InvalidArgument, match=message) as err:
        validate_container_config(c)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("kind", ["network", "pid", "ipc"])
def test_host_namespace_pods_are_rejected_with_an_explanation(kind):
    sb = good_sandbox()
    setattr(sb.linux.security_context.namespace_options, kind, cri.NODE)
    with pytest.raises(InvalidArgument) as err:
        validate_sandbox_config(sb)
    msg = str(err.value)
    assert f"config.linux.security_context.namespace_options.{kind}" in msg
    assert "its own virtual machine" in msg and "hostNetwork" in msg


@pytest.mark.parametrize("mutate,message", [
    (_set("metadata.name", ""), r"config\.metadata\.name: is required"),
    (_set("metadata.uid", ""), r"config\.metadata\.uid: is required"),
    (_set("log_directory", "relative"), r"config\.log_directory: must be an absolute path"),
    (lambda sb: sb.linux.sysctls.update({"net/../x": "1"}), r"config\.linux\.sysctls\['net/\.\./x'\]"),
])
def test_bad_sandbox_config_names_the_field(mutate, message):
    sb = good_sandbox()
    mutate(sb)
    with pytest.raises(InvalidArgument, match=message):
        validate_sandbox_config(sb)


def test_bidirectional_propagation_is_refused_for_pod_vms_only():
    from vmcri.container.validate import validate_vm_mounts
    mounts = [cri.Mount(container_path="/a", host_path="/tmp"),
              cri.Mount(container_path="/b", host_path="/tmp", propagation=cri.PROPAGATION_BIDIRECTIONAL)]
    validate_container_config(cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"),
                                                  image=cri.ImageSpec(image="i"), mounts=mounts))
    with pytest.raises(InvalidArgument, match=r"config\.mounts\[1\]\.propagation: Bidirectional"):
        validate_vm_mounts(mounts)
    validate_vm_mounts(mounts[:1])
