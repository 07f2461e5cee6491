"""Validation of CRI container and sandbox configs.

Every error is `InvalidArgument` whose message starts with the field path
(`config.mounts[2].container_path: ...`), so the kubelet's event says what to fix.
"""
from __future__ import annotations

import posixpath
import re

from cri_api.v1 import api_pb2

from vmcri.errors import InvalidArgument

# Kubernetes container names are DNS labels; crictl users get a little more room.
_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?$")
_SYSCTL_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
_HUGEPAGE_RE = re.compile(r"^[0-9]+(KB|MB|GB|TB|PB)$")

NO_HOST_NAMESPACES = (
    "a VM sandbox cannot share host namespaces: every vmcri pod runs in its own virtual "
    "machine, so hostNetwork, hostPID and hostIPC are not supported"
)
NO_HOST_DEVICES = "a VM sandbox cannot pass host devices; use a privileged container for the guest's devices"


def _fail(field: str, why: str) -> None:
    raise InvalidArgument(f"{field}: {why}")


def _check_text(field: str, value: str) -> None:
    if "\x00" in value:
        _fail(field, "must not contain NUL characters")


def _check_absolute(field: str, path: str, required: bool = True) -> None:
    if not path:
        if required:
            _fail(field, "is required")
        return
    _check_text(field, path)
    if not path.startswith("/"):
        _fail(field, f"must be an absolute path, got {path!r}")


def _check_namespace_options(field: str, opts: api_pb2.NamespaceOption) -> None:
    for kind in ("network", "pid", "ipc"):
        if getattr(opts, kind) == api_pb2.NODE:
            _fail(f"{field}.{kind}", NO_HOST_NAMESPACES)


def validate_sandbox_config(config: api_pb2.PodSandboxConfig) -> None:
    """Reject sandbox configs a VM pod cannot honour (host namespaces, missing metadata)."""
    meta = config.metadata
    for attr in ("name", "namespace", "uid"):
        value = getattr(meta, attr)
        if not value:
            _fail(f"config.metadata.{attr}", "is required")
        _check_text(f"config.metadata.{attr}", value)
    if config.log_directory:
        _check_absolute("config.log_directory", config.log_directory)
    sec = config.linux.security_context
    _check_namespace_options("config.linux.security_context.namespace_options",
                             sec.namespace_options)
    for key, value in config.linux.sysctls.items():
        if not _SYSCTL_RE.fullmatch(key) or ".." in key or "\x00" in value:
            _fail(f"config.linux.sysctls[{key!r}]", "is not a valid sysctl name")


def _validate_log_path(log_path: str) -> None:
    field = "config.log_path"
    _check_text(field, log_path)
    if log_path.startswith("/"):
        _fail(field, f"must be relative to the sandbox log directory, got {log_path!r}")
    if ".." in log_path.split("/"):
        _fail(field, f"must not contain '..', got {log_path!r}")


def _validate_image_mount(field: str, m: api_pb2.Mount) -> None:
    """containerd's rules for an image volume: no host path, read-only."""
    from vmcri.container.imagevol import check_sub_path
    _check_text(f"{field}.image.image", m.image.image)
    if m.host_path:
        _fail(f"{field}.host_path", "must be empty for an image volume mount")
    if not m.readonly:
        _fail(f"{field}.readonly", "must be true for an image volume mount")
    check_sub_path(f"{field}.image_sub_path", m.image_sub_path)


def _validate_mounts(mounts) -> None:
    for i, m in enumerate(mounts):
        field = f"config.mounts[{i}]"
        _check_absolute(f"{field}.container_path", m.container_path)
        if len(m.uidMappings) or len(m.gidMappings):
            _fail(f"{field}.uidMappings", "id-mapped mounts are not supported by vmcri")
        if m.image.image:
            _validate_image_mount(field, m)
        else:
            _check_absolute(f"{field}.host_path", m.host_path)
            if m.image_sub_path:
                _fail(f"{field}.image_sub_path", "is only for image volume mounts")
        if m.recursive_read_only and not m.readonly:
            _fail(f"{field}.recursive_read_only", "requires readonly to be true")
        if m.recursive_read_only and m.propagation != api_pb2.PROPAGATION_PRIVATE:
            _fail(f"{field}.propagation", "a recursive read-only mount must have "
                  "private propagation (PROPAGATION_PRIVATE)")
        if posixpath.normpath(m.container_path) == "/":
            _fail(f"{field}.container_path", "cannot mount over the container's root")


def validate_vm_mounts(mounts) -> None:
    """What a pod VM cannot do that a host sandbox can: a mount made in the guest never
    reaches the host (9p serves the host's tree; it carries no mounts back), so
    Bidirectional would silently be HostToContainer. Refused, as containerd refuses it on
    a host path that is not a shared mount."""
    for i, m in enumerate(mounts):
        if m.propagation == api_pb2.PROPAGATION_BIDIRECTIONAL:
            _fail(f"config.mounts[{i}].propagation",
                  "Bidirectional cannot cross the pod VM: mounts made in the guest never "
                  "reach the host. Use HostToContainer, or run the pod as a host sandbox "
                  "(hostNetwork, or runtime handler \"host\"), where it works")


def _validate_security_context(sec: api_pb2.LinuxContainerSecurityContext) -> None:
    base = "config.linux.security_context"
    _check_namespace_options(f"{base}.namespace_options", sec.namespace_options)
    if sec.HasField("run_as_user") and sec.run_as_username:
        _fail(f"{base}.run_as_username", "must not be set together with run_as_user")
    if sec.HasField("run_as_user") and sec.run_as_user.value < 0:
        _fail(f"{base}.run_as_user", "must not be negative")
    if sec.HasField("run_as_group") and sec.run_as_group.value < 0:
        _fail(f"{base}.run_as_group", "must not be negative")
    for i, gid in enumerate(sec.supplemental_groups):
        if gid < 0 or gid > 0xFFFFFFFF:
            _fail(f"{base}.supplemental_groups[{i}]", f"{gid} is not a valid gid")
    for name in ("masked_paths", "readonly_paths"):
        for i, path in enumerate(getattr(sec, name)):
            _check_absolute(f"{base}.{name}[{i}]", path)


def _validate_resources(res: api_pb2.LinuxContainerResources) -> None:
    base = "config.linux.resources"
    for attr in ("cpu_period", "cpu_shares", "memory_limit_in_bytes"):
        if getattr(res, attr) < 0:
            _fail(f"{base}.{attr}", "must not be negative")
    if res.cpu_quota < -1:
        _fail(f"{base}.cpu_quota", "must be -1 (unlimited) or more")
    if not -1000 <= res.oom_score_adj <= 1000:
        _fail(f"{base}.oom_score_adj", "must be between -1000 and 1000")
    if res.memory_swap_limit_in_bytes < -1:
        _fail(f"{base}.memory_swap_limit_in_bytes", "must be -1 (unlimited) or more")
    for attr in ("cpuset_cpus", "cpuset_mems"):
        value = getattr(res, attr)
        if value and not re.fullmatch(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*", value):
            _fail(f"{base}.{attr}", f"{value!r} is not a cpuset list like '0-2,4'")
    for i, hp in enumerate(res.hugepage_limits):
        if not _HUGEPAGE_RE.fullmatch(hp.page_size):
            _fail(f"{base}.hugepage_limits[{i}].page_size",
                  f"{hp.page_size!r} is not a page size like '2MB' or '1GB'")
    for key, value in res.unified.items():
        if not key or "/" in key or key.startswith(".") or "\x00" in key + value:
            _fail(f"{base}.unified[{key!r}]", "is not a cgroup v2 file name")


def validate_container_config(config: api_pb2.ContainerConfig) -> None:
    """Check a CRI ContainerConfig before anything is created for it."""
    name = config.metadata.name
    if not name:
        _fail("config.metadata.name", "is required")
    if not _NAME_RE.fullmatch(name):
        _fail("config.metadata.name",
              f"{name!r} must be letters, digits, '-', '_' or '.', starting and ending "
              "with a letter or digit, at most 253 characters")
    if not config.image.image:
        _fail("config.image.image", "is required")
    _check_text("config.image.image", config.image.image)
    for field in ("command", "args"):
        for i, arg in enumerate(getattr(config, field)):
            _check_text(f"config.{field}[{i}]", arg)
    if config.working_dir:
        _check_absolute("config.working_dir", config.working_dir)
    for i, kv in enumerate(config.envs):
        if not kv.key:
            _fail(f"config.envs[{i}].key", "must not be empty")
        if "=" in kv.key:
            _fail(f"config.envs[{i}].key", f"{kv.key!r} must not contain '='")
        _check_text(f"config.envs[{i}].key", kv.key)
        _check_text(f"config.envs[{i}].value", kv.value)
    if config.log_path:
        _validate_log_path(config.log_path)
    _validate_mounts(config.mounts)
    if len(config.devices):
        _fail("config.devices[0]", NO_HOST_DEVICES)
    if len(config.CDI_devices):
        _fail("config.CDI_devices[0]", NO_HOST_DEVICES)
    if config.HasField("linux"):
        _validate_security_context(config.linux.security_context)
        _validate_resources(config.linux.resources)
