"""Reply schemas: what the host accepts from the agent, call by call, field by field.

The other half of protocol.py's contract (which checks requests). The guest is hostile and
has root, so the host validates every reply before it reads a field of it:
`check_result(method, result)` for control calls, `check_head()` for the first line of a
streaming call (`run`, `attach`) and `exit_code()` for a process's SSH exit-status. Each
returns only the fields it checked (normalised); anything else in the reply is dropped, so
no unchecked value reaches the daemon. A reply that does not fit raises ProtocolError naming
the field: that one call fails, nothing else.

Stats calls (`container_stats`, `container_metrics`, `sandbox_stats`) carry many raw kernel
counters, and newer agents add more: their replies are checked as a bounded tree of numbers
and short strings (`_sample`) whose parts the stats code reads have the right JSON type
(`_SAMPLE_SHAPES`); the stats code then clamps each number it uses.

This module is stdlib only, like protocol.py: the guest image carries the agent package.
"""
from __future__ import annotations

import re

from .protocol import ProtocolError, _bool, _int, _list, _str, check_id

PID_MAX = 1 << 22            # the kernel's PID_MAX_LIMIT
OFFSET_MAX = 1 << 62         # a stream's absolute byte offset, as attach's request allows
EXIT_MAX = 255               # exit status, or 128+N for signal N
I64_MIN, U64_MAX = -(1 << 63), (1 << 64) - 1
CONTAINER_STATUSES = ("created", "running", "stopped")
_CPU_LIST_RE = re.compile(r"^[0-9]{1,4}(-[0-9]{1,4})?(,[0-9]{1,4}(-[0-9]{1,4})?)*$|^$")


def exit_code(field: str, v) -> int:
    return _int(field, v, 0, EXIT_MAX)


def _number(field, v, lo=0.0, hi=1e12):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ProtocolError(f"{field}: expected a number in {lo:g}..{hi:g}, got {str(v)[:40]!r}")
    return v


def _pick(result: dict, spec: dict) -> dict:
    """Checked copies of the fields in `spec` (name -> check(field, value)) that are present."""
    return {k: check(k, result[k]) for k, check in spec.items() if result.get(k) is not None}


def _state(r):
    out = _pick(r, {"pid": lambda f, v: _int(f, v, 0, PID_MAX), "exit_code": exit_code,
                    "oom_killed": _bool})
    status = r.get("status")
    if status not in CONTAINER_STATUSES:
        raise ProtocolError(f"status: expected one of {', '.join(CONTAINER_STATUSES)}, "
                            f"got {str(status)[:40]!r}")
    out["status"] = status
    return out


CREATE_PHASES = ("read_spec", "prepare_spec", "crun_create")


def _create_phases(field, v):
    """Seconds the agent spent per step: only the known names, each 0..1 day."""
    if not isinstance(v, dict):
        raise ProtocolError(f"{field}: expected an object")
    return {k: float(_number(f"{field}.{k}", v[k], 0.0, 86400.0)) for k in CREATE_PHASES if k in v}


def _created(r):
    return {"id": check_id("id", r.get("id")),
            **_pick(r, {"pid": lambda f, v: _int(f, v, 0, PID_MAX), "phases": _create_phases})}


def _str_list(field, v, max_items=64, max_len=512):
    return [_str(f"{field}[{i}]", s, max_len, allow_empty=True)
            for i, s in enumerate(_list(field, v, max_items))]


def _cpus_online(r):
    online = _str("online", r.get("online"), 1024, allow_empty=True)
    if not _CPU_LIST_RE.match(online):
        raise ProtocolError(f"online: {online[:60]!r} is not a CPU list (e.g. 0-3,5)")
    return {"online": online, **_pick(r, {"present": lambda f, v: _int(f, v, 0, 1 << 16),
                                          "errors": _str_list})}


def _cloned(r):
    return _pick(r, {"share_mounted": _bool, "boot_id": lambda f, v: _str(f, v, 64),
                     "clock_ns": lambda f, v: _int(f, v, 0, (1 << 63) - 1)})


def _phases(field, v):
    if not isinstance(v, dict) or len(v) > 64:
        raise ProtocolError(f"{field}: expected an object of at most 64 phase -> seconds")
    return {_str(f"{field} key", k, 64): _number(f"{field}.{k}", t) for k, t in v.items()}


def _info(r):
    ints = {k: (lambda f, v: _int(f, v, 0, U64_MAX))
            for k in ("mem_total", "mem_free", "mem_available")}
    return _pick(r, {"kernel_release": lambda f, v: _str(f, v, 256),
                     "hostname": lambda f, v: _str(f, v, 64),
                     "uptime": _number, "phases": _phases, "late_modules_loaded": _bool,
                     "share_mounted": _bool, "pid": lambda f, v: _int(f, v, 0, PID_MAX), **ints})


def _names(field, v):
    return [_str(f"{field}[{i}]", n, 256) for i, n in enumerate(_list(field, v, 1024))]


MAX_SAMPLE_NODES = 8192
MAX_SAMPLE_DEPTH = 5
_KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def _sample(result: dict) -> dict:
    """A stats reply: nested objects and lists (bounded in depth and size) whose leaves are
    integers of at most 64 bits, finite numbers, booleans, null or strings of <= 64 chars."""
    budget = [MAX_SAMPLE_NODES]

    def walk(field, v, depth):
        budget[0] -= 1
        if budget[0] < 0:
            raise ProtocolError(f"{field}: reply has more than {MAX_SAMPLE_NODES} values")
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, int):
            return _int(field, v, I64_MIN, U64_MAX)
        if isinstance(v, float):
            return _number(field, v, -1e19, 1e20)
        if isinstance(v, str):
            return _str(field, v, 64, allow_empty=True)
        if depth >= MAX_SAMPLE_DEPTH:
            raise ProtocolError(f"{field}: nested deeper than {MAX_SAMPLE_DEPTH}")
        if isinstance(v, list):
            return [walk(f"{field}[{i}]", x, depth + 1) for i, x in enumerate(_list(field, v, 1024))]
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if not _KEY_RE.match(k):
                    raise ProtocolError(f"{field}: key {k[:40]!r} is not a counter name")
                out[k] = walk(f"{field}.{k}" if field else k, x, depth + 1)
            return out
        raise ProtocolError(f"{field}: unexpected {type(v).__name__}")

    return walk("", result, 0)


_INT = (int,)
_SAMPLE_SHAPES = {  # what the stats code reads, by call: key -> the JSON types it may have
    "container_stats": {"cpu_usage_usec": _INT, "memory": (dict,), "pids": (int, str)},
    "container_metrics": {"cpu_usage_usec": _INT, "cpu": (dict,), "memory": (dict,),
                          "pids": (int, str), "pids_max": (int, str), "io": (list,),
                          "hugetlb": (dict,), "pressure": (dict,), "processes": (dict,)},
    "sandbox_stats": {"cpu_usage_usec": _INT, "memory": (dict,), "processes": _INT,
                      "interfaces": (list,)},
}
_LISTS_OF_OBJECTS = ("io", "interfaces")


def _stats(method: str):
    shapes = _SAMPLE_SHAPES[method]

    def check(result):
        sample = _sample(result)
        for key, types in shapes.items():
            v = sample.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, types)):
                raise ProtocolError(f"{key}: expected {' or '.join(t.__name__ for t in types)}, "
                                    f"got {type(v).__name__}")
            if key in _LISTS_OF_OBJECTS and v is not None:
                for i, item in enumerate(v):
                    if not isinstance(item, dict):
                        raise ProtocolError(f"{key}[{i}]: expected an object")
        return sample
    return check


# Every call's result, by method. A method missing here (an agent newer than this host)
# gets the bounded-tree check of the stats calls.
RESULTS = {
    "ping": lambda r: _pick(r, {"pong": _bool, "uptime": _number}),
    "info": _info,
    "set_hostname": lambda r: _pick(r, {"hostname": lambda f, v: _str(f, v, 64)}),
    "write_etc": lambda r: _pick(r, {"written": _names}),
    "configure_nic": lambda r: _pick(r, {"interface": lambda f, v: _str(f, v, 15)}),
    "shutdown": lambda r: _pick(r, {"powering_off": _bool}),
    "set_sysctls": lambda r: _pick(r, {"set": _names}),
    "container_update": _state,
    "container_create": _created,
    "container_start": _state,
    "container_kill": _state,
    "container_state": _state,
    "container_delete": lambda r: _pick(r, {"deleted": _bool}),
    "container_stats": _stats("container_stats"),
    "container_metrics": _stats("container_metrics"),
    "sandbox_stats": _stats("sandbox_stats"),
    "set_cpus_online": _cpus_online,
    "clone_init": _cloned,
    "pod_init_start": lambda r: _pick(r, {"starting": _bool}),
}


def check_result(method: str, result) -> dict:
    """The checked result of control call `method`; ProtocolError naming the bad field."""
    if not isinstance(result, dict):
        raise ProtocolError("result: expected an object")
    return RESULTS.get(method, _sample)(result)


def _offsets(field, v):
    if not isinstance(v, dict) or set(v) - {"stdout", "stderr"}:
        raise ProtocolError(f"{field}: expected {{\"stdout\": N, \"stderr\": M}}")
    return {k: _int(f"{field}.{k}", n, 0, OFFSET_MAX) for k, n in v.items()}


def check_head(head) -> dict:
    """The first line of a `run` or `attach` stream: id, pid, dropped, exited, offsets."""
    if not isinstance(head, dict):
        raise ProtocolError("head: expected an object")
    out = _pick(head, {"id": check_id, "pid": lambda f, v: _int(f, v, 0, PID_MAX),
                       "dropped": lambda f, v: _int(f, v, 0, OFFSET_MAX), "exited": _bool,
                       "offsets": _offsets})
    out.setdefault("dropped", 0)
    return out
