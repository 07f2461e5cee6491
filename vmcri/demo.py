"""`vmcri demo`: the isolation demo, driven purely through CRI like the kubelet would.

It pulls a small image, starts two pods (two VMs) with one container each, and compares what
a container sees (kernel, PID 1, processes, memory, CPUs) with what the host sees, and what a
container in the second pod can see of the first. A third pod, a host sandbox (runtime
handler "host", docs/host-sandboxes.md), runs the same container on the host, in namespaces:
it shares the host's kernel, which is what the VM pods do not. Each claim is checked, not just printed;
see `Check`. Everything it made is removed at the end unless `keep` is set.
"""
from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field

import grpc
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

NAMESPACE = "vmcri-demo"
LABEL = "app"
SECRET_FILE = "/tmp/vmcri-demo-secret"
HOST_HANDLER = "host"  # the runtime handler that asks for a host sandbox
POD_INIT_NAME = "vmcri-pod-init"  # the comm of the process holding a pod's PID namespace
EXEC_TIMEOUT_S = 60
START_TIMEOUT_S = 120
CALL_TIMEOUT_S = 120          # any CRI call; a pull or a VM boot gets SLOW_CALL_TIMEOUT_S
SLOW_CALL_TIMEOUT_S = 900
# One ExecSync gathers the container's view as key=value lines.
PROBE = ("echo kernel=$(uname -r); echo boot_id=$(cat /proc/sys/kernel/random/boot_id); "
         "echo pid1=$(cat /proc/1/comm); "
         "echo mem_kib=$(awk '/^MemTotal:/{print $2}' /proc/meminfo); echo cpus=$(nproc); "
         "echo cpu_model=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo); "
         "echo uptime_s=$(cut -d' ' -f1 /proc/uptime); echo hostname=$(hostname); "
         "echo nprocs=$(ls -d /proc/[0-9]* | wc -l)")


class DemoError(RuntimeError):
    """A demo step failed; the message names the step."""


@dataclass
class View:
    """What one observer (a container, or the host) sees."""
    kernel: str
    boot_id: str
    pid1: str
    mem_mib: int
    cpus: int
    cpu_model: str
    uptime_s: float
    hostname: str
    nprocs: int
    processes: list[str] = field(default_factory=list)


@dataclass
class PodRun:
    name: str
    kind: str = "vm"          # "vm", or "host": a host sandbox (namespaces on the host's kernel)
    sandbox_id: str = ""
    container_id: str = ""
    domain: str = ""
    qemu_pid: int = 0
    accel: str = ""
    vm_vcpus: int = 0
    vm_memory_mib: int = 0
    run_pod_s: float = 0.0
    container_start_s: float = 0.0
    phases: dict = field(default_factory=dict)
    ip: str = ""              # from CNI; empty when pod networking is off
    marker: str = ""          # the container's `sleep` argument, unique per run
    log_line: str = ""        # first line of its CRI log file
    view: View | None = None
    dominfo: str = ""


@dataclass
class Check:
    claim: str
    passed: bool
    evidence: str


@dataclass
class Report:
    runtime: str
    image: str
    host: View
    pods: list[PodRun]
    checks: list[Check]
    host_sees_qemu: list[str]
    registry: str = ""        # host:port of the throwaway registry, if the demo started one
    cleaned_up: bool = False

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"ok": self.ok}, indent=2)


def parse_probe(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def view_from_probe(text: str, processes: list[str]) -> View:
    kv = parse_probe(text)

    def num(key, kind=int):
        try:
            return kind(kv.get(key, ""))
        except ValueError:
            return kind(0)
    return View(kernel=kv.get("kernel", "?"), boot_id=kv.get("boot_id", "?"),
                pid1=kv.get("pid1", "?"), mem_mib=num("mem_kib") >> 10, cpus=num("cpus"),
                cpu_model=kv.get("cpu_model", "?"), uptime_s=num("uptime_s", float),
                hostname=kv.get("hostname", "?"), nprocs=num("nprocs"), processes=processes)


def _read(path: str, default: str = "?") -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return default


def host_cmdlines() -> dict[int, str]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            cmd = _read(f"/proc/{entry}/cmdline", "").replace("\0", " ").strip()
            if cmd:
                out[int(entry)] = cmd
    return out


def host_view() -> View:
    model = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                  if line.startswith("model name")), "?")
    return View(kernel=platform.release(), boot_id=_read("/proc/sys/kernel/random/boot_id").strip(),
                pid1=_read("/proc/1/cmdline").replace("\0", " ").strip(),
                mem_mib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20,
                cpus=os.cpu_count() or 0, cpu_model=model,
                uptime_s=float(_read("/proc/uptime", "0").split()[0]),
                hostname=platform.node(), nprocs=len(host_cmdlines()))


def pod_config(name: str, run_id: str, log_dir: str) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace=NAMESPACE, uid=f"{name}-{run_id}"),
        hostname=name, log_directory=log_dir, labels={LABEL: NAMESPACE, "run": run_id},
        dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=["vmcri-demo.svc.cluster.local"]))


class Demo:
    """One demo run. `run()` does everything; `cleanup()` is safe to call at any point."""

    def __init__(self, cfg, socket: str, image: str | None = None, log=print):
        self.cfg, self.socket, self.image, self.log = cfg, socket, image, log
        self.run_id = secrets.token_hex(4)
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.rt = pb_grpc.RuntimeServiceStub(self.channel)
        self.img = pb_grpc.ImageServiceStub(self.channel)
        self.registry = None
        self.pulled_by_us = False
        self.log_dir = tempfile.mkdtemp(prefix="vmcri-demo-logs-")
        os.chmod(self.log_dir, 0o755)
        self.pods: list[PodRun] = []

    # -- steps -------------------------------------------------------------------
    def _step(self, what: str, fn, request, timeout: float = CALL_TIMEOUT_S):
        try:
            return fn(request, timeout=timeout)
        except grpc.RpcError as e:
            raise DemoError(f"{what}: {e.code().name}: {e.details()}") from None

    def connect(self) -> str:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=10)
        except grpc.FutureTimeoutError:
            raise DemoError(f"no CRI server answers on {self.socket}; is `vmcri serve` running?") from None
        v = self._step("Version", self.rt.Version, pb.VersionRequest())
        runtime = f"{v.runtime_name} {v.runtime_version} (CRI {v.runtime_api_version})"
        self.log(f"runtime: {runtime}")
        for c in self._step("Status", self.rt.Status, pb.StatusRequest()).status.conditions:
            self.log(f"  {c.type}: {c.status} {c.reason} {c.message}".rstrip())
        return runtime

    def pull(self) -> str:
        if not self.image:
            from vmcri import demo_image
            try:
                self.registry, self.image = demo_image.serve_busybox(self.cfg, self.log)
            except (demo_image.DemoImageError, OSError, subprocess.CalledProcessError) as e:
                raise DemoError(f"building the demo image: {e}") from None
            self.pulled_by_us = True
        self.log(f"ImageService.PullImage {self.image}")
        ref = self._step(f"PullImage {self.image}", self.img.PullImage,
                         pb.PullImageRequest(image=pb.ImageSpec(image=self.image)),
                         timeout=SLOW_CALL_TIMEOUT_S).image_ref
        return ref

    def start_pod(self, name: str, kind: str = "vm") -> PodRun:
        pod = PodRun(name=name, kind=kind, marker=str(100000 + secrets.randbelow(900000)))
        self.pods.append(pod)
        pcfg = pod_config(name, self.run_id, self.log_dir)
        handler = HOST_HANDLER if kind == "host" else ""
        self.log(f"RuntimeService.RunPodSandbox {name} " +
                 ("(runtime handler \"host\": namespaces on the host)" if handler else "(boots a VM)"))
        t0 = time.monotonic()
        pod.sandbox_id = self._step(f"RunPodSandbox {name}", self.rt.RunPodSandbox,
                                    pb.RunPodSandboxRequest(config=pcfg, runtime_handler=handler),
                                    timeout=SLOW_CALL_TIMEOUT_S).pod_sandbox_id
        pod.run_pod_s = time.monotonic() - t0
        st = self._step(f"PodSandboxStatus {name}", self.rt.PodSandboxStatus,
                        pb.PodSandboxStatusRequest(pod_sandbox_id=pod.sandbox_id, verbose=True))
        info = json.loads(st.info.get("info", "{}"))
        pod.ip = st.status.network.ip
        pod.kind = info.get("kind", kind)
        vm = info.get("vm", {})
        pod.domain, pod.qemu_pid = vm.get("domain", ""), int(vm.get("qemuPid") or 0)
        pod.accel, pod.vm_vcpus = str(vm.get("accel", "")), int(vm.get("vcpus") or 0)
        pod.vm_memory_mib, pod.phases = int(vm.get("memoryMiB") or 0), info.get("timings", {})
        script = f'echo "hello from {name}, kernel $(uname -r)"; exec sleep {pod.marker}'
        ccfg = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="shell"), image=pb.ImageSpec(image=self.image),
            command=["/bin/sh", "-c", script], log_path=f"{name}-shell.log")
        where = "crun on the host, under conmon" if pod.kind == "host" else "crun inside the guest"
        self.log(f"RuntimeService.CreateContainer + StartContainer in {name} ({where})")
        t0 = time.monotonic()
        pod.container_id = self._step(f"CreateContainer in {name}", self.rt.CreateContainer,
                                      pb.CreateContainerRequest(pod_sandbox_id=pod.sandbox_id,
                                                                config=ccfg, sandbox_config=pcfg)).container_id
        self._step(f"StartContainer in {name}", self.rt.StartContainer,
                   pb.StartContainerRequest(container_id=pod.container_id))
        self._wait_running(pod)
        pod.container_start_s = time.monotonic() - t0
        pod.log_line = self._first_log_line(os.path.join(self.log_dir, f"{name}-shell.log"))
        return pod

    def _wait_running(self, pod: PodRun) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            st = self._step("ContainerStatus", self.rt.ContainerStatus,
                            pb.ContainerStatusRequest(container_id=pod.container_id)).status
            if st.state == pb.ContainerState.CONTAINER_RUNNING:
                return
            if st.state == pb.ContainerState.CONTAINER_EXITED or time.monotonic() > deadline:
                raise DemoError(f"container in {pod.name} is not running: state "
                                f"{pb.ContainerState.Name(st.state)} {st.reason} {st.message}".rstrip())
            time.sleep(0.2)

    def _first_log_line(self, path: str, wait_s: float = 10) -> str:
        # CRI log format: <time> <stream> <P|F> <text>
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            line = _read(path, "").partition("\n")[0]
            if line:
                return line
            time.sleep(0.1)
        return ""

    def exec(self, pod: PodRun, cmd: list[str]) -> pb.ExecSyncResponse:
        return self._step(f"ExecSync {cmd[0]} in {pod.name}", self.rt.ExecSync,
                          pb.ExecSyncRequest(container_id=pod.container_id, cmd=cmd,
                                             timeout=EXEC_TIMEOUT_S), timeout=EXEC_TIMEOUT_S + 30)

    def observe(self, pod: PodRun) -> View:
        probe = self.exec(pod, ["/bin/sh", "-c", PROBE])
        if probe.exit_code != 0:
            raise DemoError(f"probe in {pod.name} exited {probe.exit_code}: {probe.stderr.decode()[-400:]}")
        ps = self.exec(pod, ["ps", "-o", "pid,args"])
        processes = ps.stdout.decode(errors="replace").splitlines() if ps.exit_code == 0 else []
        pod.view = view_from_probe(probe.stdout.decode(errors="replace"), processes)
        if len(processes) > 1:  # ps's own count beats /proc's, which includes the probe's shell
            pod.view.nprocs = len(processes) - 1
        pod.dominfo = virsh_dominfo(self.cfg.libvirt_uri, pod.domain) if pod.kind == "vm" else ""
        return pod.view

    # -- the whole demo ----------------------------------------------------------
    def run(self) -> Report:
        runtime = self.connect()
        self.pull()
        a, b = self.start_pod("demo-a"), self.start_pod("demo-b")
        served = [h.name for h in self._step("Status", self.rt.Status,
                                             pb.StatusRequest()).runtime_handlers]
        c = self.start_pod("demo-host", kind="host") if HOST_HANDLER in served else None
        if c is None:
            self.log('no host sandbox: this node refuses them (host_namespace_pods = "refuse")')
        self.log("RuntimeService.ExecSync: looking around inside each container")
        for pod in (a, b, c) if c else (a, b):
            self.observe(pod)
        self.exec(a, ["/bin/sh", "-c", f"echo only-in-demo-a > {SECRET_FILE}"])
        in_a = self.exec(a, ["cat", SECRET_FILE])
        in_b = self.exec(b, ["cat", SECRET_FILE])
        host = host_view()
        cmdlines = host_cmdlines()
        qemu = [f"pid {p.qemu_pid}: {cmdlines.get(p.qemu_pid, '?')[:100]}" for p in (a, b)]
        qemu += [f"pid {pid}: {cmd[:100]}  (demo-host's container itself: no VM)"
                 for pid, cmd in cmdlines.items() if c and cmd == f"sleep {c.marker}"]
        checks = isolation_checks(host, a, b, cmdlines, in_a, in_b) + \
            (host_sandbox_checks(host, a, c, cmdlines) if c else [])
        return Report(runtime=runtime, image=self.image, host=host, pods=[a, b, *([c] if c else [])],
                      checks=checks,
                      host_sees_qemu=qemu, registry=self.registry.address if self.registry else "")

    def cleanup(self) -> None:
        ids = [p.sandbox_id for p in reversed(self.pods) if p.sandbox_id]
        try:  # also pods whose RunPodSandbox reply we never got (a timeout, Ctrl-C)
            listed = self.rt.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(
                label_selector={"run": self.run_id})), timeout=CALL_TIMEOUT_S).items
            ids += [p.id for p in listed if p.id not in ids]
        except grpc.RpcError as e:
            self.log(f"cleanup: listing this run's pods: {e.code().name}: {e.details()}")
        for sid in ids:
            try:
                self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=CALL_TIMEOUT_S)
                self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as e:
                self.log(f"cleanup: removing pod {sid[:13]}: {e.code().name}: {e.details()}")
        if self.pulled_by_us:
            try:
                self.img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=self.image)),
                                     timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as e:
                self.log(f"cleanup: removing image {self.image}: {e.details()}")
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def close(self) -> None:
        if self.registry is not None:
            self.registry.stop()  # the daemon has the image already; nothing needs it now
            self.registry = None
        self.channel.close()


def virsh_dominfo(uri: str, domain: str) -> str:
    if not domain or shutil.which("virsh") is None:
        return ""
    r = subprocess.run(["virsh", "-c", uri, "dominfo", domain], capture_output=True, text=True,
                       timeout=30)
    return (r.stdout if r.returncode == 0 else r.stderr).strip()


def isolation_checks(host: View, a: PodRun, b: PodRun, host_cmds: dict[int, str],
                     secret_in_a: pb.ExecSyncResponse, secret_in_b: pb.ExecSyncResponse) -> list[Check]:
    va, vb = a.view, b.view
    marker_a = f"sleep {a.marker}"
    host_has_marker = [pid for pid, cmd in host_cmds.items() if cmd == marker_a]
    a_sees_own = any(marker_a in line for line in va.processes)
    b_sees_a = [line for line in vb.processes if marker_a in line]
    return [
        Check("the container runs on its own kernel, not the host's", va.boot_id != host.boot_id,
              f"boot_id {va.boot_id} (kernel {va.kernel}, up {va.uptime_s:.0f} s) vs host "
              f"{host.boot_id} (kernel {host.kernel}, up {host.uptime_s:.0f} s)"),
        Check("each pod has its own kernel", va.boot_id != vb.boot_id,
              f"demo-a boot_id {va.boot_id}, demo-b boot_id {vb.boot_id}"),
        # the pod's PID namespace is held by its init, as pause holds a containerd pod's
        Check("PID 1 in the container is the pod's own init, not the host's",
              va.pid1 == POD_INIT_NAME and not host.pid1.startswith(POD_INIT_NAME),
              f"demo-a PID 1: {va.pid1!r}; host PID 1: {host.pid1[:60]!r}"),
        Check("the host cannot see the container's processes, only the VM's qemu",
              a_sees_own and not host_has_marker and a.qemu_pid in host_cmds,
              f"'{marker_a}' is in demo-a's ps ({a_sees_own}), host pids running it: "
              f"{host_has_marker or 'none'}; qemu pid {a.qemu_pid} on the host"),
        Check("the container sees the VM's memory, not the host's", 0 < va.mem_mib < host.mem_mib,
              f"MemTotal {va.mem_mib} MiB in demo-a (VM {a.vm_memory_mib} MiB) vs {host.mem_mib} MiB on the host"),
        Check("the container sees the VM's vCPUs", va.cpus == a.vm_vcpus or (a.vm_vcpus == 0 and va.cpus > 0),
              f"{va.cpus} CPU(s) '{va.cpu_model}' in demo-a vs {host.cpus} '{host.cpu_model}' on the host"),
        Check("a container in another pod cannot see demo-a's processes", not b_sees_a and a_sees_own,
              f"demo-b sees {vb.nprocs} processes; '{marker_a}' among them: {bool(b_sees_a)}"),
        Check("a container in another pod cannot see demo-a's files",
              secret_in_a.exit_code == 0 and secret_in_b.exit_code != 0,
              f"cat {SECRET_FILE}: demo-a exit {secret_in_a.exit_code} "
              f"({secret_in_a.stdout.decode(errors='replace').strip()!r}), demo-b exit {secret_in_b.exit_code}"),
        Check("the pod is a libvirt domain", "running" in a.dominfo,
              f"virsh dominfo {a.domain}: " + "; ".join(
                  " ".join(line.split()) for line in a.dominfo.splitlines()
                  if line.split(":")[0] in ("State", "CPU(s)", "Max memory"))),
    ]


def host_sandbox_checks(host: View, a: PodRun, c: PodRun, host_cmds: dict[int, str]) -> list[Check]:
    """The host sandbox is the contrast: the same container, but on the host's own kernel."""
    vc = c.view
    marker_c = f"sleep {c.marker}"
    host_sees_c = [pid for pid, cmd in host_cmds.items() if cmd == marker_c]
    return [
        Check("the host sandbox's container shares the host's kernel (a namespace pod)",
              c.kind == "host" and vc.boot_id == host.boot_id and vc.kernel == host.kernel,
              f"demo-host boot_id {vc.boot_id} (kernel {vc.kernel}) vs host {host.boot_id}; "
              f"demo-a (a VM) {a.view.boot_id}"),
        Check("the host sees the host sandbox's container as its own process, with no VM",
              bool(host_sees_c) and not c.domain,
              f"host pids running '{marker_c}': {host_sees_c or 'none'}; libvirt domain: "
              f"{c.domain or 'none'}"),
    ]


def main(cfg, socket: str, html: str = "vmcri-demo.html", keep: bool = False,
         image: str | None = None, json_path: str | None = None) -> int:
    from vmcri import demo_report
    demo = Demo(cfg, socket, image)
    report = None
    try:
        report = demo.run()
        print()
        print(demo_report.text(report))
        with open(html, "w") as f:
            f.write(demo_report.html_page(report))
        print(f"HTML report: {os.path.abspath(html)}")
    except DemoError as e:
        print(f"vmcri demo: {e}")
    finally:
        if keep:
            ids = " ".join(p.sandbox_id[:13] for p in demo.pods if p.sandbox_id)
            print(f"--keep: pods left running; remove them with: crictl stopp {ids}; crictl rmp {ids}")
        else:
            demo.cleanup()
            print("demo pods and image removed")
        demo.close()
    if report is None:
        return 1
    report.cleaned_up = not keep
    if json_path:
        with open(json_path, "w") as f:
            f.write(report.to_json())
    return 0 if report.ok else 1
