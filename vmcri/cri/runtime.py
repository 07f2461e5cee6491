"""RuntimeService servicer: proto <-> service calls only."""
from __future__ import annotations

from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

import queue
import time

import grpc

import vmcri
from vmcri import stats
from vmcri.container import container_stats, container_status
from vmcri.sandbox import sandbox_status
from vmcri.hostpod.pods import HANDLER as HOST_HANDLER
from vmcri.sandbox.sandbox_run import handlers
from vmcri.cri.grpc_errors import stream, wrap_all

PENDING = {
    # RPC -> why it is not there yet; each answers UNIMPLEMENTED with this text.
    "CheckpointContainer": "checkpointing a container inside a pod VM is not supported",
}


class RuntimeServicer(pb_grpc.RuntimeServiceServicer):
    def __init__(self, runtime):
        self.rt = runtime

    def Version(self, request, context):
        return pb.VersionResponse(version="0.1.0", runtime_name="vmcri",
                                  runtime_version=vmcri.__version__, runtime_api_version="v1")

    def Status(self, request, context):
        conditions = [pb.RuntimeCondition(type=t, status=ok, reason=reason, message=msg)
                      for t, ok, reason, msg in self.rt.conditions()]
        info = dict(self.rt.status_info()) if request.verbose else {}
        # Recursive read-only mounts, every handler: a VM pod's host clones the hostPath's
        # mount tree read-only before the guest sees it and crun in the guest adds "rro";
        # a host sandbox's crun (the same 1.8.1) does "rro" itself (test_ocispec_crun).
        # User namespaces: neither kind (a host sandbox shares the host's user ns).
        served = handlers(self.rt.cfg)
        rro = {name: True for name in served}
        out = [pb.RuntimeHandler(name=name, features=pb.RuntimeHandlerFeatures(
            recursive_read_only_mounts=rro[name])) for name in served]
        if request.verbose:
            import json
            info["handlers"] = json.dumps([
                {"name": name, "sandbox": "host" if name == HOST_HANDLER else "vm",
                 "recursiveReadOnlyMounts": rro[name], "userNamespaces": False}
                for name in served])
        # SupplementalGroupsPolicy: Strict leaves out the image's /etc/group groups
        # (ocispec_process.resolve_user); ContainerStatus reports the effective user.
        return pb.StatusResponse(status=pb.RuntimeStatus(conditions=conditions), info=info,
                                 runtime_handlers=out,
                                 features=pb.RuntimeFeatures(supplemental_groups_policy=True))

    def RuntimeConfig(self, request, context):
        driver = (pb.CgroupDriver.SYSTEMD if self.rt.cfg.cgroup_driver == "systemd"
                  else pb.CgroupDriver.CGROUPFS)
        return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=driver))

    # -- pod sandboxes -----------------------------------------------------------
    def RunPodSandbox(self, request, context):
        sandbox_id = self.rt.sandboxes.run(request.config, request.runtime_handler)
        return pb.RunPodSandboxResponse(pod_sandbox_id=sandbox_id)

    def StopPodSandbox(self, request, context):
        self.rt.sandboxes.stop(request.pod_sandbox_id)
        return pb.StopPodSandboxResponse()

    def RemovePodSandbox(self, request, context):
        self.rt.sandboxes.remove(request.pod_sandbox_id)
        return pb.RemovePodSandboxResponse()

    def PodSandboxStatus(self, request, context):
        status, info = sandbox_status.status(self.rt.sandboxes, request.pod_sandbox_id,
                                             request.verbose)
        containers = self.rt.container_statuses(status.id)
        return pb.PodSandboxStatusResponse(status=status, info=info,
                                           containers_statuses=containers,
                                           timestamp=time.time_ns())

    def UpdatePodSandboxResources(self, request, context):
        self.rt.sandboxes.update_resources(
            request.pod_sandbox_id,
            request.overhead if request.HasField("overhead") else None,
            request.resources if request.HasField("resources") else None)
        return pb.UpdatePodSandboxResourcesResponse()

    def ListPodSandbox(self, request, context):
        flt = request.filter if request.HasField("filter") else None
        return pb.ListPodSandboxResponse(items=sandbox_status.list_sandboxes(self.rt.sandboxes, flt))

    # -- containers --------------------------------------------------------------
    def CreateContainer(self, request, context):
        cid = self.rt.containers.create(request.pod_sandbox_id, request.config,
                                        request.sandbox_config)
        return pb.CreateContainerResponse(container_id=cid)

    def StartContainer(self, request, context):
        self.rt.containers.start(request.container_id)
        return pb.StartContainerResponse()

    def StopContainer(self, request, context):
        from vmcri.container.container_stop import call_deadline
        self.rt.containers.stop(request.container_id, request.timeout, call_deadline(context))
        return pb.StopContainerResponse()

    def RemoveContainer(self, request, context):
        self.rt.containers.remove(request.container_id)
        return pb.RemoveContainerResponse()

    def ContainerStatus(self, request, context):
        status, info = container_status.status(self.rt.containers, request.container_id,
                                                request.verbose)
        return pb.ContainerStatusResponse(status=status, info=info)

    def ListContainers(self, request, context):
        flt = request.filter if request.HasField("filter") else None
        return pb.ListContainersResponse(
            containers=container_status.list_containers(self.rt.containers, flt))

    def ExecSync(self, request, context):
        code, out, err = self.rt.containers.exec_sync(request.container_id, list(request.cmd),
                                                      request.timeout)
        return pb.ExecSyncResponse(stdout=out, stderr=err, exit_code=code)

    def UpdateContainerResources(self, request, context):
        self.rt.containers.update_resources(request.container_id, request.linux)
        return pb.UpdateContainerResourcesResponse()

    def ReopenContainerLog(self, request, context):
        self.rt.containers.reopen_log(request.container_id)
        return pb.ReopenContainerLogResponse()

    # -- streaming (URLs on the streaming server) ----------------------------------
    def Exec(self, request, context):
        return self.rt.streaming.get_exec(request)

    def Attach(self, request, context):
        return self.rt.streaming.get_attach(request)

    def PortForward(self, request, context):
        return self.rt.streaming.get_port_forward(request)

    # -- stats and metrics ---------------------------------------------------------
    def ContainerStats(self, request, context):
        return pb.ContainerStatsResponse(
            stats=container_stats.container_stats(self.rt.containers, request.container_id))

    def ListContainerStats(self, request, context):
        flt = request.filter if request.HasField("filter") else None
        return pb.ListContainerStatsResponse(
            stats=container_stats.list_container_stats(self.rt.containers, flt))

    def PodSandboxStats(self, request, context):
        return pb.PodSandboxStatsResponse(
            stats=container_stats.pod_sandbox_stats(self.rt.containers, request.pod_sandbox_id))

    def ListPodSandboxStats(self, request, context):
        flt = request.filter if request.HasField("filter") else None
        return pb.ListPodSandboxStatsResponse(
            stats=container_stats.list_pod_sandbox_stats(self.rt.containers, flt))

    def ListMetricDescriptors(self, request, context):
        return pb.ListMetricDescriptorsResponse(descriptors=stats.metric_descriptors())

    def ListPodSandboxMetrics(self, request, context):
        return pb.ListPodSandboxMetricsResponse(pod_metrics=[
            stats.pod_metrics(s) for s in container_stats.list_pod_sandbox_stats(self.rt.containers, None)])

    @stream
    def GetContainerEvents(self, request, context):
        q = self.rt.events.subscribe()
        context.add_callback(lambda: self.rt.events.unsubscribe(q))
        try:
            while context.is_active():
                try:
                    msg = q.get(timeout=1.0)
                except queue.Empty:
                    continue
                if msg is None:  # dropped for falling behind
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  "container event subscriber fell behind; resubscribe")
                yield msg
        finally:
            self.rt.events.unsubscribe(q)

    def UpdateRuntimeConfig(self, request, context):
        self.rt.set_pod_cidr(request.runtime_config.network_config.pod_cidr)
        return pb.UpdateRuntimeConfigResponse()


wrap_all(RuntimeServicer, pb_grpc.RuntimeServiceServicer, PENDING)
