"""A daemon + images pulled + one pod VM, shared by the container-level VM test modules,
and the small steps those modules repeat."""
import time

from cri_api.v1 import api_pb2 as pb

from tests.test_sandbox_vm import pod_config


def pod_env(daemon_factory, test_images, tmp_path_factory, name, images=("multi",),
            privileged=False, extra_config=""):
    """Generator for a module fixture: yields (daemon, sandbox id, pod config, test images).
    privileged: a privileged pod, so that privileged containers may run in it.
    extra_config: more lines of the daemon's config file."""
    d = daemon_factory('cni_conf_dir = ""\ninsecure_registries = ["%s"]\n%s'
                       % (test_images.registry, extra_config))
    for which in images:
        ref = getattr(test_images, which).ref
        d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    cfg = pod_config(name)
    cfg.linux.security_context.privileged = privileged
    cfg.log_directory = str(tmp_path_factory.mktemp(f"{name}-logs"))
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    yield d, sid, cfg, test_images
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))


def start_container(d, sid, sandbox_config, image: str, name: str,
                    command=("/bin/sh", "-c", "exec sleep 100000")) -> str:
    """Create and start a container in pod `sid`; returns its id."""
    cid = d.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=sandbox_config, config=pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image),
            command=list(command), log_path=f"{name}.log"))).container_id
    d.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    return cid


def wait_for(predicate, what: str, timeout: float = 120, every: float = 0.2):
    """predicate()'s first truthy value; AssertionError after `timeout` (a hang detector)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
