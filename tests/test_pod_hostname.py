"""A pod always gets a hostname the guest accepts; bad client input is INVALID_ARGUMENT."""
import pytest
from cri_api.v1 import api_pb2 as pb

from vmcri.agent import protocol
from vmcri.errors import InvalidArgument
from vmcri.sandbox.hostname import pod_hostname
from vmcri.sandbox.sandbox_run import validate

SANDBOX_ID = "0f" * 32


def _config(name: str, hostname: str = "") -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(hostname=hostname, metadata=pb.PodSandboxMetadata(
        name=name, namespace="default", uid="uid-1"))


def _guest_accepts(hostname: str) -> bool:
    try:
        protocol.validate("set_hostname", {"hostname": hostname})
    except protocol.ProtocolError:
        return False
    return True


@pytest.mark.parametrize("name, expected", [
    ("web-0", "web-0"),
    ("a" * 100, "a" * 63),
    ("x" * 62 + "-abc", "x" * 62),             # no '-' left at the cut
    ("My_Pod.Name", "my-pod-name"),
    ("--über--pod--", "ber--pod"),
])
def test_hostname_derived_from_the_pod_name(name, expected):
    got = pod_hostname(_config(name), SANDBOX_ID)
    assert got == expected
    assert _guest_accepts(got)


def test_hostname_falls_back_to_the_sandbox_id_when_the_name_has_nothing_usable():
    assert pod_hostname(_config("___...___"), SANDBOX_ID) == SANDBOX_ID[:12]
    assert _guest_accepts(pod_hostname(_config("___"), ""))


def test_an_explicit_hostname_is_kept():
    assert pod_hostname(_config("a" * 100, hostname="node-a.example"), SANDBOX_ID) == "node-a.example"


@pytest.mark.parametrize("hostname", ["a" * 65, "under_score", "-lead", "sp ace", "a..b"])
def test_an_invalid_explicit_hostname_is_invalid_argument_naming_the_field(hostname):
    with pytest.raises(InvalidArgument, match=r"^config\.hostname"):
        validate(_config("pod", hostname=hostname))


def test_a_long_name_without_a_hostname_passes_validation():
    validate(_config("n" * 100))
