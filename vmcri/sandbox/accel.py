"""Choose KVM only where hardware virtualisation really works, else TCG.

A /dev/kvm alone proves nothing: on our hosts it is the kvm_pvm flavour, under
which stock guest kernels hang (HOST-NOTES §7). We require vmx/svm in the CPU
flags and the matching kvm_intel/kvm_amd module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class AccelChoice:
    domain_type: str  # "kvm" or "qemu"
    name: str  # "kvm" or "tcg"
    reason: str


def hardware_virt_status(cpuinfo: str | None = None, modules_dir: str = "/sys/module",
                         kvm_dev: str = "/dev/kvm") -> tuple[bool, str]:
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    vendor = "intel" if "vmx" in flags else "amd" if "svm" in flags else None
    if vendor is None:
        return False, "the CPU exposes neither vmx nor svm"
    if not os.path.isdir(os.path.join(modules_dir, f"kvm_{vendor}")):
        return False, f"module kvm_{vendor} is not loaded"
    if not os.path.exists(kvm_dev):
        return False, f"{kvm_dev} does not exist"
    return True, f"vmx/svm present and kvm_{vendor} loaded"


def choose(accel: str, **probe) -> AccelChoice:
    if accel == "tcg":
        return AccelChoice("qemu", "tcg", "accel = tcg in config")
    ok, why = hardware_virt_status(**probe)
    if accel == "kvm":
        return AccelChoice("kvm", "kvm", "accel = kvm in config" + ("" if ok else f" (warning: {why})"))
    if ok:
        return AccelChoice("kvm", "kvm", f"auto: {why}")
    return AccelChoice("qemu", "tcg", f"auto: {why}; using TCG software emulation")
