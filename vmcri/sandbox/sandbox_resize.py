"""UpdatePodSandboxResources: grow (or shrink) a running pod VM in place.

vCPUs are hot-plugged through libvirt (ACPI CPU hotplug, up to the VM's max) and then
onlined by the guest: its kernel adds them offline and there is no udev, so the host
asks the agent to write cpuN/online. Memory grows by DIMM hotplug; the kernel onlines
the DIMM itself (designer.MEMORY_HOTPLUG_CMDLINE). Lowering vCPUs offlines them in the
guest but leaves them plugged: under TCG (QEMU 7.2, libvirt 9.0) ACPI vCPU unplug timed
out in libvirt while the guest did drop the CPU, so libvirt kept counting it (a later
replug to that count was a no-op), and the next hotplug (a DIMM) crashed qemu with heap
corruption, 2 times out of 2. Memory shrinks only by unplugging DIMMs that
were hot-added; boot memory cannot go (there is no balloon).

What cannot be applied is logged and recorded in the sandbox row under resources.resize
(shown by verbose PodSandboxStatus); the RPC still answers OK, since the kubelet sends
this routinely. Only an unknown id (NOT_FOUND) and malformed values (INVALID_ARGUMENT,
naming the field) fail it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import libvirt
from cri_api.v1 import api_pb2 as pb

from vmcri.config import Config
from vmcri.errors import InvalidArgument, NotFound
from vmcri.sandbox import designer, podcgroup
from vmcri.sandbox.domain import render_dimm
from vmcri.sandbox.model import READY, now_ns
from vmcri.sandbox.virt import LiveShape

log = logging.getLogger(__name__)

CPU_APPEAR_WAIT_S = 5.0  # the ACPI hotplug showed up in the guest after 0.3-0.5 s under TCG
GUEST_CALL_TIMEOUT_S = 30.0
MAX_CPU_PERIOD_US = 1_000_000  # CFS: 1 ms .. 1 s
MIN_CPU_PERIOD_US = 1_000
MIN_CPU_QUOTA_US = 1_000

@dataclass(frozen=True)
class Target:
    """What a resize asks for; None for a dimension the request leaves alone."""
    vcpus: int | None
    memory_mib: int | None
    cpus: float  # the CPU demand before rounding and capping
    notes: tuple[str, ...] = ()


@dataclass
class Outcome:
    vcpus: int | None = None  # online in the guest after the resize
    memory_mib: int | None = None  # plugged after the resize
    plugged: int | None = None  # vCPUs plugged (some may be offline in the guest)
    not_applied: list[str] = field(default_factory=list)

    def note(self, why: str) -> None:
        self.not_applied.append(why)


# -- request -> target (pure) ----------------------------------------------------

def validate(field_name: str, res: pb.LinuxContainerResources) -> None:
    """INVALID_ARGUMENT for values no kubelet sends, naming the field."""
    if res.cpu_period and not MIN_CPU_PERIOD_US <= res.cpu_period <= MAX_CPU_PERIOD_US:
        raise InvalidArgument(f"{field_name}.cpu_period: {res.cpu_period} is outside "
                              f"{MIN_CPU_PERIOD_US}..{MAX_CPU_PERIOD_US} microseconds (or 0)")
    if res.cpu_quota not in (0, -1) and res.cpu_quota < MIN_CPU_QUOTA_US:
        raise InvalidArgument(f"{field_name}.cpu_quota: {res.cpu_quota} is below "
                              f"{MIN_CPU_QUOTA_US} microseconds (use -1 or 0 for no limit)")
    if res.cpu_quota > 0 and not res.cpu_period:
        raise InvalidArgument(f"{field_name}.cpu_quota: {res.cpu_quota} is set without cpu_period")
    if res.memory_limit_in_bytes < 0:
        raise InvalidArgument(f"{field_name}.memory_limit_in_bytes: "
                              f"{res.memory_limit_in_bytes} is negative")
    if res.memory_limit_in_bytes > 1 << 50:
        raise InvalidArgument(f"{field_name}.memory_limit_in_bytes: "
                              f"{res.memory_limit_in_bytes} is not a plausible limit")


def target(cfg: Config, resources: pb.LinuxContainerResources | None,
           overhead: pb.LinuxContainerResources | None) -> Target:
    """Size the pod exactly as RunPodSandbox does (designer), but a dimension that no
    limit mentions stays as it is instead of falling back to the default."""
    parts = [r for r in (resources, overhead) if r is not None]
    cpus, mem = designer.demand(*parts)
    notes = []
    vcpus = None
    if cpus:
        vcpus = designer.vcpus_for(cpus)
        if vcpus > cfg.max_vcpus:
            notes.append(f"vcpus: {vcpus} asked, capped at max_vcpus {cfg.max_vcpus}")
            vcpus = cfg.max_vcpus
    memory = designer.memory_mib_for(cfg, mem) if mem else None
    return Target(vcpus=vcpus, memory_mib=memory, cpus=round(cpus, 6), notes=tuple(notes))


@dataclass(frozen=True)
class MemoryPlan:
    attach_mib: int = 0
    detach: tuple = ()  # Dimm, newest first
    notes: tuple[str, ...] = ()


def plan_memory(shape: LiveShape, want_mib: int) -> MemoryPlan:
    """Which DIMM to add, or which hot-added DIMMs to remove, to reach `want_mib`."""
    have = shape.memory_mib
    if want_mib > have:
        if not shape.max_memory_mib:
            return MemoryPlan(notes=(f"memory: {want_mib} MiB asked, {have} MiB kept: memory "
                                     f"hotplug is off for this VM (max_memory_mib)",))
        if len(shape.dimms) >= shape.slots:
            return MemoryPlan(notes=(f"memory: {want_mib} MiB asked, {have} MiB kept: all "
                                     f"{shape.slots} DIMM slots are used",))
        add = designer.dimm_mib(want_mib - have)
        room = (shape.max_memory_mib - have) // designer.DIMM_ALIGN_MIB * designer.DIMM_ALIGN_MIB
        if add > room:
            note = (f"memory: {want_mib} MiB asked, capped at the VM's max "
                    f"{shape.max_memory_mib} MiB")
            return MemoryPlan(attach_mib=room, notes=(note,))
        return MemoryPlan(attach_mib=add)
    detach = []
    left = have
    for dimm in reversed(shape.dimms):
        if left - dimm.size_mib < want_mib:
            break
        detach.append(dimm)
        left -= dimm.size_mib
    notes = ()
    if left > want_mib and len(detach) == len(shape.dimms):
        # with a DIMM left, the rest is rounding to whole DIMMs: more than asked, not less
        notes = (f"memory: {want_mib} MiB asked, {left} MiB kept: boot memory "
                 f"({shape.boot_memory_mib} MiB) cannot be removed (no balloon)",)
    return MemoryPlan(detach=tuple(detach), notes=notes)


def parse_cpu_list(text: str, limit: int = 4096) -> int:
    """How many CPUs a kernel cpu list ("0-2,4") names; ValueError if it is not one."""
    count = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if not 0 <= a <= b < limit:
            raise ValueError(f"bad cpu range {part!r}")
        count += b - a + 1
    return count


# -- applying (side effects) --------------------------------------------------------

def online_cpus(client, count: int, wait_s: float = CPU_APPEAR_WAIT_S) -> int:
    """Make exactly cpu0..count-1 online in the guest; returns how many are online."""
    res = client.call("set_cpus_online", count=count, wait_ms=int(wait_s * 1000),
                      timeout=GUEST_CALL_TIMEOUT_S)
    online = res.get("online")
    if not isinstance(online, str):
        raise RuntimeError(f"set_cpus_online: the guest answered no online list: {str(res)[:200]}")
    for err in (res.get("errors") or [])[:8]:
        log.warning("guest: %s", str(err)[:200])
    return parse_cpu_list(online[:200])


def apply_vcpus(hv, domain: str, client, want: int, out: Outcome,
                online_before: int | None = None) -> None:
    shape = hv.live_shape(domain)
    if want > shape.max_vcpus:
        out.note(f"vcpus: {want} asked, capped at this VM's max {shape.max_vcpus}")
        want = shape.max_vcpus
    if want > shape.vcpus:
        t0 = time.monotonic()
        try:
            hv.set_vcpus(domain, want)
        except libvirt.libvirtError as e:
            out.note(f"vcpus: hotplug to {want} failed: {e}")
            want = shape.vcpus
        log.info("%s: vCPUs %d -> %d plugged in %.3fs", domain, shape.vcpus, want,
                 time.monotonic() - t0)
    elif want < shape.vcpus and (online_before is None or want < online_before):
        out.note(f"vcpus: lowered to {want} by offlining in the guest; {shape.vcpus} stay "
                 f"plugged (ACPI vCPU unplug is unsafe here: docs/operating.md section 6)")
    out.plugged = max(want, shape.vcpus)
    t0 = time.monotonic()
    try:
        out.vcpus = online_cpus(client, want)
    except Exception as e:  # the guest is untrusted and may be busy: record, never raise
        out.note(f"vcpus: {e}")
        return
    log.info("%s: guest has %d vCPUs online (%.3fs)", domain, out.vcpus, time.monotonic() - t0)
    if out.vcpus != want:
        out.note(f"vcpus: the guest has {out.vcpus} online, not {want}")


def apply_memory(hv, domain: str, want: int, out: Outcome) -> None:
    shape = hv.live_shape(domain)
    plan = plan_memory(shape, want)
    for note in plan.notes:
        out.note(note)
    if plan.attach_mib:
        try:
            hv.attach_device(domain, render_dimm(plan.attach_mib))
            log.info("%s: hot-added a %d MiB DIMM", domain, plan.attach_mib)
        except libvirt.libvirtError as e:
            out.note(f"memory: adding a {plan.attach_mib} MiB DIMM failed: {e}")
    for dimm in plan.detach:
        try:
            hv.detach_device(domain, dimm.xml)
            log.info("%s: unplugged DIMM %s (%d MiB)", domain, dimm.alias, dimm.size_mib)
        except libvirt.libvirtError as e:
            out.note(f"memory: unplugging DIMM {dimm.alias} ({dimm.size_mib} MiB) failed, "
                     f"the guest keeps it: {e}")
            break
    out.memory_mib = hv.live_shape(domain).memory_mib


def apply(hv, domain: str, client, vcpus: int | None, memory_mib: int | None,
          online_before: int | None = None) -> Outcome:
    """Bring a running VM to the given shape as far as possible (also used by the pool).
    `online_before`: the vCPUs the guest had online, to tell a lowering from a raise."""
    out = Outcome()
    if memory_mib is not None:
        try:
            apply_memory(hv, domain, memory_mib, out)
        except libvirt.libvirtError as e:
            out.note(f"memory: {e}")
    if vcpus is not None:
        try:
            apply_vcpus(hv, domain, client, vcpus, out, online_before)
        except libvirt.libvirtError as e:
            out.note(f"vcpus: {e}")
    return out


def update_pod_sandbox_resources(svc, sandbox_id: str, overhead: pb.LinuxContainerResources | None,
                                 resources: pb.LinuxContainerResources | None) -> dict:
    """The RPC body. Returns the record written under resources.resize."""
    for name, res in (("resources", resources), ("overhead", overhead)):
        if res is not None:
            validate(name, res)
    rec = svc.get(sandbox_id)
    tgt = target(svc.cfg, resources, overhead)
    requested = {"vcpus": tgt.vcpus, "memoryMiB": tgt.memory_mib, "cpus": tgt.cpus}
    with svc.lock(rec.id):
        rec = svc.table.get(rec.id)
        if rec is None:  # removed while we waited for the lock
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        resize = {"requested": requested, "at": now_ns(), "notApplied": list(tgt.notes)}
        resources_row = dict(rec.resources)
        if tgt.vcpus is None and tgt.memory_mib is None:
            # a pod without limits (BestEffort): routine, nothing to do, nothing to report
            resize.update(state="nothing to do", applied={})
        elif rec.state != READY or not svc.hv.is_running(rec.domain):
            resize.update(state="not applied", applied={})
            resize["notApplied"].append(f"the sandbox is {rec.state}, its VM not running")
        else:
            resize["state"] = "applying"  # the intent first: a crash mid-way shows it
            svc.table.update(rec.id, resources={**resources_row, "resize": resize})
            try:
                out = apply(svc.hv, rec.domain, svc.agent(rec), tgt.vcpus, tgt.memory_mib,
                            rec.resources.get("vcpus"))
                # libvirt puts a hot-plugged vCPU's thread in its own cgroup: back to the pod's
                parent = pb.PodSandboxConfig.FromString(rec.config).linux.cgroup_parent
                podcgroup.charge(svc, rec.id, rec.domain, parent)
            except Exception as e:  # never fail the kubelet's routine call on a side effect
                log.exception("resizing %s failed", rec.domain)
                out = Outcome(not_applied=[f"resize failed: {e}"])
            resize["notApplied"] += out.not_applied
            resize["applied"] = {k: v for k, v in (("vcpus", out.vcpus),
                                                   ("vcpusPlugged", out.plugged),
                                                   ("memoryMiB", out.memory_mib)) if v is not None}
            resize["state"] = "done"
            if out.vcpus is not None:
                resources_row["vcpus"] = out.vcpus
            if out.memory_mib is not None:
                resources_row["memory_mib"] = out.memory_mib
        resources_row["resize"] = resize
        svc.table.update(rec.id, resources=resources_row)
    if resize["notApplied"]:
        log.warning("UpdatePodSandboxResources %s (%s/%s): requested %s, applied %s; not "
                    "applied: %s", rec.id[:12], rec.namespace, rec.name, requested,
                    resize.get("applied"), "; ".join(resize["notApplied"]))
    else:
        log.info("UpdatePodSandboxResources %s: %s", rec.id[:12], resize["applied"])
    return resize
