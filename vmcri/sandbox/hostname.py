"""The hostname a pod's guest gets: always a valid one, whatever the pod is called."""
from __future__ import annotations

import re

from cri_api.v1 import api_pb2 as pb

MAX_LABEL = 63  # one DNS label (RFC 1123); Linux allows 64, Kubernetes caps at 63 too
_INVALID = re.compile(r"[^a-z0-9-]+")


def _label(text: str) -> str:
    """`text` as a DNS label: lower case, runs of other characters -> '-', at most 63,
    no '-' at either end (the kubelet's truncation of long pod names, plus cleaning)."""
    label = _INVALID.sub("-", text.lower()).strip("-")
    return label[:MAX_LABEL].rstrip("-")


def pod_hostname(config: pb.PodSandboxConfig, sandbox_id: str = "") -> str:
    """config.hostname when set (validated by RunPodSandbox); else one derived from the
    pod name, as the kubelet would have set it; else a prefix of the sandbox id, as
    Docker names a container without a hostname."""
    if config.hostname:
        return config.hostname
    return _label(config.metadata.name) or _label(sandbox_id[:12]) or "pod"
