"""The vmcri daemon: wires config, state and services, and serves CRI on a unix socket."""
from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures

import grpc
import libvirt
from cri_api.v1 import api_pb2_grpc as pb_grpc

from vmcri.config import Config
from vmcri.cri import grpc_errors
from vmcri.events import EventBus
from vmcri.metrics import Metrics
from vmcri.network import conf_template
from vmcri.sandbox import accel, ksm
from vmcri.sandbox.virt import Hypervisor
from vmcri.store import Store

log = logging.getLogger("vmcri")


class Runtime:
    """Everything the servicers need, built once per daemon."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        for d in (cfg.root_dir, cfg.run_dir):
            os.makedirs(d, mode=0o711, exist_ok=True)
        self.store = Store(cfg.db_path)
        self.hv = Hypervisor(cfg.libvirt_uri, watch_events=True)
        self.accel = accel.choose(cfg.accel)
        self.pod_cidr = ""
        self.images = None
        self.network = None
        self._build_services()

    def _build_services(self) -> None:
        from vmcri.image.service import ImageService
        self.images = ImageService(self.cfg, self.store)
        from vmcri.network.service import NetworkService
        self.network = NetworkService(self.cfg)
        self.metrics = Metrics()
        self.events = EventBus()
        from vmcri.sandbox.service import SandboxService
        self.sandboxes = SandboxService(self.cfg, self.store, self.hv, self.accel,
                                        network=self.network, metrics=self.metrics)
        self.metrics.track_sandbox_states(self.sandboxes.table)
        from vmcri.sandbox.template import TemplateStore
        self.templates = self.sandboxes.templates = TemplateStore(self.sandboxes,
                                                                  self.cfg.vm_template)
        self.metrics.track_templates(self.templates.snapshot)
        from vmcri.sandbox.pool import WarmPool
        self.pool = self.sandboxes.pool = WarmPool(self.sandboxes, self.cfg.pool_size,
                                                   self.cfg.pool_max_concurrent_boots)
        self.metrics.track_pool(self.pool.snapshot)

        from vmcri.container.service import ContainerService
        self.containers = ContainerService(self.cfg, self.store, self.sandboxes, self.images,
                                           events=self.events, metrics=self.metrics)

        self.events.build_event = self._container_event
        from vmcri.container.imagevol import image_ids
        self.images.users_of = lambda image_id: [  # its own image and its image volumes'
            r.id for r in self.containers.table.all() if image_id in image_ids(r)]
        from vmcri.container.container_stream import RuntimeStreamingBackend
        from vmcri.streaming.server import StreamingServer
        self.streaming = StreamingServer(self.cfg, RuntimeStreamingBackend(self.containers,
                                                                            self.sandboxes))

    def _container_event(self, container_id: str, kind: str, created_ns: int):
        from cri_api.v1 import api_pb2 as pb

        from vmcri.sandbox.sandbox_status import to_status as sandbox_to_status
        rec = self.containers.table.get(container_id)
        if rec is None:
            return None
        sb = self.sandboxes.table.get(rec.sandbox_id)
        return pb.ContainerEventResponse(
            container_id=container_id,
            container_event_type=getattr(pb.ContainerEventType, f"CONTAINER_{kind}_EVENT"),
            created_at=created_ns,
            pod_sandbox_status=sandbox_to_status(self.sandboxes, sb) if sb else None,
            containers_statuses=self.container_statuses(rec.sandbox_id))

    def container_statuses(self, sandbox_id: str) -> list:
        from vmcri.container.container_status import statuses_in_sandbox
        return statuses_in_sandbox(self.containers, sandbox_id)

    def reconcile(self) -> None:
        try:
            self.sandboxes.reconcile()
            self.containers.resume()
        except libvirt.libvirtError as e:
            log.error("reconcile skipped: libvirt unreachable: %s", e)

    # -- Status ---------------------------------------------------------------
    def runtime_condition(self) -> tuple[bool, str, str]:
        try:
            version = self.hv.ping()
        except libvirt.libvirtError as e:
            return False, "LibvirtUnreachable", f"cannot reach libvirt at {self.cfg.libvirt_uri}: {e}"
        guest = os.path.join(self.cfg.guest_dir, "manifest.json")
        if not os.path.exists(guest):
            return (False, "GuestImageMissing",
                    f"no guest image at {self.cfg.guest_dir}; run `vmcri image build`")
        return True, "", f"libvirt {version}, accel {self.accel.name}"

    def network_condition(self) -> tuple[bool, str, str]:
        if not self.cfg.cni_conf_dir:
            return True, "", "pod networking disabled (cni_conf_dir is empty): pods get loopback only"
        return self.network.ready()

    def conditions(self):
        ok, reason, msg = self.runtime_condition()
        yield "RuntimeReady", ok, reason, msg
        ok, reason, msg = self.network_condition()
        yield "NetworkReady", ok, reason, msg

    def status_info(self) -> dict[str, str]:
        import json
        return {"config": json.dumps({
            "accel": self.accel.name, "accelReason": self.accel.reason,
            "libvirtUri": self.cfg.libvirt_uri, "rootDir": self.cfg.root_dir,
            "runDir": self.cfg.run_dir, "guestImageDir": self.cfg.guest_dir,
            "cniConfDir": self.cfg.cni_conf_dir, "cniBinDirs": self.cfg.cni_bin_dirs,
            "cniConfTemplate": self.cfg.cni_conf_template, "podCIDR": self.pod_cidr,
        }), "pool": json.dumps(self.pool.snapshot()),
            "vmTemplate": json.dumps(self.templates.snapshot()),
            "ksm": json.dumps({"configured": self.cfg.ksm, **ksm.status()})}

    def set_pod_cidr(self, pod_cidr: str) -> None:
        """The kubelet's node pod CIDR: rendered into a CNI config when a template is set;
        otherwise the CNI plugins own addressing, as in containerd."""
        conf_template.apply(self.cfg, pod_cidr)
        self.pod_cidr = pod_cidr

    def close(self) -> None:
        self.hv.close()  # no lifecycle handler may touch the store after this
        self.store.close()


# Server threads, and how many of them slow RPCs (admission.SLOW_RPCS) may never take:
# those stay free for Status, Version, List* and the *Status calls the kubelet polls.
MAX_WORKERS = 64
RESERVED_FOR_FAST_RPCS = 16


def build_server(runtime: Runtime, max_workers: int = MAX_WORKERS,
                 reserved_fast: int = RESERVED_FOR_FAST_RPCS) -> grpc.Server:
    """CRI v1 and v1alpha2 (same handlers) on one server."""
    from vmcri.cri import admission, v1alpha2
    from vmcri.cri.images import ImageServicer
    from vmcri.cri.runtime import RuntimeServicer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cri"),
                         options=[("grpc.max_receive_message_length", 16 * 1024 * 1024),
                                  ("grpc.max_send_message_length", 16 * 1024 * 1024)])
    runtime_servicer, image_servicer = RuntimeServicer(runtime), ImageServicer(runtime.images)
    runtime_servicer.slow_lane = image_servicer.slow_lane = admission.sized(max_workers,
                                                                            reserved_fast)
    runtime_servicer.stream_limit = threading.Semaphore(admission.MAX_STREAMS)
    pb_grpc.add_RuntimeServiceServicer_to_server(runtime_servicer, server)
    pb_grpc.add_ImageServiceServicer_to_server(image_servicer, server)
    v1alpha2.add_to_server(server, runtime_servicer, image_servicer)
    return server


def bind_unix(server: grpc.Server, path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # stale socket from a previous run
    old = os.umask(0o177)  # the socket is born 0600: only root may drive the runtime
    try:
        server.add_insecure_port(f"unix://{path}")
        server.start()
    finally:
        os.umask(old)
    os.chmod(path, 0o600)


def serve(cfg: Config) -> None:
    runtime = Runtime(cfg)
    runtime.reconcile()
    runtime.templates.prune()  # other guest images' or shapes' templates, half-written ones
    if cfg.ksm:
        ksm.start()
    if cfg.vm_template_build == "start":
        runtime.templates.ready()  # starts the build in the background
    runtime.pool.start()  # after reconcile: adopted VMs count towards the pool size
    grpc_errors.rpc_observers.append(runtime.metrics.observe_rpc)
    if cfg.metrics_port:
        runtime.metrics.serve(cfg.metrics_address, cfg.metrics_port)
        log.info("metrics on http://%s:%d/metrics", cfg.metrics_address, cfg.metrics_port)
    server = build_server(runtime)
    runtime.streaming.start()
    log.info("streaming server on %s", runtime.streaming.base_url)
    bind_unix(server, cfg.socket_path)
    log.info("vmcri serving CRI v1 and v1alpha2 on unix://%s (accel %s: %s)", cfg.socket_path,
             runtime.accel.name, runtime.accel.reason)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: shutting down (pods keep running)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    runtime.pool.stop()
    server.stop(grace=5).wait()
    runtime.streaming.stop()
    runtime.close()
    try:
        os.unlink(cfg.socket_path)
    except FileNotFoundError:
        pass
