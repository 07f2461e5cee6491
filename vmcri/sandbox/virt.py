"""Thin wrappers over the libvirt connection: no policy, no XML building."""
from __future__ import annotations

import logging
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import libvirt

from vmcri.sandbox.domain import DOMAIN_PREFIX, SandboxMeta, parse_metadata

log = logging.getLogger(__name__)


def _silence_libvirt_stderr(_ctx, _err):
    # libvirt prints every error to stderr by default; we raise them instead.
    pass


libvirt.registerErrorHandler(_silence_libvirt_stderr, None)

_event_loop_lock = threading.Lock()
_event_loop_started = False


def _start_event_loop() -> None:
    """libvirt delivers domain lifecycle events only to a running event loop, which
    must be registered before the first connection is opened."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:
                    log.exception("libvirt event loop iteration failed")

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


@dataclass(frozen=True)
class Dimm:
    alias: str
    size_mib: int
    xml: str  # libvirt's own description of the device, as detachDeviceFlags wants it


@dataclass(frozen=True)
class LiveShape:
    """A running domain's vCPUs and memory as libvirt has them (not what the guest onlined)."""
    vcpus: int
    max_vcpus: int
    boot_memory_mib: int  # NUMA cell 0, or <memory> when there is no NUMA cell
    max_memory_mib: int  # 0: no memory hotplug
    slots: int
    dimms: list[Dimm] = field(default_factory=list)

    @property
    def memory_mib(self) -> int:
        return self.boot_memory_mib + sum(d.size_mib for d in self.dimms)


_UNIT_MIB = {"b": 1 / 2**20, "bytes": 1 / 2**20, "k": 1 / 1024, "kib": 1 / 1024, "m": 1, "mib": 1,
             "g": 1024, "gib": 1024}


def _mib(value: str, unit: str | None) -> int:
    """libvirt's size attributes and elements default to KiB."""
    return int(int(value.strip()) * _UNIT_MIB[(unit or "KiB").lower()])


def parse_shape(xml: str) -> LiveShape:
    """LiveShape from libvirt's XMLDesc of one of our domains."""
    root = ET.fromstring(xml)
    vcpu = root.find("vcpu")
    max_vcpus = int(vcpu.text.strip())
    vcpus = int(vcpu.get("current") or max_vcpus)
    cell = root.find("cpu/numa/cell")
    if cell is not None:
        boot = _mib(cell.get("memory"), cell.get("unit"))
    else:
        memory = root.find("memory")
        boot = _mib(memory.text, memory.get("unit"))
    maxmem = root.find("maxMemory")
    dimms = []
    for dev in root.findall("devices/memory"):
        if dev.get("model") != "dimm":
            continue
        alias, size = dev.find("alias"), dev.find("target/size")
        dimms.append(Dimm(alias=alias.get("name") if alias is not None else "",
                          size_mib=_mib(size.text, size.get("unit")),
                          xml=ET.tostring(dev, encoding="unicode")))
    return LiveShape(vcpus=vcpus, max_vcpus=max_vcpus, boot_memory_mib=boot,
                     max_memory_mib=_mib(maxmem.text, maxmem.get("unit")) if maxmem is not None else 0,
                     slots=int(maxmem.get("slots", 0)) if maxmem is not None else 0, dimms=dimms)


class Hypervisor:
    """One libvirt connection, reopened when it drops."""

    def __init__(self, uri: str = "qemu:///system", watch_events: bool = False):
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()
        # fn(domain_name) called when a domain stops for any reason
        self.on_domain_stopped: list = []
        self._watch = watch_events
        self._callback_id = None
        if watch_events:
            _start_event_loop()

    def conn(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
            self._conn = libvirt.open(self.uri)
            if self._watch:
                self._callback_id = self._conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None)
            return self._conn

    def close(self) -> None:
        """Stop delivering events to our handlers (their state may be gone) and drop the
        connection."""
        with self._lock:
            self.on_domain_stopped = []
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                if self._callback_id is not None:
                    conn.domainEventDeregisterAny(self._callback_id)
                conn.close()
            except libvirt.libvirtError:
                pass

    def _lifecycle(self, _conn, dom, event, _detail, _opaque) -> None:
        if event not in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
            return
        try:
            name = dom.name()
        except libvirt.libvirtError:
            return
        if not name.startswith(DOMAIN_PREFIX):
            return
        for fn in self.on_domain_stopped:
            # never block the event loop: the handler takes sandbox locks
            threading.Thread(target=fn, args=(name,), name="vm-stopped", daemon=True).start()

    def ping(self) -> str:
        """Raises libvirt.libvirtError when libvirtd is unreachable; returns the hypervisor version."""
        v = self.conn().getVersion()
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

    def create(self, xml: str) -> libvirt.virDomain:
        """Start a transient domain (it vanishes from libvirt when destroyed)."""
        return self.conn().createXML(xml, 0)

    def save(self, name: str, path: str) -> None:
        """Save the running domain's state to `path`; the domain is gone afterwards."""
        self._live(name).save(path)

    def restore(self, path: str) -> None:
        """Start the domain a save image describes (its XML, as the image holds it), running."""
        self.conn().restoreFlags(path, None, libvirt.VIR_DOMAIN_SAVE_RUNNING)

    def lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn().lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def is_running(self, name: str) -> bool:
        dom = self.lookup(name)
        if dom is None:
            return False
        try:
            return dom.isActive() == 1
        except libvirt.libvirtError:
            return False

    def destroy(self, name: str) -> bool:
        """Destroy (and undefine, if persistent) a domain. False if it was already gone."""
        dom = self.lookup(name)
        if dom is None:
            return False
        try:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                return False
            raise
        return True

    # -- live resizing (policy in vmcri.sandbox.sandbox_resize) ----------------------
    def _live(self, name: str) -> libvirt.virDomain:
        dom = self.lookup(name)
        if dom is None or not dom.isActive():
            raise libvirt.libvirtError(f"domain {name} is not running")
        return dom

    def live_shape(self, name: str) -> LiveShape:
        return parse_shape(self._live(name).XMLDesc(0))

    def set_vcpus(self, name: str, count: int) -> None:
        """Hot-plug (or unplug) vCPUs of the running domain; the guest still has to online them."""
        self._live(name).setVcpusFlags(count, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def set_metadata(self, name: str, xml: str, key: str, uri: str) -> None:
        """Replace our metadata element of the running domain (a claimed pool VM's new owner)."""
        self._live(name).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, key, uri,
                                     libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def attach_device(self, name: str, xml: str) -> None:
        self._live(name).attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def detach_device(self, name: str, xml: str) -> None:
        """Returns once the guest has released the device; raises if it refused."""
        self._live(name).detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def pid(self, name: str) -> int | None:
        """The qemu process id, from libvirt's pid file (no parsing of ps output)."""
        try:
            with open(f"/run/libvirt/qemu/{name}.pid") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def cost(self, name: str) -> dict:
        """What the VM costs the host: guest CPU time from libvirt, qemu's RSS from /proc."""
        out: dict = {}
        dom = self.lookup(name)
        if dom is not None:
            try:
                _state, max_kib, mem_kib, vcpus, cpu_ns = dom.info()
                out.update(cpuTimeNs=cpu_ns, memoryKiB=mem_kib, maxMemoryKiB=max_kib, vcpus=vcpus)
            except libvirt.libvirtError:
                pass
        pid = self.pid(name)
        if pid:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                            key, value = line.split(":", 1)
                            out[f"qemu{key}KiB"] = int(value.split()[0])
            except (OSError, ValueError):
                pass
        return out

    def list_vmcri_domains(self) -> dict[str, SandboxMeta]:
        """Every domain carrying vmcri metadata, by domain name."""
        out: dict[str, SandboxMeta] = {}
        for dom in self.conn().listAllDomains(0):
            try:
                name = dom.name()
                if not name.startswith(DOMAIN_PREFIX):
                    continue
                meta = parse_metadata(dom.XMLDesc(0))
            except libvirt.libvirtError:
                continue  # vanished while listing
            if meta is not None:
                out[name] = meta
        return out
