"""The OCI spec of a container in a host sandbox: built by vmcri.container.ocispec (the
same builder as for VM pods), then adjusted for the host:

- namespaces: the pod's shared ones are joined by path (network from CNI, IPC and UTS
  pinned files, a shared PID namespace held by the pod's infra process); a NODE mode
  means no entry, i.e. the host's own. A host-network pod also keeps the host's UTS
  namespace (its hostname is the node's), as with CRI-O and containerd;
- privileged here is privileged on the host, as with runc: the host's /dev, every
  capability the host has, no seccomp and no masked paths;
- capabilities the host's own bounding set lacks are left out, and oomScoreAdj is never
  below the daemon's own (root on some hosts lacks CAP_SYS_RESOURCE);
- on a cgroup hybrid host the cgroup v2-only resources are left out (runtime.py).
"""
from __future__ import annotations

import os

from cri_api.v1 import api_pb2 as pb

from vmcri.container import ocispec

CGROUP_ROOT = "/vmcri"


def host_paths(etc_dir: str, shm: str, cgroup_parent: str = "") -> ocispec.GuestPaths:
    """Host pods see host paths as they are: a hostPath is mounted from where it is."""
    return ocispec.GuestPaths(
        hosts=os.path.join(etc_dir, "hosts"), resolv_conf=os.path.join(etc_dir, "resolv.conf"),
        hostname=os.path.join(etc_dir, "hostname"), shm=shm,
        host_mount_to_guest=lambda path: path, cgroup_root=cgroup_parent or CGROUP_ROOT)


def namespaces(pod_ns: dict, sec: pb.LinuxContainerSecurityContext) -> list[dict]:
    """pod_ns: {"network", "ipc", "uts", "pid"} -> a pinned path, or "" for the host's."""
    out = [{"type": "mount"}, {"type": "cgroup"}]
    for kind, key in (("network", "network"), ("ipc", "ipc"), ("uts", "uts")):
        if pod_ns.get(key):
            out.append({"type": kind, "path": pod_ns[key]})
    opts = sec.namespace_options
    pid_mode = opts.pid if sec.HasField("namespace_options") else pb.NamespaceMode.CONTAINER
    if pid_mode == pb.NamespaceMode.CONTAINER:
        out.append({"type": "pid"})
    elif pid_mode == pb.NamespaceMode.POD and pod_ns.get("pid"):
        out.append({"type": "pid", "path": pod_ns["pid"]})
    elif pid_mode == pb.NamespaceMode.TARGET and pod_ns.get("target_pid"):
        out.append({"type": "pid", "path": pod_ns["target_pid"]})
    # NODE (hostPID): no entry, the host's PID namespace
    return out


def _bounding_set() -> set[str]:
    with open("/proc/self/status") as f:
        bnd = next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd:"))
    return {c for i, c in enumerate(ocispec.ALL_CAPABILITIES) if bnd >> i & 1}


def _own_oom_score_adj() -> int:
    try:
        with open("/proc/self/oom_score_adj") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def without_host_modes(msg):
    """A copy whose NODE namespace modes read as the defaults: the shared validation
    (made for VM pods) refuses NODE, and adjust() sets the namespaces from the original."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    opts = copy.linux.security_context.namespace_options
    for field in ("network", "pid", "ipc"):
        if getattr(opts, field) == pb.NamespaceMode.NODE:
            setattr(opts, field, pb.NamespaceMode.POD)
    return copy


def build(container_id: str, config: pb.ContainerConfig, sandbox_config: pb.PodSandboxConfig,
          image_config: dict, *, pod: dict, read_image_file, sandbox_id: str,
          cgroups: str) -> dict:
    """config.json for a host container; pod: the sandbox's row (sandbox.setup()), with
    "target_pid" set when the container targets another's PID namespace."""
    paths = host_paths(pod["etc"], pod["shm"], pod.get("cgroup_parent", ""))
    spec = ocispec.build_spec(container_id, without_host_modes(config),
                              without_host_modes(sandbox_config), image_config,
                              rootfs_path="rootfs", guest_paths=paths,
                              read_image_file=read_image_file, sandbox_id=sandbox_id)
    return adjust(spec, pod, config.linux.security_context, cgroups)


def fit_process(process: dict) -> dict:
    """Capabilities the host's bounding set lacks left out; oomScoreAdj not below ours."""
    host_caps = _bounding_set()
    caps = process.get("capabilities") or {}
    for key, names in list(caps.items()):
        caps[key] = [c for c in names if c in host_caps]
    if "oomScoreAdj" in process:
        process["oomScoreAdj"] = max(int(process["oomScoreAdj"]), _own_oom_score_adj())
    return process


def adjust(spec: dict, pod_ns: dict, sec: pb.LinuxContainerSecurityContext,
           cgroups: str) -> dict:
    linux = spec["linux"]
    linux["namespaces"] = namespaces(pod_ns, sec)
    fit_process(spec["process"])
    if cgroups == "hybrid":
        linux.get("resources", {}).pop("unified", None)
        linux.get("resources", {}).pop("hugepageLimits", None)
    return spec
