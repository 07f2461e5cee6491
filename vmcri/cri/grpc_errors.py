"""Map service exceptions to gRPC statuses, so servicers stay thin."""
from __future__ import annotations

import functools
import logging
import time

import grpc

from vmcri.cri.admission import gated, gated_stream
from vmcri.errors import VmcriError

log = logging.getLogger("vmcri.cri")

# Observers called as fn(method, code_name, seconds) after every RPC (metrics).
rpc_observers: list = []


def _notify(method: str, code: grpc.StatusCode, started: float) -> None:
    for fn in rpc_observers:
        try:
            fn(method, code.name, time.monotonic() - started)
        except Exception:  # an observer must never break an RPC
            log.exception("rpc observer failed")


# gRPC clients refuse status details beyond their metadata limit (16 KiB hard, 8 KiB soft
# by default) and then report RESOURCE_EXHAUSTED instead of our code: errors that echo a
# huge request field are cut well below that.
MAX_DETAILS_CHARS = 4096


def _details(text: str) -> str:
    if len(text) <= MAX_DETAILS_CHARS:
        return text
    return f"{text[:MAX_DETAILS_CHARS]}... ({len(text) - MAX_DETAILS_CHARS} more characters cut)"


def handle(fn):
    """Wrap a unary servicer method: VmcriError -> its code, anything else -> INTERNAL."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self, request, context):
        started = time.monotonic()
        try:
            reply = fn(self, request, context)
        except VmcriError as e:
            _notify(name, e.code, started)
            log.info("%s -> %s: %s", name, e.code.name, _details(str(e)))
            context.abort(e.code, _details(str(e) or e.__class__.__name__))
        except Exception as e:
            _notify(name, grpc.StatusCode.INTERNAL, started)
            log.exception("%s failed", name)
            context.abort(grpc.StatusCode.INTERNAL, _details(f"{name}: internal error: {e}"))
        _notify(name, grpc.StatusCode.OK, started)
        return reply

    return wrapper


def unimplemented(name: str, why: str):
    """A servicer method that honestly says it does not exist yet."""

    def method(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by vmcri yet: {why}")

    method.__name__ = name
    return method


def wrap_all(cls, base, pending: dict[str, str]):
    """Make every RPC of `base` answer: implemented ones wrapped by `handle` (slow ones
    behind their servicer's `slow_lane`, streams within its `stream_limit`, see
    admission.py), the rest (listed in `pending` with a reason) UNIMPLEMENTED."""
    for name, member in vars(base).items():
        if name.startswith("_") or not callable(member):
            continue
        own = cls.__dict__.get(name)
        if own is not None:
            if getattr(own, "_vmcri_stream", False):
                setattr(cls, name, gated_stream(own, name))
            else:
                setattr(cls, name, handle(gated(own, name)))
        else:
            setattr(cls, name, unimplemented(name, pending.get(name, "not supported")))
    return cls


def stream(fn):
    """Mark a server-streaming method: `wrap_all` only bounds how many run at once."""
    fn._vmcri_stream = True
    return fn
