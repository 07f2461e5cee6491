"""An OCI seccomp profile compiled to a BPF program with libseccomp (what crun links), once
per container, so that each exec only loads it: one seccomp(2) call.

Semantics follow runc and crun: unknown syscall names are skipped; a rule whose action is
the default action is skipped; conditions on distinct arguments make one rule, and
conditions that repeat an argument index make one rule each.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000, "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000, "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000, "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000, "SCMP_ACT_ALLOW": 0x7FFF0000,
}
OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
       "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": 1, "SECCOMP_FILTER_FLAG_LOG": 2,
         "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4}
MAX_RULES = 4096
MAX_PROGRAM_BYTES = 1 << 20


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Program:
    """A loaded-ready BPF program: its bytes and the sock_fprog that points at them."""

    def __init__(self, code: bytes, flags: int):
        if not code or len(code) % 8 or len(code) // 8 > 0xFFFF:
            raise ValueError(f"seccomp: a BPF program of {len(code)} bytes")
        self.code = ctypes.create_string_buffer(code, len(code))
        self.fprog = _SockFprog(len(code) // 8, ctypes.addressof(self.code))
        self.flags = flags


_lib = None


def _libseccomp():
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        lib = ctypes.CDLL(name, use_errno=True)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _lib = lib
    return _lib


def _action(name, errno_ret, field: str) -> int:
    if name not in ACTIONS:
        raise ValueError(f"{field}: action {name!r} is not supported here")
    base = ACTIONS[name]
    if name in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        base |= (errno.EPERM if errno_ret is None else int(errno_ret)) & 0xFFFF
    return base


def _conditions(args, field: str) -> list[list[_ArgCmp]]:
    conds = []
    for i, a in enumerate(args or []):
        if not isinstance(a, dict) or a.get("op") not in OPS:
            raise ValueError(f"{field}.args[{i}]: expected index, value and a known op")
        index = int(a.get("index", -1))
        if not 0 <= index <= 5:
            raise ValueError(f"{field}.args[{i}].index: {index} is not 0..5")
        conds.append(_ArgCmp(index, OPS[a["op"]], int(a.get("value", 0)) & (2**64 - 1),
                             int(a.get("valueTwo", 0)) & (2**64 - 1)))
    if len({c.arg for c in conds}) == len(conds):
        return [conds]
    return [[c] for c in conds]


def _add_rules(lib, ctx, profile: dict, default: int) -> None:
    count = 0
    for r, rule in enumerate(profile.get("syscalls") or []):
        field = f"seccomp.syscalls[{r}]"
        if not isinstance(rule, dict):
            raise ValueError(f"{field}: expected an object")
        action = _action(rule.get("action"), rule.get("errnoRet"), field)
        if action == default:
            continue
        for name in rule.get("names") or []:
            nr = lib.seccomp_syscall_resolve_name(str(name).encode())
            if nr == -1:  # __NR_SCMP_ERROR: not a syscall of these architectures
                continue
            for conds in _conditions(rule.get("args"), field):
                count += 1
                if count > MAX_RULES:
                    raise ValueError(f"seccomp: more than {MAX_RULES} rules")
                arr = (_ArgCmp * max(1, len(conds)))(*conds)
                rc = lib.seccomp_rule_add_array(ctx, action, nr, len(conds), arr)
                if rc < 0:
                    raise OSError(-rc, f"{field}: rule for {name}: {os.strerror(-rc)}")


def compile_profile(profile: dict) -> Program:
    """The BPF program of an OCI linux.seccomp object."""
    if not isinstance(profile, dict):
        raise ValueError("seccomp: expected an object")
    if profile.get("listenerPath"):
        raise ValueError("seccomp: a notify listener is not supported here")
    flags = 0
    for f in profile.get("flags") or []:
        if f not in FLAGS:
            raise ValueError(f"seccomp.flags: {f!r} is not supported here")
        flags |= FLAGS[f]
    lib = _libseccomp()
    default = _action(profile.get("defaultAction"), profile.get("defaultErrnoRet"),
                      "seccomp.defaultAction")
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        for arch in profile.get("architectures") or []:
            token = lib.seccomp_arch_resolve_name(str(arch).removeprefix("SCMP_ARCH_").lower().encode())
            if token == 0:
                raise ValueError(f"seccomp.architectures: unknown {arch!r}")
            rc = lib.seccomp_arch_add(ctx, token)
            if rc < 0 and rc != -errno.EEXIST:
                raise OSError(-rc, f"seccomp.architectures: {arch}: {os.strerror(-rc)}")
        _add_rules(lib, ctx, profile, default)
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise OSError(-rc, f"seccomp_export_bpf: {os.strerror(-rc)}")
            size = os.lseek(fd, 0, os.SEEK_END)
            if size > MAX_PROGRAM_BYTES:
                raise ValueError(f"seccomp: a BPF program of {size} bytes")
            code = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    return Program(code, flags)
