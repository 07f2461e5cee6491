"""NetworkResult: what a pod's CNI ADD gave, in one shape for every CNI spec version."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from vmcri.network.cni import parse_version


@dataclass
class NetworkResult:
    netns_path: str
    interfaces: list[dict] = field(default_factory=list)  # [{name, mac}] inside the pod netns
    ips: list[dict] = field(default_factory=list)  # [{address: "10.0.0.5/24", gateway, version}]
    routes: list[dict] = field(default_factory=list)  # [{dst, gw}]
    dns: dict = field(default_factory=lambda: {"nameservers": [], "search": [], "options": []})
    mtu: int = 0
    raw_result: dict = field(default_factory=dict)

    @property
    def pod_ips(self) -> list[str]:
        """Bare addresses, IPv4 first, as PodSandboxStatus.network wants them."""
        ordered = sorted(self.ips, key=lambda ip: ip["version"])
        return [ip["address"].split("/")[0] for ip in ordered]

    def mac_of(self, ifname: str = "eth0") -> str:
        for itf in self.interfaces:
            if itf["name"] == ifname:
                return itf["mac"]
        return ""

    def to_dict(self) -> dict:
        return {"netns_path": self.netns_path, "interfaces": self.interfaces,
                "ips": self.ips, "routes": self.routes, "dns": self.dns, "mtu": self.mtu,
                "raw_result": self.raw_result}


def _ip_version(address: str) -> str:
    return "6" if ":" in address else "4"


def _clean_routes(routes) -> list[dict]:
    out = []
    for r in routes or []:
        if isinstance(r, dict) and isinstance(r.get("dst"), str):
            out.append({"dst": r["dst"], "gw": r.get("gw") or ""})
    return out


def _strs(v) -> list[str]:
    return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []


def parse_result(result: dict, netns_path: str, cni_version: str) -> NetworkResult:
    """Normalise a CNI result (0.1.x/0.2.x `ip4`/`ip6`, or 0.3.x/0.4.x/1.x `ips`)."""
    version = result.get("cniVersion") or cni_version
    try:
        vt = parse_version(version)
    except ValueError:
        vt = (1, 0, 0)
    ips, routes, interfaces = [], [], []
    if vt < (0, 3, 0):
        for key, ver in (("ip4", "4"), ("ip6", "6")):
            block = result.get(key)
            if isinstance(block, dict) and isinstance(block.get("ip"), str):
                ips.append({"address": block["ip"], "gateway": block.get("gateway") or "",
                            "version": ver})
                routes.extend(_clean_routes(block.get("routes")))
    else:
        all_ifs = result.get("interfaces") if isinstance(result.get("interfaces"), list) else []
        pod_index = {}
        for idx, itf in enumerate(all_ifs):
            if not isinstance(itf, dict) or not itf.get("sandbox"):
                continue  # host-side veth and bridge
            pod_index[idx] = len(interfaces)
            interfaces.append({"name": str(itf.get("name", "")), "mac": str(itf.get("mac", ""))})
        for ip in result.get("ips") or []:
            if not isinstance(ip, dict) or not isinstance(ip.get("address"), str):
                continue
            ips.append({"address": ip["address"], "gateway": ip.get("gateway") or "",
                        "version": ip.get("version") or _ip_version(ip["address"])})
        routes = _clean_routes(result.get("routes"))
    for ip in ips:  # validates; a plugin's typo must not reach the guest config
        ipaddress.ip_interface(ip["address"])
    # A route without gw means "via the default gateway" (the bridge plugin configures it so);
    # the guest gets it spelled out.
    for r in routes:
        if not r["gw"]:
            fam = "6" if ":" in r["dst"] else "4"
            r["gw"] = next((ip["gateway"] for ip in ips
                            if ip["version"] == fam and ip["gateway"]), "")
    dns_raw = result.get("dns") if isinstance(result.get("dns"), dict) else {}
    dns = {"nameservers": _strs(dns_raw.get("nameservers")),
           "search": _strs(dns_raw.get("search")),
           "options": _strs(dns_raw.get("options"))}
    if isinstance(dns_raw.get("domain"), str) and dns_raw["domain"] not in dns["search"]:
        dns["search"].insert(0, dns_raw["domain"])
    return NetworkResult(netns_path=netns_path, interfaces=interfaces, ips=ips, routes=routes,
                         dns=dns, raw_result=result)
