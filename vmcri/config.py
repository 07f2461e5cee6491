"""vmcri settings: TOML file with an embedded default for every key.

Unknown keys and bad values fail start-up with the dotted key name, so an
operator's typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONFIG_PATH = "/etc/vmcri/config.toml"


class ConfigError(ValueError):
    """A config key is unknown or has a bad value; the message names the key."""


@dataclass
class RegistryHost:
    """Where pulls for one registry host go (containerd hosts.toml / CRI-O registries.conf)."""
    # Endpoints tried in order, e.g. ["http://127.0.0.1:5000"]. The upstream host is
    # tried last unless `skip_upstream` is set.
    mirrors: list[str] = field(default_factory=list)
    insecure: bool = False  # plain HTTP or unverified TLS for the upstream host
    skip_upstream: bool = False
    # Mirrors (each also in `mirrors`) that get the pull's credentials too. The others get
    # none: credentials for a registry are that registry's, not every mirror's.
    credential_mirrors: list[str] = field(default_factory=list)


@dataclass
class Config:
    socket_path: str = "/run/vmcri/vmcri.sock"
    root_dir: str = "/var/lib/vmcri"
    run_dir: str = "/run/vmcri"
    log_level: str = "info"

    libvirt_uri: str = "qemu:///system"
    accel: str = "auto"  # auto | kvm | tcg

    # Guest image (kernel, initramfs, erofs root). Empty means <root_dir>/guest/current.
    guest_image_dir: str = ""
    default_vcpus: int = 1
    default_memory_mib: int = 256
    min_memory_mib: int = 128
    max_vcpus: int = 8
    # Memory hotplug ceiling (DIMMs, docs/operating.md "Resizing"): 0 = pods cannot grow memory.
    max_memory_mib: int = 2048
    # 32 MiB flushes during boot: 64 cut qemu CPU to agent-ready ~10% for +37 MiB RSS (bench/README.md)
    tcg_tb_cache_mib: int = 64
    # "loose": container root filesystems through a second 9p view the guest caches (P9: find
    # 14-20x, ls -l 3.5x faster, a 64 MiB fsync'd write 8x slower, bench/README.md); qemu's
    # multidevs=remap keeps qids of different host mounts apart. "none" for write-heavy roots.
    rootfs_cache: str = "loose"
    agent_timeout_s: float = 90.0
    # Warm pool (docs/warm-pool.md): pod VMs of the default shape booted ahead of time.
    pool_size: int = 0
    pool_max_concurrent_boots: int = 1
    # VM templates (docs/operating.md "VM templates"): pod VMs restored from a saved, booted
    # guest instead of booting. false: every pod VM boots (no memory shared between pods).
    vm_template: bool = True
    # "lazy": built in the background when the first pod VM is asked for; "start": at daemon start
    vm_template_build: str = "lazy"
    # true: start the host's KSM at daemon start, so pod VMs' identical pages are merged
    # (vmcri/sandbox/ksm.py; docs/security.md says what that shares). false: leave KSM alone.
    ksm: bool = False
    # "native": the agent starts an exec in the container itself (vmcri/agent/nsexec.py);
    # "crun": one `crun exec` per exec, as before (slower by a process start under TCG)
    exec_runner: str = "native"

    cni_conf_dir: str = "/etc/cni/net.d"
    cni_bin_dirs: list[str] = field(default_factory=lambda: ["/opt/cni/bin", "/usr/lib/cni"])
    # Jinja2 template rendered into <cni_conf_dir>/10-vmcri-net.conflist when the kubelet
    # sends its pod CIDR (UpdateRuntimeConfig), like containerd's conf_template. "" = off.
    cni_conf_template: str = ""
    # The netns libvirtd (and so each VM's tap) lives in, when vmcri runs in another one
    # (a container, or the tests' private "node" netns). "" = vmcri's own.
    libvirt_netns: str = ""

    streaming_address: str = "127.0.0.1"
    streaming_port: int = 10350
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 0  # 0 disables the Prometheus endpoint

    # registry host -> RegistryHost, e.g. [registries."registry.k8s.io"] mirrors = [...]
    registries: dict[str, RegistryHost] = field(default_factory=dict)
    # host[:port] list served over plain HTTP / unverified TLS.
    insecure_registries: list[str] = field(default_factory=list)
    pull_timeout_s: float = 600.0

    cgroup_driver: str = "cgroupfs"
    # Pods asking for the node's network, PID or IPC namespace (or the "host" runtime
    # handler): "delegate" runs them on the host under crun + conmon (docs/host-sandboxes.md);
    # "refuse" answers INVALID_ARGUMENT, for nodes where every pod must be a VM.
    host_namespace_pods: str = "delegate"

    # -- derived paths -------------------------------------------------------
    @property
    def db_path(self) -> str:
        return os.path.join(self.root_dir, "vmcri.db")

    @property
    def image_store_dir(self) -> str:
        return os.path.join(self.root_dir, "images")

    @property
    def sandboxes_dir(self) -> str:
        return os.path.join(self.root_dir, "sandboxes")

    @property
    def sandboxes_run_dir(self) -> str:
        return os.path.join(self.run_dir, "sandboxes")

    @property
    def netns_dir(self) -> str:
        return os.path.join(self.run_dir, "netns")

    @property
    def guest_dir(self) -> str:
        return self.guest_image_dir or os.path.join(self.root_dir, "guest", "current")

    def registry_for(self, host: str) -> RegistryHost:
        reg = self.registries.get(host, RegistryHost())
        if host in self.insecure_registries and not reg.insecure:
            reg = dataclasses.replace(reg, insecure=True)
        return reg


_CHOICES = {
    "accel": ("auto", "kvm", "tcg"),
    "log_level": ("debug", "info", "warning", "error"),
    "cgroup_driver": ("cgroupfs", "systemd"),
    "host_namespace_pods": ("delegate", "refuse"),
    "rootfs_cache": ("loose", "none"),
}
_POSITIVE = ("default_vcpus", "default_memory_mib", "min_memory_mib", "max_vcpus",
             "tcg_tb_cache_mib", "agent_timeout_s", "pull_timeout_s")
_PORTS = ("streaming_port", "metrics_port")


def _check_type(key: str, value, expected):
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {expected.__name__}, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def _parse_registry(key: str, raw) -> RegistryHost:
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a table")
    reg = RegistryHost()
    for k, v in raw.items():
        sub = f"{key}.{k}"
        if k == "mirrors":
            if not isinstance(v, list) or not all(isinstance(m, str) for m in v):
                raise ConfigError(f"{sub}: expected a list of endpoint URLs")
            for m in v:
                if not m.startswith(("http://", "https://")):
                    raise ConfigError(f"{sub}: endpoint {m!r} must start with http:// or https://")
            reg.mirrors = list(v)
        elif k == "credential_mirrors":
            if not isinstance(v, list) or not all(isinstance(m, str) for m in v):
                raise ConfigError(f"{sub}: expected a list of endpoint URLs")
            reg.credential_mirrors = list(v)
        elif k in ("insecure", "skip_upstream"):
            setattr(reg, k, _check_type(sub, v, bool))
        else:
            raise ConfigError(f"{sub}: unknown key")
    for m in reg.credential_mirrors:
        if m not in reg.mirrors:
            raise ConfigError(f"{key}.credential_mirrors: {m!r} is not one of the mirrors")
    return reg


def from_dict(data: dict) -> Config:
    cfg = Config()
    hints = {f.name: f.type for f in dataclasses.fields(Config)}
    simple = {"str": str, "int": int, "float": float, "bool": bool}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"{key}: unknown key")
        hint = hints[key]
        if hint in simple:
            value = _check_type(key, value, simple[hint])
        elif hint == "list[str]":
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise ConfigError(f"{key}: expected a list of strings")
        elif hint == "dict[str, RegistryHost]":
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table of registry hosts")
            value = {h: _parse_registry(f"{key}.{h}", r) for h, r in value.items()}
        setattr(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"{key}: {getattr(cfg, key)!r} is not one of {', '.join(choices)}")
    for key in _POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {getattr(cfg, key)!r}")
    for key in _PORTS:
        if not 0 <= getattr(cfg, key) <= 65535:
            raise ConfigError(f"{key}: {getattr(cfg, key)} is not a TCP port")
    for key in ("socket_path", "root_dir", "run_dir"):
        if not os.path.isabs(getattr(cfg, key)):
            raise ConfigError(f"{key}: must be an absolute path, got {getattr(cfg, key)!r}")
    if cfg.libvirt_netns and not os.path.isabs(cfg.libvirt_netns):
        raise ConfigError(f"libvirt_netns: must be an absolute path, got {cfg.libvirt_netns!r}")
    if cfg.cni_conf_template and not os.path.isabs(cfg.cni_conf_template):
        raise ConfigError(f"cni_conf_template: must be an absolute path, got {cfg.cni_conf_template!r}")
    if cfg.min_memory_mib < 128:
        raise ConfigError("min_memory_mib: the guest does not boot below 128")
    if cfg.default_memory_mib < cfg.min_memory_mib:
        raise ConfigError(f"default_memory_mib: {cfg.default_memory_mib} is below min_memory_mib {cfg.min_memory_mib}")
    if not 0 <= cfg.pool_size <= 64:
        raise ConfigError(f"pool_size: {cfg.pool_size} is not within 0..64")
    if cfg.exec_runner not in ("native", "crun"):
        raise ConfigError(f"exec_runner: {cfg.exec_runner!r} is not native or crun")
    if cfg.vm_template_build not in ("lazy", "start"):
        raise ConfigError(f"vm_template_build: {cfg.vm_template_build!r} is not lazy or start")
    if not 1 <= cfg.pool_max_concurrent_boots <= 16:
        raise ConfigError(f"pool_max_concurrent_boots: {cfg.pool_max_concurrent_boots} is not within 1..16")
    if cfg.default_vcpus > cfg.max_vcpus:
        raise ConfigError(f"default_vcpus: {cfg.default_vcpus} is above max_vcpus {cfg.max_vcpus}")
    if cfg.max_vcpus > 255:
        raise ConfigError(f"max_vcpus: {cfg.max_vcpus} is above 255 (i440fx without an IOMMU)")
    if cfg.max_memory_mib and not cfg.default_memory_mib < cfg.max_memory_mib <= 1 << 20:
        raise ConfigError(f"max_memory_mib: {cfg.max_memory_mib} must be 0 (no memory hotplug) or "
                          f"above default_memory_mib {cfg.default_memory_mib} and at most 1048576")


def load(path: str | None = None) -> Config:
    """Load `path`, or the default path when it exists, else the embedded defaults."""
    explicit = path is not None
    path = path or DEFAULT_CONFIG_PATH
    if not os.path.exists(path):
        if explicit:
            raise ConfigError(f"config file {path} does not exist")
        return Config()
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from e
    return from_dict(data)
