"""A daemon + images pulled + one pod VM, shared by the container-level VM test modules."""
from cri_api.v1 import api_pb2 as pb

from tests.test_sandbox_vm import pod_config


def pod_env(daemon_factory, test_images, tmp_path_factory, name, images=("multi",)):
    """Generator for a module fixture: yields (daemon, sandbox id, pod config, test images)."""
    d = daemon_factory('cni_conf_dir = ""\ninsecure_registries = ["%s"]' % test_images.registry)
    for which in images:
        ref = getattr(test_images, which).ref
        d.image.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    cfg = pod_config(name)
    cfg.log_directory = str(tmp_path_factory.mktemp(f"{name}-logs"))
    sid = d.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    yield d, sid, cfg, test_images
    d.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    d.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
