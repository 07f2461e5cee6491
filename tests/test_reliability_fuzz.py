"""Fuzz every CRI RPC of a live daemon with generated requests.

Requests are built from the protobuf descriptors: any field may be missing, strings are
random, huge or hostile (path tricks, NULs, newlines), numbers sit at their edges and enums
take values the proto does not define. The daemon runs without a guest image, so a
RunPodSandbox that passes validation stops at FAILED_PRECONDITION instead of booting a VM
(validation is still fuzzed in full), and pulls go to a registry that refuses at once.

Pass criteria: every answer is OK or a deliberate gRPC status (never UNKNOWN, INTERNAL or
a hang past the per-call deadline), the daemon still answers Version afterwards, and its
RSS growth stays bounded.
"""
from __future__ import annotations

import collections
import os
import shutil

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb
from google.protobuf.descriptor import FieldDescriptor as FD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fx_daemon import make_daemon

pytestmark = pytest.mark.reliability

CALL_DEADLINE_S = 60  # a hang detector, not a performance bound
EXAMPLES_PER_RPC = 40
ROUNDS = int(os.environ.get("VMCRI_FUZZ_ROUNDS", "1"))  # more rounds: a longer soak
BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
RSS_GROWTH_LIMIT_KIB = 256 * 1024

HOSTILE_STRINGS = ["", ".", "..", "../../etc/passwd", "/", "/etc/shadow", "a\x00b", "\n", "%s%n",
                   "' OR 1=1 --", "f" * 64, "e" * 63, "*", "localhost:1/x", "127.0.0.1:1/a/b:c",
                   "sha256:" + "0" * 64, "a@sha256:" + "z" * 64, "\u202e\ufeff", "-" * 300]


def _text():
    huge = st.sampled_from([256, 4096, 65536, 1 << 20, 4 << 20]).map(lambda n: "x" * n)
    return st.one_of(st.text(max_size=40), st.sampled_from(HOSTILE_STRINGS), huge)


def _int(bits: int, signed: bool):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, 1, -1 if signed else 2]))


def _scalar(field):
    t = field.type
    if t == FD.TYPE_STRING:
        return _text()
    if t == FD.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from([b"\x00" * 65536]))
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(allow_nan=True, width=32 if t == FD.TYPE_FLOAT else 64)
    if t == FD.TYPE_ENUM:
        return st.integers(-3, 40)  # undefined values included: proto3 enums are open
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return _int(64, True)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return _int(64, False)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return _int(32, False)
    return _int(32, True)


@st.composite
def message(draw, descriptor, depth: int = 0):
    msg_cls = pb.__dict__.get(descriptor.name)
    msg = msg_cls() if msg_cls is not None and msg_cls.DESCRIPTOR is descriptor else None
    if msg is None:
        from google.protobuf import message_factory
        msg = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue  # missing fields are half the fun
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if is_map:
            vfield = field.message_type.fields_by_name["value"]
            for _ in range(draw(st.integers(0, 3))):
                key = draw(_text())
                if vfield.type == FD.TYPE_MESSAGE:
                    if depth < 3:
                        getattr(msg, field.name)[key].CopyFrom(draw(message(vfield.message_type, depth + 1)))
                else:
                    getattr(msg, field.name)[key] = draw(_scalar(vfield))
        elif field.type == FD.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if field.label == FD.LABEL_REPEATED:
                for _ in range(draw(st.integers(0, 3))):
                    getattr(msg, field.name).add().CopyFrom(draw(message(field.message_type, depth + 1)))
            else:
                getattr(msg, field.name).CopyFrom(draw(message(field.message_type, depth + 1)))
        elif field.label == FD.LABEL_REPEATED:
            getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=4)))
        else:
            setattr(msg, field.name, draw(_scalar(field)))
    return msg


def _rpcs():
    for svc in ("RuntimeService", "ImageService"):
        for m in pb.DESCRIPTOR.services_by_name[svc].methods:
            yield svc, m


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    nowhere = tmp_path_factory.mktemp("no-guest")
    # top-level keys before the [registries] table, or TOML files them under it
    d = make_daemon(f'cni_conf_dir = ""\nguest_image_dir = "{nowhere}"\nagent_timeout_s = 60.0\n'
                    'pull_timeout_s = 20.0\n'
                    '[registries."docker.io"]\nmirrors = ["http://127.0.0.1:1"]\n'
                    'skip_upstream = true\n', prefix="vmcri-fuzz-")
    d.start()
    yield d
    d.stop()
    shutil.rmtree(d.base, ignore_errors=True)


def _invoke(daemon, svc: str, method, request):
    stub = daemon.runtime if svc == "RuntimeService" else daemon.image
    fn = getattr(stub, method.name)
    if method.server_streaming:
        it = fn(request, timeout=2)
        try:
            for _ in it:
                pass
        except grpc.RpcError as e:
            # the event stream only ends by our deadline: that one is expected
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return grpc.StatusCode.OK, ""
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""
    try:
        fn(request, timeout=CALL_DEADLINE_S)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_fuzz_every_rpc(fuzz_daemon):
    d = fuzz_daemon
    pid = d.proc.pid
    rss_before = _rss_kib(pid)
    seen: collections.Counter = collections.Counter()
    bad: list[str] = []

    for svc, method in list(_rpcs()) * ROUNDS:
        @settings(max_examples=EXAMPLES_PER_RPC, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(request=message(method.input_type))
        def run(request):
            code, details = _invoke(d, svc, method, request)
            seen[(method.name, code.name)] += 1
            # details the client had to drop (metadata overflow) hide the real status
            lost = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata" in details
            if code in BAD_CODES or lost:
                bad.append(f"{method.name} -> {code.name}: {details[:300]}\n  request: "
                           f"{str(request)[:300]!r}")
            assert d.proc.poll() is None, f"daemon died on {method.name}:\n{d.log()}"

        run()

    total = sum(seen.values())
    rss_after = _rss_kib(pid)
    print(f"\nfuzz: {total} requests; RSS {rss_before} -> {rss_after} KiB")
    for (name, code), n in sorted(seen.items()):
        print(f"  {name:28s} {code:20s} {n}")
    assert total >= 1000
    assert not bad, "\n".join(bad[:20])
    v = d.runtime.Version(pb.VersionRequest(), timeout=10)
    assert v.runtime_name == "vmcri"
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_KIB, (rss_before, rss_after)
