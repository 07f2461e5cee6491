"""Tap <-> pod veth plumbing (the Kata tc-redirect model, HOST-NOTES §6).

libvirt creates the VM's tap in the host netns with the CNI veth's MAC. We move it into the
pod netns and redirect every frame arriving on either device out of the other, so the guest
owns the pod IP and MAC and the pod's eth0 is a plain wire.

Uses `ip`/`tc` run under `nsenter --net=PATH`; only their JSON output (`-j`) is read.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import subprocess

from vmcri import errors
from vmcri.network.cni import check_ifname

log = logging.getLogger(__name__)
TOOL_TIMEOUT_S = 30.0


def _run(args: list[str], netns_path: str | None = None, check: bool = True):
    cmd = (["nsenter", f"--net={netns_path}"] if netns_path else []) + args
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=TOOL_TIMEOUT_S, close_fds=True)
    except subprocess.TimeoutExpired:
        raise errors.DeadlineExceeded(f"{' '.join(cmd)} timed out") from None
    if check and proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise errors.VmcriError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {err}")
    return proc


def _json(args: list[str], netns_path: str | None = None):
    proc = _run(args, netns_path, check=False)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout or b"[]")
    except ValueError:
        return None


def link(name: str, netns_path: str | None = None) -> dict | None:
    """`ip -j link show` for one device, or None when it is not in that namespace."""
    data = _json(["ip", "-j", "link", "show", "dev", name], netns_path)
    return data[0] if isinstance(data, list) and data else None


def addresses(name: str, netns_path: str | None = None) -> list[dict]:
    data = _json(["ip", "-j", "addr", "show", "dev", name], netns_path)
    if not isinstance(data, list) or not data:
        return []
    return [a for a in data[0].get("addr_info", []) if isinstance(a, dict)]


def _has_ingress(dev: str, netns_path: str) -> bool:
    data = _json(["tc", "-j", "qdisc", "show", "dev", dev], netns_path)
    return isinstance(data, list) and any(q.get("kind") == "ingress" for q in data
                                          if isinstance(q, dict))


def _redirect(src: str, dst: str, netns_path: str) -> None:
    # The filter binds to dst's ifindex, so a re-run drops the old qdisc (and its filters).
    if _has_ingress(src, netns_path):
        _run(["tc", "qdisc", "del", "dev", src, "ingress"], netns_path)
    _run(["tc", "qdisc", "add", "dev", src, "ingress"], netns_path)
    _run(["tc", "filter", "add", "dev", src, "parent", "ffff:", "protocol", "all",
          "u32", "match", "u8", "0", "0",
          "action", "mirred", "egress", "redirect", "dev", dst], netns_path)


def attach(netns_path: str, tap_name: str, pod_ifname: str = "eth0", tap_netns: str | None = None) -> None:
    """Move `tap_name` from `tap_netns` (where libvirt made it; None = ours) into the pod
    netns and wire it to `pod_ifname` both ways."""
    check_ifname(tap_name, "tap_name")
    check_ifname(pod_ifname, "pod_ifname")
    pod = link(pod_ifname, netns_path)
    if pod is None:
        raise errors.NotFound(f"pod interface {pod_ifname} not found in {netns_path}")
    if link(tap_name, netns_path) is None:
        if link(tap_name, tap_netns) is None:
            raise errors.NotFound(f"tap {tap_name} exists neither in libvirt's netns "
                                  f"nor in {netns_path}")
        _run(["ip", "link", "set", "dev", tap_name, "netns", netns_path], tap_netns)
    mtu = str(pod.get("mtu") or 1500)
    _run(["ip", "link", "set", "dev", tap_name, "mtu", mtu, "up"], netns_path)
    # The guest owns the IP now; the netns stack must not answer for it.
    _run(["ip", "addr", "flush", "dev", pod_ifname], netns_path)
    _redirect(pod_ifname, tap_name, netns_path)
    _redirect(tap_name, pod_ifname, netns_path)


def restore_addresses(netns_path: str, pod_ifname: str, cidrs: list[str]) -> None:
    """Put the pod IPs back on `pod_ifname` (attach flushed them) before CNI DEL: the bridge
    plugin finds the ipMasq chain and rule to remove through the addresses it reads off
    that device, and with none it removes neither. Best effort: DEL runs regardless."""
    check_ifname(pod_ifname, "pod_ifname")
    if link(pod_ifname, netns_path) is None:
        return
    for cidr in cidrs:
        cidr = str(ipaddress.ip_interface(cidr))  # never an option to `ip`
        proc = _run(["ip", "addr", "replace", cidr, "dev", pod_ifname], netns_path, check=False)
        if proc.returncode != 0:
            log.warning("restoring %s on %s in %s before CNI DEL: %s", cidr, pod_ifname,
                        netns_path, proc.stderr.decode("utf-8", "replace").strip()[-500:])


def detach(netns_path: str, tap_name: str, pod_ifname: str = "eth0") -> None:
    """Remove the redirects; devices already gone are fine."""
    for dev in (tap_name, pod_ifname):
        if link(dev, netns_path) is not None and _has_ingress(dev, netns_path):
            _run(["tc", "qdisc", "del", "dev", dev, "ingress"], netns_path, check=False)


def tap_name_for(sandbox_id: str) -> str:
    """The tap libvirt creates for a sandbox: `vmcri` + 8 id chars (15-char IFNAMSIZ limit)."""
    return "vmcri" + sandbox_id[:8]
