"""UpdateContainerResources: `crun update` of the container's cgroup inside the guest.

The kubelet calls this routinely (CPU manager, in-place resize), so every field we can
express is applied and none makes it fail."""
from __future__ import annotations

from cri_api.v1 import api_pb2 as pb

from vmcri.container import ocispec
from vmcri.container.model import CREATED, RUNNING
from vmcri.container.validate import _validate_resources
from vmcri.errors import FailedPrecondition, Unavailable


def update_resources(svc, container_id: str, linux: pb.LinuxContainerResources) -> None:
    rec = svc.get(container_id)
    if rec.state not in (CREATED, RUNNING):
        raise FailedPrecondition(f"container {rec.id[:12]} is {rec.state}: nothing to update")
    _validate_resources(linux)
    config = pb.ContainerConfig.FromString(rec.config)
    resources = ocispec.build_resources(linux, config.linux.security_context.privileged)
    resources.pop("devices", None)  # device rules are fixed at create
    from vmcri.channel import AgentError
    try:
        svc.agent_for(rec).call("container_update", id=rec.id, resources=resources)
    except AgentError as e:
        raise Unavailable(f"crun update in the pod VM failed: {e}") from e
    # ContainerStatus reports the resources now in force
    config.linux.resources.CopyFrom(linux)
    svc.table.update(rec.id, config=config.SerializeToString())
