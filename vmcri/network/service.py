"""NetworkService: a pod's network namespace, its CNI attachment and the VM tap wiring."""
from __future__ import annotations

import ipaddress
import logging
import os
import time

from vmcri import errors
from vmcri.network import netns, tap
from vmcri.network.cni import (CNIConfigError, CNIRuntime, NetworkConfigList, ResultCache,
                               RuntimeConf, check_id, check_ifname, find_config)
from vmcri.network.result import NetworkResult, parse_result

log = logging.getLogger(__name__)

REASON_NO_CNI_CONFIG = "NoCNIConfig"
_PROTOCOLS = {0: "tcp", 1: "udp", 2: "sctp"}  # CRI Protocol enum
_MAX_PORT_MAPPINGS = 1024
_MAX_DNS_ENTRIES = 64


def _field(obj, *names, default=None):
    """Read a CRI message field or a dict key (snake_case or camelCase)."""
    for n in names:
        if isinstance(obj, dict):
            if n in obj:
                return obj[n]
        elif hasattr(obj, n):
            return getattr(obj, n)
    return default


def port_mappings_arg(port_mappings) -> list[dict]:
    """CRI PortMapping list -> the CNI `portMappings` capability argument."""
    out = []
    for i, pm in enumerate(list(port_mappings or [])[:_MAX_PORT_MAPPINGS + 1]):
        if i == _MAX_PORT_MAPPINGS:
            raise errors.InvalidArgument(f"port_mappings: more than {_MAX_PORT_MAPPINGS}")
        where = f"port_mappings[{i}]"
        cport = _field(pm, "container_port", "containerPort", default=0)
        hport = _field(pm, "host_port", "hostPort", default=0)
        proto = _field(pm, "protocol", default=0)
        host_ip = _field(pm, "host_ip", "hostIP", default="") or ""
        for name, v in (("container_port", cport), ("host_port", hport)):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 65535:
                raise errors.InvalidArgument(f"{where}.{name}: {v!r} is not a port number")
        if isinstance(proto, int) and not isinstance(proto, bool):
            proto_name = _PROTOCOLS.get(proto)
        elif isinstance(proto, str):
            proto_name = proto.lower() if proto.lower() in _PROTOCOLS.values() else None
        else:
            proto_name = None
        if proto_name is None:
            raise errors.InvalidArgument(f"{where}.protocol: {proto!r} is not TCP, UDP or SCTP")
        if host_ip:
            try:
                ipaddress.ip_address(host_ip)
            except ValueError:
                raise errors.InvalidArgument(f"{where}.host_ip: {host_ip!r} is not an IP") from None
        if hport <= 0:  # no host port: nothing for portmap to do (as containerd)
            continue
        if cport <= 0:
            raise errors.InvalidArgument(f"{where}.container_port: must be set with host_port")
        entry = {"hostPort": hport, "containerPort": cport, "protocol": proto_name}
        if host_ip:
            entry["hostIP"] = host_ip
        out.append(entry)
    return out


def dns_arg(dns) -> dict:
    """CRI DNSConfig -> the CNI `dns` capability argument."""
    if dns is None:
        return {}
    out = {}
    for key, names in (("servers", ("servers",)), ("searches", ("searches", "search")),
                       ("options", ("options",))):
        values = list(_field(dns, *names, default=[]) or [])
        if len(values) > _MAX_DNS_ENTRIES or not all(isinstance(v, str) for v in values):
            raise errors.InvalidArgument(f"dns_config.{key}: expected at most "
                                         f"{_MAX_DNS_ENTRIES} strings")
        if values:
            out[key] = values
    return out


class NetworkService:
    def __init__(self, cfg, plugin_timeout_s: float = 60.0, ifname: str = "eth0"):
        self.cfg = cfg
        self.ifname = check_ifname(ifname)
        self.cni = CNIRuntime(cfg.cni_bin_dirs, timeout_s=plugin_timeout_s)
        self.cache = ResultCache(os.path.join(cfg.root_dir, "cni-cache"))

    # -- status -----------------------------------------------------------------
    def ready(self) -> tuple[bool, str, str]:
        try:
            net = find_config(self.cfg.cni_conf_dir)
        except CNIConfigError as e:
            return False, REASON_NO_CNI_CONFIG, f"cni config load failed: {e}"
        return True, "", f"network {net.name!r} from {net.source}"

    def netns_path(self, sandbox_id: str) -> str:
        return netns.path_for(self.cfg.netns_dir, sandbox_id)

    def list_netns(self) -> list[str]:
        return netns.list_names(self.cfg.netns_dir)

    # -- lifecycle --------------------------------------------------------------
    def _runtime_conf(self, sandbox_id, netns_path, pod_name, pod_namespace, pod_uid,
                      capability_args) -> RuntimeConf:
        args = [("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", pod_namespace),
                ("K8S_POD_NAME", pod_name), ("K8S_POD_INFRA_CONTAINER_ID", sandbox_id)]
        if pod_uid:
            args.append(("K8S_POD_UID", pod_uid))
        for k, v in args:
            if not isinstance(v, str) or any(c in v for c in ";=\n\0"):
                raise errors.InvalidArgument(f"{k}: {v!r} may not contain ';', '=' or newlines")
        return RuntimeConf(container_id=sandbox_id, netns=netns_path, ifname=self.ifname,
                           args=args, capability_args=capability_args)

    def setup(self, sandbox_id: str, pod_name: str, pod_namespace: str, pod_uid: str = "",
              port_mappings=None, dns=None) -> NetworkResult:
        """Create the pod netns and run CNI ADD; on failure undo both and raise."""
        check_id(sandbox_id, "sandbox_id")
        caps = {"portMappings": port_mappings_arg(port_mappings)}
        dns_caps = dns_arg(dns)
        if dns_caps:
            caps["dns"] = dns_caps
        net = find_config(self.cfg.cni_conf_dir)
        for plugin in net.plugins:  # fail before creating anything
            self.cni.find_plugin(plugin["type"])
        rt = self._runtime_conf(sandbox_id, "", pod_name, pod_namespace, pod_uid, caps)
        path = rt.netns = netns.create(self.cfg.netns_dir, sandbox_id)
        started = time.monotonic()
        # Written before ADD so a crash mid-ADD still leaves DEL the config it needs.
        self._save_cache(rt, net, None)
        try:
            raw = self.cni.add(net, rt)
            result = parse_result(raw, path, net.cni_version)
            self._fill_from_netns(result)
            self._save_cache(rt, net, raw)
        except BaseException as e:
            log.warning("network setup for %s failed, undoing: %s", sandbox_id[:12], e)
            self._undo(rt, net, path)
            if isinstance(e, (errors.VmcriError, KeyboardInterrupt)):
                raise
            raise errors.VmcriError(f"CNI ADD for {sandbox_id[:12]}: {e}") from e
        log.info("network for %s: %s in %.3fs", sandbox_id[:12], result.pod_ips,
                 time.monotonic() - started)
        return result

    def _undo(self, rt: RuntimeConf, net: NetworkConfigList, path: str) -> None:
        try:
            self.cni.delete(net, rt, None)
        except errors.VmcriError as e:
            log.warning("CNI DEL after failed ADD of %s: %s", rt.container_id[:12], e)
        netns.delete_path(path)
        self.cache.remove(rt.container_id, rt.ifname)

    def _fill_from_netns(self, result: NetworkResult) -> None:
        """MTU and (for plugins that report no interfaces) the MAC, read from the netns."""
        info = tap.link(self.ifname, result.netns_path)
        if info is None:
            raise errors.VmcriError(f"CNI ADD left no {self.ifname} in {result.netns_path}")
        result.mtu = int(info.get("mtu") or 0)
        pod = {"name": self.ifname, "mac": result.mac_of(self.ifname) or info.get("address", "")}
        # the pod's eth0 first: callers give interfaces[0]'s MAC to the VM NIC
        result.interfaces = [pod] + [i for i in result.interfaces if i["name"] != self.ifname]

    def _save_cache(self, rt: RuntimeConf, net: NetworkConfigList, raw: dict | None) -> None:
        self.cache.save(rt.container_id, rt.ifname, {
            "config": net.to_dict(), "cniArgs": rt.args,
            "capabilityArgs": rt.capability_args, "netns": rt.netns, "result": raw})

    def _cached(self, sandbox_id: str):
        """(config list, runtime conf, prevResult) for DEL/CHECK, from the cache if we can."""
        entry = self.cache.load(sandbox_id, self.ifname)
        net = None
        if entry and isinstance(entry.get("config"), dict):
            try:
                net = NetworkConfigList.from_dict(entry["config"])
            except CNIConfigError as e:
                log.warning("cached CNI config of %s unusable: %s", sandbox_id[:12], e)
        if net is None:
            net = find_config(self.cfg.cni_conf_dir)
        args = [tuple(a) for a in (entry or {}).get("cniArgs", [])
                if isinstance(a, list) and len(a) == 2] or [("IgnoreUnknown", "1")]
        caps = (entry or {}).get("capabilityArgs") or {}
        rt = RuntimeConf(container_id=sandbox_id, netns="", ifname=self.ifname,
                         args=args, capability_args=caps if isinstance(caps, dict) else {})
        prev = (entry or {}).get("result")
        return net, rt, prev if isinstance(prev, dict) else None

    def _pod_cidrs(self, prev: dict, net: NetworkConfigList) -> list[str]:
        """The addresses ADD gave the pod's interface (with prefix), from the cached result."""
        try:
            res = parse_result(prev, "", net.cni_version)
        except (ValueError, TypeError) as e:
            log.warning("cached CNI result unusable for the pod addresses: %s", e)
            return []
        return [ip["address"] for ip in res.ips]

    def _own_path(self, sandbox_id: str, netns_path: str | None) -> str:
        """Teardown unmounts the path, so it must be one of ours."""
        ours = self.netns_path(sandbox_id)
        if netns_path and os.path.normpath(netns_path) != os.path.normpath(ours):
            raise errors.InvalidArgument(
                f"netns_path: {netns_path!r} is not {sandbox_id[:12]}'s namespace {ours}")
        return ours

    def check(self, sandbox_id: str, netns_path: str | None = None) -> None:
        """CNI CHECK of the attachment; raises if a plugin finds it broken."""
        check_id(sandbox_id, "sandbox_id")
        path = netns_path or self.netns_path(sandbox_id)
        if not netns.exists(path):
            raise errors.NotFound(f"network namespace {path} of {sandbox_id[:12]} is gone")
        net, rt, prev = self._cached(sandbox_id)
        if prev is None:
            raise errors.FailedPrecondition(f"no cached CNI result for {sandbox_id[:12]}")
        rt.netns = path
        self.cni.check(net, rt, prev)

    def teardown(self, sandbox_id: str, netns_path: str | None = None) -> None:
        """CNI DEL and netns removal; already-gone parts are fine. Raises only when a
        plugin fails, keeping the netns and cache so a retry can finish the job."""
        check_id(sandbox_id, "sandbox_id")
        path = self._own_path(sandbox_id, netns_path)
        have_cache = self.cache.load(sandbox_id, self.ifname) is not None
        try:
            net, rt, prev = self._cached(sandbox_id)
        except CNIConfigError:
            if have_cache:
                raise
            net = None  # never attached and no config to DEL with: only the netns is left
        if net is not None:
            rt.netns = path if netns.exists(path) else ""  # spec: DEL may get no netns
            if rt.netns and prev is not None:
                tap.restore_addresses(path, self.ifname, self._pod_cidrs(prev, net))
            self.cni.delete(net, rt, prev)
        self.cache.remove(sandbox_id, self.ifname)
        netns.delete_path(path)

    # -- VM tap -----------------------------------------------------------------
    def attach_tap(self, netns_path: str, tap_name: str, pod_ifname: str = "eth0") -> None:
        tap.attach(netns_path, tap_name, pod_ifname, self.cfg.libvirt_netns or None)

    def detach_tap(self, netns_path: str, tap_name: str, pod_ifname: str = "eth0") -> None:
        tap.detach(netns_path, tap_name, pod_ifname)

    # -- reconcile --------------------------------------------------------------
    def cleanup_orphans(self, known_sandbox_ids) -> list[str]:
        """Tear down every netns or cached attachment whose sandbox is unknown."""
        known = set(known_sandbox_ids)
        ids = set(self.list_netns())
        ids.update(cid for cid, ifname in self.cache.entries() if ifname == self.ifname)
        cleaned = []
        for sid in sorted(ids - known):
            try:
                self.teardown(sid)
                cleaned.append(sid)
            except errors.VmcriError as e:
                log.warning("orphan network %s not cleaned: %s", sid[:12], e)
        return cleaned
